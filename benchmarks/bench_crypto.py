"""Benchmark the streaming Fernet code against cryptography's whole-file ``Fernet``.

Usage::

    python benchmarks/bench_crypto.py [--quick | --sizes 1M,16M,256M,1G,2G] [--fernet-max 1G] [--tmp DIR]

For every size a file is generated once (one random MiB repeated), then each measurement runs in a
fresh child interpreter so its peak memory is its own:

* encrypt, ours:   ``crypto.encrypt_stream`` file -> file
* encrypt, Fernet: read the file, ``Fernet.encrypt``, write the token
* decrypt, ours:   ``crypto.decrypt_file`` (temp file, fsync, rename)
* decrypt, Fernet: read the token, ``Fernet.decrypt``, write the plaintext

Every variant fsyncs its output, as ``decrypt_file`` must, so the numbers compare like with like.
MiB/s is plaintext size over the wall time measured inside the child around the operation (interpreter
start-up and imports excluded). Peak RSS is the child's ``ru_maxrss`` as returned by ``os.wait4`` for
that one child: ``getrusage(RUSAGE_CHILDREN)`` would report the maximum over all children so far, so a
small measurement after a big one would show nothing. A baseline child (imports only) is reported too.
Fernet is skipped above ``--fernet-max`` (it needs several times the file size in memory). Outputs
are checked against the input. Prints a Markdown table on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
ALL_SIZES = "1M,16M,256M,1G,2G"
QUICK_SIZES = "1M,16M"

CHILD = r"""
import json, os, sys, time
from pathlib import Path
from cryptography.fernet import Fernet
from broker_sftp_uploader import crypto

operation, implementation, source, target, key_file = sys.argv[1:]
key = Path(key_file).read_bytes().strip()
start = time.perf_counter()
if operation == "baseline":
    pass
elif implementation == "ours" and operation == "encrypt":
    with open(source, "rb") as src, open(target, "wb") as dst:
        crypto.encrypt_stream(key, src, dst)
        dst.flush()
        os.fsync(dst.fileno())
elif implementation == "ours" and operation == "decrypt":
    crypto.decrypt_file([key], Path(source), Path(target))
else:
    data = Path(source).read_bytes()
    fernet = Fernet(key)
    result = fernet.encrypt(data) if operation == "encrypt" else fernet.decrypt(data)
    del data
    with open(target, "wb") as dst:
        dst.write(result)
        dst.flush()
        os.fsync(dst.fileno())
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def parse_size(text: str) -> int:
    """Turn "256M", "1G", "512K" or a plain byte count into bytes."""
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    factor = {"K": 1024, "M": MIB, "G": 1024 * MIB}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * factor)


def label(size: int) -> str:
    return f"{size // (1024 * MIB)} GiB" if size >= 1024 * MIB else f"{size / MIB:g} MiB"


def make_input(path: Path, size: int) -> None:
    """Write ``size`` random-ish bytes: one random MiB, repeated."""
    block = os.urandom(MIB)
    with open(path, "wb") as handle:
        handle.writelines(block[: min(MIB, size - offset)] for offset in range(0, size, MIB))


def run_child(operation: str, implementation: str, source: Path, target: Path, key_file: Path) -> dict:
    """Run one measurement in a fresh interpreter; return its seconds and peak RSS in MiB."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    args = [sys.executable, "-c", CHILD, operation, implementation, str(source), str(target), str(key_file)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    output = proc.stdout.read().decode(errors="replace")
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, independent of the others
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{operation}/{implementation} failed ({proc.returncode}): {output.strip()[-500:]}")
    result = json.loads(output.strip().splitlines()[-1])
    result["rss_mib"] = usage.ru_maxrss / 1024  # Linux reports KiB
    return result


def bench_size(size: int, folder: Path, key_file: Path, fernet_max: int) -> list[tuple[str, ...]]:
    """Measure the four operations for one size; return table rows."""
    plain, token = folder / "plain.bin", folder / "token.fernet"
    rows = []
    print(f"generating {label(size)} ...", file=sys.stderr)
    make_input(plain, size)
    steps = [("encrypt", "ours", plain, token), ("encrypt", "Fernet", plain, folder / "token2.fernet"),
             ("decrypt", "ours", token, folder / "out1.bin"), ("decrypt", "Fernet", token, folder / "out2.bin")]
    for operation, implementation, source, target in steps:
        if implementation == "Fernet" and size > fernet_max:
            rows.append((label(size), operation, implementation, "skipped", "skipped"))
            continue
        print(f"  {operation} {implementation} ...", file=sys.stderr)
        result = run_child(operation, implementation.lower(), source, target, key_file)
        if operation == "decrypt" and not filecmp.cmp(plain, target, shallow=False):
            raise RuntimeError(f"{implementation} decrypt of {label(size)} does not match the input")
        if target != token:
            target.unlink()
        speed = size / MIB / result["seconds"] if result["seconds"] > 0 else float("inf")
        rows.append((label(size), operation, implementation, f"{speed:.0f}", f"{result['rss_mib']:.0f}"))
    plain.unlink()
    token.unlink()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=ALL_SIZES, help=f"comma-separated sizes (default {ALL_SIZES})")
    parser.add_argument("--quick", action="store_true", help=f"only {QUICK_SIZES}")
    parser.add_argument("--fernet-max", default="1G", help="skip whole-file Fernet above this size")
    parser.add_argument("--tmp", type=Path, default=None, help="folder for the test files")
    args = parser.parse_args(argv)
    sizes = [parse_size(s) for s in (QUICK_SIZES if args.quick else args.sizes).split(",") if s.strip()]
    folder = Path(tempfile.mkdtemp(prefix="bench-crypto-", dir=args.tmp))
    try:
        sys.path.insert(0, str(REPO))
        from broker_sftp_uploader.crypto import generate_key_file

        key_file = folder / "bench.key"
        generate_key_file(key_file)
        baseline = run_child("baseline", "none", key_file, key_file, key_file)["rss_mib"]
        rows = []
        for size in sizes:
            rows += bench_size(size, folder, key_file, parse_size(args.fernet_max))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print("| size | operation | implementation | MiB/s | peak RSS MiB |")
    print("|---:|---|---|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nBaseline peak RSS of a child that only imports the modules: {baseline:.0f} MiB.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
