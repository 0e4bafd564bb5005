"""Where cron users feel it: `sync` against a one-call-at-a-time baseline, and big results against OpenSSH.

One command, one table; every ratio is measured in the same run on the same machine:

1. a no-change run with N = 30, 300, 3000 tagged requests, against a baseline client that makes the same
   broker calls one after the other with a new connection each, as the original script does;
2. the first sync of 100 new small results, against the same baseline (export, download, Fernet,
   SFTP upload, one request after the other);
3. one large result (1 MiB … 1 GiB): end-to-end payload MiB/s of `sync` (start-up and connect kept,
   the broker's bundle build left out) over OpenSSH's `sftp -b` uploading the same size to the same
   sshd, with the peak RSS of `sync`. Both transports when ``--transports`` names them.

The broker emulator runs in this process with TCP_NODELAY (as Jetty) and ``--latency`` added to every
response; the sshd is a real OpenSSH on 127.0.0.1. Needs root (the sshd's users).

    python benchmarks/bench_runs.py                       # the full table (a few minutes)
    python benchmarks/bench_runs.py --counts 30,300 --sizes 1M,64M --first-sync 20
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from broker_sftp_uploader.crypto import generate_key_file
from test_resources import broker_actors as actors
from test_resources.broker_emulator import BrokerEmulator
from test_resources.sshd import SshdServer

MIB = 1024 * 1024
UNITS = {"K": 1024, "M": MIB, "G": 1024 * MIB}
NODE = actors.NODE1_KEY

# The original script's way of working, reduced to its calls: a new connection per call, every call
# in turn, each result read whole, Fernet.encrypt in memory, paramiko's putfo.
BASELINE = r'''
import sys, time, xml.etree.ElementTree as ET
import requests
url, key, ledger_path, mode = sys.argv[1:5]
NS = "{http://aktin.org/ns/exchange}"
headers = {"Authorization": "Bearer xxxAdmin1234"}
requests.head(url + "/broker/status", timeout=60).raise_for_status()
listing = requests.get(url + "/broker/request/filtered", headers={**headers, "Accept": "application/xml"},
                       params={"type": "application/vnd.aktin.query.request+xml", "predicate": "//tag='rki'"},
                       timeout=60)
ids = [element.get("id") for element in ET.fromstring(listing.content)]
known = {e.findtext("id"): e.findtext("completion") for e in ET.parse(ledger_path).getroot()} if mode == "ledger" else {}
todo = []
for request_id in ids:
    status = requests.get(f"{url}/broker/request/{request_id}/status",
                          headers={**headers, "Accept": "application/xml"}, timeout=60)
    root = ET.fromstring(status.content)
    nodes, done = len(root.findall(f".//{NS}node")), len(root.findall(f".//{NS}completed"))
    completion = str(round(done / nodes, 2) if nodes else 0.0)
    if known.get(request_id) != completion:
        todo.append(request_id)
if todo:
    import io, paramiko
    from cryptography.fernet import Fernet
    fernet = Fernet(open(sys.argv[5], "rb").read().strip())
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect(sys.argv[6], port=int(sys.argv[7]), username=sys.argv[8], password=sys.argv[9],
                   allow_agent=False, look_for_keys=False)
    sftp = client.open_sftp()
    for request_id in todo:
        uuid = requests.post(f"{url}/broker/export/request-bundle/{request_id}",
                             headers={**headers, "Accept": "text/plain"}, timeout=60).text
        data = requests.get(f"{url}/broker/download/{uuid}", headers=headers, timeout=60).content
        sftp.putfo(io.BytesIO(fernet.encrypt(data)), f"{sys.argv[10]}/export_{request_id}.zip")
    client.close()
'''


def parse_size(text: str) -> int:
    return int(text[:-1]) * UNITS[text[-1].upper()] if text[-1].upper() in UNITS else int(text)


def run(command: list[str], cwd: Path) -> tuple[float, float]:
    """Run a child to completion; return (seconds, 0.0). It must exit 0."""
    started = time.monotonic()
    child = subprocess.run(command, cwd=cwd, capture_output=True, check=False)
    seconds = time.monotonic() - started
    if child.returncode != 0:
        raise RuntimeError(f"{command[:4]} exited {child.returncode}: {child.stderr.decode()[-2000:]}")
    return seconds, 0.0


# Runs the CLI and reports the peak RSS of its own address space (VmHWM): unlike ru_maxrss, which keeps
# what the forking parent had resident, VmHWM starts afresh at exec.
PEAK_PROBE = (
    "import atexit, re, runpy, sys\n"
    "def report():\n"
    "    status = open('/proc/self/status').read()\n"
    "    sys.stderr.write('PEAK_RSS_KIB=%s\\n' % re.search(r'VmHWM:\\s+(\\d+)', status).group(1))\n"
    "atexit.register(report)\n"
    "sys.argv = ['broker-sftp-uploader', *sys.argv[1:]]\n"
    "runpy.run_module('broker_sftp_uploader', run_name='__main__')\n"
)


def run_measured(arguments: list[str], cwd: Path) -> tuple[float, float]:
    """Run the CLI with ``arguments``; return (seconds, its peak RSS in MiB). It must exit 0."""
    started = time.monotonic()
    child = subprocess.run([sys.executable, "-c", PEAK_PROBE, *arguments], cwd=cwd, capture_output=True,
                           text=True, check=False)
    seconds = time.monotonic() - started
    if child.returncode != 0:
        raise RuntimeError(f"{arguments} exited {child.returncode}: {child.stderr[-2000:]}")
    peak = int(child.stderr.strip().splitlines()[-1].split("=")[1]) / 1024
    return seconds, peak


class Site:
    """A working dir, key and config for `sync`, pointing at the emulator and a fresh remote folder."""

    def __init__(self, root: Path, broker: BrokerEmulator, sshd: SshdServer, label: str, extra: str = ""):
        self.root = root / label
        (self.root / "state").mkdir(parents=True)
        self.key = self.root / "rki.key"
        generate_key_file(self.key)
        self.folder = f"bench-{label}"
        self.remote = sshd.folder(self.folder)
        (self.root / "state" / "known_hosts").write_text(f"[{sshd.host}]:{sshd.port} {sshd.host_public_key_line}\n")
        self.config = self.root / "settings.toml"
        self.config.write_text(f"""\
