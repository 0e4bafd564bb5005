"""Peak memory and throughput of `sync` uploading one large result, and of `decrypt` on the upload.

Runs the real pipeline: the broker emulator (in this process) builds the export bundle, the CLI runs
as a child process (download -> Fernet -> SFTP to a real OpenSSH sshd on 127.0.0.1), then the CLI's
`decrypt` restores the bundle. Each child's own peak RSS comes from os.wait4. Needs root (sshd users).

    python benchmarks/bench_sync.py                # 1 MiB, 64 MiB, 1 GiB
    python benchmarks/bench_sync.py --sizes 16M
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from broker_sftp_uploader.crypto import generate_key_file
from test_resources import broker_actors as actors
from test_resources.broker_emulator import BrokerEmulator
from test_resources.sshd import SshdServer

from bench_runs import as_installed  # the same directory: run as a script

MIB = 1024 * 1024
UNITS = {"K": 1024, "M": MIB, "G": 1024 * MIB}


def parse_size(text: str) -> int:
    return int(text[:-1]) * UNITS[text[-1].upper()] if text[-1].upper() in UNITS else int(text)


def make_result(path: Path, size: int) -> None:
    """Incompressible data, written 1 MiB at a time (the bundle is then about as large as the result)."""
    block = os.urandom(MIB)
    with open(path, "wb") as handle:
        handle.writelines(block[: min(MIB, size - offset)] for offset in range(0, size, MIB))


def run_child(args: list[str], cwd: Path) -> tuple[int, float, float]:
    """Run a CLI child; return its exit code, seconds and peak RSS in MiB."""
    started = time.monotonic()
    child = subprocess.Popen([sys.executable, "-m", "broker_sftp_uploader", *args], cwd=cwd)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, time.monotonic() - started, usage.ru_maxrss / 1024


def measure(size: int, sshd: SshdServer, scratch: Path) -> list[tuple[str, float, float, float]]:
    work = scratch / f"work-{size}"
    (work / "state").mkdir(parents=True)
    key = work / "rki.key"
    generate_key_file(key)
    folder = f"bench-{size}"
    remote = sshd.folder(folder)
    result_file = work / "result.bin"
    make_result(result_file, size)
    with BrokerEmulator(data_dir=work / "broker") as broker:
        request_id = actors.create_request(broker.url, "rki")
        actors.put_result(broker.url, "xxxApiKey123", request_id, result_file,
                          content_type="application/octet-stream")
        actors.post_status(broker.url, "xxxApiKey123", request_id, "completed")
        result_file.unlink()
        (work / "settings.toml").write_text(f"""\
[BROKER]
URL = "{broker.url}"
API_KEY = "{actors.ADMIN_KEY}"
[REQUESTS]
TAG = "rki"
[SFTP]
HOST = "127.0.0.1"
PORT = {sshd.port}
USERNAME = "{sshd.password_user}"
PASSWORD = "{sshd.password}"
TIMEOUT = 60
FOLDERNAME = "{folder}"
[SECURITY]
PATH_ENCRYPTION_KEY = "rki.key"
[MISC]
WORKING_DIR = "state"
""")
        code, sync_seconds, sync_rss = run_child(["sync", "-c", "settings.toml"], work)
        assert code == 0, f"sync exited {code}"
    uploaded = remote / f"export_{request_id}.zip"
    code, decrypt_seconds, decrypt_rss = run_child(
        ["decrypt", "-k", "rki.key", "-o", "bundle.zip", str(uploaded)], work)
    assert code == 0, f"decrypt exited {code}"
    with zipfile.ZipFile(work / "bundle.zip") as bundle:
        assert bundle.getinfo("0_result").file_size == size, bundle.namelist()
    token_mib = uploaded.stat().st_size / MIB
    shutil.rmtree(work)
    uploaded.unlink()
    return [("sync (export, download, encrypt, upload)", token_mib, sync_seconds, sync_rss),
            ("decrypt", token_mib, decrypt_seconds, decrypt_rss)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1M,64M,1G", help="comma-separated result sizes (K, M, G)")
    args = parser.parse_args()
    as_installed()
    scratch = Path(tempfile.mkdtemp(prefix="bsu-bench-", dir="/var/tmp"))
    scratch.chmod(0o755)
    rows = []
    try:
        with SshdServer(scratch / "sshd") as sshd:
            for text in args.sizes.split(","):
                for operation, token_mib, seconds, rss in measure(parse_size(text), sshd, scratch):
                    rows.append((text, operation, token_mib / seconds, seconds, rss))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print("| result size | operation | MiB/s (token) | seconds | peak RSS MiB |")
    print("|---:|---|---:|---:|---:|")
    for text, operation, speed, seconds, rss in rows:
        print(f"| {text} | {operation} | {speed:.0f} | {seconds:.1f} | {rss:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
