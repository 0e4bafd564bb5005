"""OpenSSH's ``sftp-server`` as a child process speaking SFTP over its pipes, without SSH: the SFTP layer
alone, for tests of the requests themselves (no root, no port, no login).

The package's ``PipeChannel`` and ``sftp_over_pipe`` speak to it exactly as they speak to an
``ssh -s … sftp`` child (``SFTP.TRANSPORT = "openssh"``), so these are the code paths of a real run.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import paramiko

from broker_sftp_uploader.sftp.paramiko_internals import PipeChannel, sftp_over_pipe
from test_resources.availability import missing_program

# Where distributions install it (Debian and Ubuntu first).
CANDIDATES = ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server", "/usr/libexec/sftp-server",
              "/usr/lib/ssh/sftp-server")
FIX_HINT = "install it with `apt-get install -y openssh-sftp-server`"


def sftp_server_path() -> str:
    """The sftp-server program; a missing one skips the test, or fails it under CI=true."""
    for candidate in CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    missing_program("sftp-server",
                    f"OpenSSH's sftp-server is not in any of {', '.join(CANDIDATES)}; {FIX_HINT}")


def start(folder: Path, *options: str) -> subprocess.Popen:
    """Start sftp-server in ``folder`` (its relative paths resolve there) with extra ``options``
    (e.g. ``-R``: read-only)."""
    return subprocess.Popen([sftp_server_path(), "-d", str(folder), *options], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)


@contextlib.contextmanager
def sftp_client(folder: Path, *options: str, channel_class: type[PipeChannel] = PipeChannel
                ) -> Iterator[paramiko.SFTPClient]:
    """An ``SFTPClient`` on a new sftp-server in ``folder``, over a ``channel_class`` of its pipes;
    the server is ended on exit."""
    channel = channel_class(start(folder, *options), timeout=10)
    try:
        client = sftp_over_pipe(channel)
        yield client
    finally:
        channel.close()