[BROKER]
URL = "{broker.url}"
API_KEY = "xxxAdmin1234"
[REQUESTS]
TAG = "rki"
[SFTP]
HOST = "{sshd.host}"
PORT = {sshd.port}
USERNAME = "{sshd.password_user}"
PASSWORD = "{sshd.password}"
TIMEOUT = 60
FOLDERNAME = "{self.folder}"
{extra}
[SECURITY]
PATH_ENCRYPTION_KEY = "rki.key"
[MISC]
WORKING_DIR = "state"
""")
        self.config.chmod(0o600)
        self.ledger = self.root / "state" / "status.xml"

    def sync_command(self) -> list[str]:
        return [sys.executable, "-m", "broker_sftp_uploader", "sync", "-c", str(self.config)]

    def baseline_command(self, broker: BrokerEmulator, sshd: SshdServer, mode: str) -> list[str]:
        return [sys.executable, "-c", BASELINE, broker.url, "xxxAdmin1234", str(self.ledger), mode,
                str(self.key), sshd.host, str(sshd.port), sshd.password_user, sshd.password, self.folder]

    def write_ledger(self, completions: dict[str, str]) -> None:
        """A ledger (and its upload digest) saying every request was sent with ``completions``."""
        entries = "".join(f"<request-status><id>{request_id}</id><completion>{completion}</completion>"
                          "<uploaded>2026-01-01 00:00:00</uploaded></request-status>"
                          for request_id, completion in completions.items())
        data = f"<?xml version='1.0' encoding='UTF-8'?>\n<status version=\"1\">{entries}</status>\n".encode()
        self.ledger.write_bytes(data)
        (self.root / "state" / "status.xml.uploaded-sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")


def median_of(repeats: int, measure) -> float:
    return statistics.median(measure() for _ in range(repeats))


def bench_no_change(count: int, scratch: Path, sshd: SshdServer, latency: float, repeats: int) -> tuple:
    with BrokerEmulator(data_dir=scratch / f"broker-nc-{count}") as broker:
        ids = [str(actors.create_request(broker.url, "rki")) for _ in range(count)]
        for other in range(max(1, count // 10)):  # some untagged requests, as on a real broker
            actors.create_request(broker.url, "default")
        site = Site(scratch, broker, sshd, f"nochange-{count}")
        site.write_ledger({request_id: "0.0" for request_id in ids})
        broker.latency = latency
        ours = median_of(repeats, lambda: run(site.sync_command(), site.root)[0])
        baseline = median_of(repeats, lambda: run(site.baseline_command(broker, sshd, "ledger"), site.root)[0])
        assert not any(site.remote.iterdir()), "a no-change run uploaded something"
    return f"no-change run, N = {count}", baseline, ours


def bench_first_sync(count: int, scratch: Path, sshd: SshdServer, latency: float) -> tuple:
    with BrokerEmulator(data_dir=scratch / "broker-first") as broker:
        for _ in range(count):
            request_id = actors.create_request(broker.url, "rki")
            actors.put_result(broker.url, NODE, request_id, os.urandom(2048), content_type="application/octet-stream")
            actors.post_status(broker.url, NODE, request_id, "completed")
        broker.latency = latency
        ours_site = Site(scratch, broker, sshd, "first-ours")
        ours = run(ours_site.sync_command(), ours_site.root)[0]
        assert len(list(ours_site.remote.glob("export_*.zip"))) == count
        base_site = Site(scratch, broker, sshd, "first-baseline")
        baseline = run(base_site.baseline_command(broker, sshd, "fresh"), base_site.root)[0]
        assert len(list(base_site.remote.glob("export_*.zip"))) == count
    return f"first sync of {count} new small results", baseline, ours


def make_result(path: Path, size: int) -> None:
    block = os.urandom(MIB)
    with open(path, "wb") as handle:
        handle.writelines(block[: min(MIB, size - offset)] for offset in range(0, size, MIB))


def openssh_upload_seconds(sshd: SshdServer, source: Path, folder: str, scratch: Path) -> float:
    """Seconds for OpenSSH's sftp -b to put ``source`` (key login; start-up and connect included)."""
    batch = scratch / "batch"
    batch.write_text(f"put {source} {folder}/openssh-reference.bin\n")
    known = scratch / "known_hosts_ref"
    known.write_text(f"[{sshd.host}]:{sshd.port} {sshd.host_public_key_line}\n")
    command = ["sftp", "-q", "-b", str(batch), "-P", str(sshd.port), "-i", str(sshd.client_key_path),
               "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
               "-o", "BatchMode=yes", f"{sshd.key_user}@{sshd.host}"]
    seconds, _ = run(command, scratch)
    return seconds


