"""Ctrl-C / SIGTERM during SFTP work: the session stays usable, so partial uploads are always removed."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from broker_sftp_uploader.config import SftpSettings
from broker_sftp_uploader.sftp import STALE_PART_AGE, SftpConnection


@pytest.fixture
def remote(sshd, tmp_path, request) -> tuple[SftpSettings, Path]:
    folder = f"i-{request.node.name[:40]}-{os.urandom(3).hex()}"
    local = sshd.folder(folder)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[{sshd.host}]:{sshd.port} {sshd.host_public_key_line}\n")
    settings = SftpSettings(host=sshd.host, port=sshd.port, username=sshd.password_user,
                            password=sshd.password, timeout=10, folder=folder, known_hosts=known_hosts)
    return settings, local


def send_sigterm() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


class Zeros(io.RawIOBase):
    """A fast source, so that nearly all the time is spent inside paramiko."""

    def __init__(self, size: int):
        self.left = size

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        self.left -= size
        return bytes(size)


def test_signals_at_random_moments_of_an_upload_never_break_the_session(signal_handlers, remote):
    settings, local = remote
    with SftpConnection(settings) as connection:
        for attempt in range(12):
            timer = threading.Timer(0.01 + 0.013 * attempt, send_sigterm)
            timer.start()
            try:
                with pytest.raises(KeyboardInterrupt):
                    connection.upload(Zeros(512 * 1024 * 1024), "big.bin")
            finally:
                timer.cancel()
            assert sorted(path.name for path in local.iterdir()) == [], f"attempt {attempt}"
            # The same session still works: nothing was cut off halfway through an SFTP packet.
            assert connection.upload(io.BytesIO(b"probe"), "probe.txt") == 5
            assert (local / "probe.txt").read_bytes() == b"probe"
            (local / "probe.txt").unlink()


def test_partial_uploads_a_day_old_are_removed_when_connecting(remote):
    settings, local = remote
    old_part = local / ".export_7.zip.part-0123456789ab"
    fresh_part = local / ".export_8.zip.part-0123456789ab"
    lookalike = local / ".export_9.zip.part-keep"
    for path in (old_part, fresh_part, lookalike):
        path.write_bytes(b"partial")
    day_old = time.time() - STALE_PART_AGE - 60
    os.utime(old_part, (day_old, day_old))
    os.utime(lookalike, (day_old, day_old))
    with SftpConnection(settings):
        pass
    assert sorted(path.name for path in local.iterdir()) == sorted([lookalike.name, fresh_part.name])
