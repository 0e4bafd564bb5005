"""``status --remote --verify`` reads a large file back in bounded memory: the peak RSS (VmHWM) of the
command's own process stays far below the file's size, over both transports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from broker_sftp_uploader.crypto import EncryptingReader
from tests.integration.test_check import private_temp_dir  # noqa: F401 - autouse fixture

PLAIN_SIZE = 160 * 1024 * 1024  # the token is about 213 MiB: holding it would show at once
# The interpreter with cryptography and paramiko loaded takes about 57 MiB; reading back adds a window or two.
RSS_LIMIT_KIB = 80 * 1024
# Runs the CLI in this process and writes the process's peak resident set size to the file in argv[1].
MEASURED_RUN = """
import runpy, sys
report = sys.argv.pop(1)
sys.argv[0] = "broker-sftp-uploader"
try:
    runpy.run_module("broker_sftp_uploader", run_name="__main__")
finally:
    peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    open(report, "w").write(peak.split()[1])
"""


class _Zeros:
    """A plaintext source of ``size`` zero bytes that holds none of them."""

    def __init__(self, size: int):
        self.left = size

    def read(self, size: int) -> bytes:
        size = min(size, self.left)
        self.left -= size
        return bytes(size)


def _ledger(size: int) -> bytes:
    return (b"<?xml version='1.0' encoding='UTF-8'?>\n<status version=\"1\">\n  <request-status>\n"
            b"    <id>7</id>\n    <completion>1.0</completion>\n"
            b"    <uploaded>2021-10-11 09:39:50</uploaded>\n    <file>export_7.zip</file>\n"
            b"    <size>" + str(size).encode() + b"</size>\n  </request-status>\n</status>\n")


@pytest.mark.parametrize("transport", ["paramiko", "openssh"])
def test_verify_of_a_large_file_stays_in_bounded_memory(workspace, sshd, tmp_path, transport):
    if transport == "openssh":
        workspace.rewrite_config('FOLDERNAME = "', 'TRANSPORT = "openssh"\nFOLDERNAME = "')
    workspace.pin_host_key(sshd)
    key = workspace.key_path.read_bytes().strip()
    token = workspace.remote / "export_7.zip"
    reader = EncryptingReader(_Zeros(PLAIN_SIZE), key)
    with open(token, "wb") as target:
        while chunk := reader.read(1024 * 1024):
            target.write(chunk)
    size = token.stat().st_size
    assert size > 2 * RSS_LIMIT_KIB * 1024
    workspace.ledger.write_bytes(_ledger(size))
    report = tmp_path / "peak-kib"
    result = subprocess.run([sys.executable, "-c", MEASURED_RUN, str(report), "status", "-c",
                             str(workspace.config_path), "--json", "--remote", "--verify"],
                            capture_output=True, text=True, timeout=300, cwd=workspace.root)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["remote"]["verify"] == {"checked": 1, "verified": 1, "failed": []}
    peak_kib = int(report.read_text())
    print(f"{transport}: verified {size / 2**20:.0f} MiB with a peak RSS of {peak_kib / 1024:.1f} MiB")
    assert peak_kib < RSS_LIMIT_KIB