def bench_large(size_text: str, scratch: Path, sshd: SshdServer, transport: str) -> tuple:
    size = parse_size(size_text)
    work = scratch / f"large-{size_text}-{transport}"
    work.mkdir()
    result = work / "result.bin"
    make_result(result, size)
    extra = "" if transport == "paramiko" else f'TRANSPORT = "{transport}"'
    with BrokerEmulator(data_dir=work / "broker") as broker:
        request_id = actors.create_request(broker.url, "rki")
        actors.put_result(broker.url, NODE, request_id, result, content_type="application/octet-stream")
        actors.post_status(broker.url, NODE, request_id, "completed")
        site = Site(work, broker, sshd, "site", extra)
        seconds, rss = run_measured(["sync", "-c", str(site.config)], site.root)
        seconds -= sum(broker.export_seconds)  # the broker's bundle build is not ours to speed up
        uploaded = site.remote / f"export_{request_id}.zip"
        payload = uploaded.stat().st_size
    token = work / "token.bin"
    shutil.copyfile(uploaded, token)
    reference = openssh_upload_seconds(sshd, token, site.folder, work)
    ours_rate, reference_rate = payload / MIB / seconds, payload / MIB / reference
    shutil.rmtree(site.remote, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return size_text, transport, ours_rate, reference_rate, rss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="30,300,3000", help="N for the no-change runs")
    parser.add_argument("--first-sync", type=int, default=100, help="new small results in the first sync")
    parser.add_argument("--sizes", default="1M,64M,512M,1G", help="large result sizes (K, M, G)")
    parser.add_argument("--transports", default="paramiko,openssh", help="SFTP.TRANSPORT values to measure")
    parser.add_argument("--latency", type=float, default=0.020, help="seconds added to every broker response")
    parser.add_argument("--repeats", type=int, default=3, help="runs per no-change measurement (median)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bsu-bench-", dir="/var/tmp"))
    scratch.chmod(0o755)
    speedups, large = [], []
    try:
        with SshdServer(scratch / "sshd") as sshd:
            for count in filter(None, args.counts.split(",")):
                speedups.append(bench_no_change(int(count), scratch, sshd, args.latency, args.repeats))
            if args.first_sync:
                speedups.append(bench_first_sync(args.first_sync, scratch, sshd, args.latency))
            for size_text in filter(None, args.sizes.split(",")):
                for transport in filter(None, args.transports.split(",")):
                    large.append(bench_large(size_text, scratch, sshd, transport))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"broker latency {args.latency * 1000:.0f} ms per response; {os.cpu_count()} cores")
    print()
    print("| work | baseline s | ours s | speed-up |")
    print("|---|---:|---:|---:|")
    for work, baseline, ours in speedups:
        print(f"| {work} | {baseline:.2f} | {ours:.2f} | {baseline / ours:.1f}x |")
    if large:
        print()
        print("| result | transport | ours MiB/s | OpenSSH sftp -b MiB/s | ratio | peak RSS MiB |")
        print("|---:|---|---:|---:|---:|---:|")
        for size_text, transport, ours_rate, reference_rate, rss in large:
            print(f"| {size_text} | {transport} | {ours_rate:.0f} | {reference_rate:.0f} | "
                  f"{ours_rate / reference_rate:.2f} | {rss:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
