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
from broker_sftp_uploader.state.journal import PartialsJournal
from broker_sftp_uploader.sftp.connection import SftpConnection


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


def upload_interrupted(connection: SftpConnection, after: float) -> None:
    """Upload 512 MiB of zeros as big.bin with SIGTERM sent ``after`` seconds in; the upload must end in
    KeyboardInterrupt (the uploader's handlers are installed)."""
    timer = threading.Timer(after, send_sigterm)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            connection.upload(Zeros(512 * 1024 * 1024), "big.bin")
    finally:
        timer.cancel()


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
            upload_interrupted(connection, after=0.01 + 0.013 * attempt)
            assert sorted(path.name for path in local.iterdir()) == [], f"attempt {attempt}"
            # The same session still works: nothing was cut off halfway through an SFTP packet.
            assert connection.upload(io.BytesIO(b"probe"), "probe.txt") == 5
            assert (local / "probe.txt").read_bytes() == b"probe"
            (local / "probe.txt").unlink()


def test_interrupted_upload_leaves_neither_file_nor_journal_entry(signal_handlers, remote, tmp_path):
    settings, local = remote
    journal = PartialsJournal(tmp_path / "status.xml.partials")
    with SftpConnection(settings, journal) as connection:
        upload_interrupted(connection, after=0.05)
    assert list(local.iterdir()) == []
    assert journal.leftovers() == [] and not journal.path.exists()


def test_journal_names_the_temp_file_while_the_upload_runs(remote, tmp_path):
    settings, local = remote
    journal = PartialsJournal(tmp_path / "status.xml.partials")
    seen = []

    class Watching(Zeros):
        def read(self, size=-1):
            if not seen:
                seen.append((PartialsJournal(journal.path).leftovers(), sorted(p.name for p in local.iterdir())))
            return super().read(size)

    with SftpConnection(settings, journal) as connection:
        connection.upload(Watching(100_000), "export_3.zip")
    recorded, on_server = seen[0]
    assert len(recorded) == 1 and recorded[0].startswith(".export_3.zip.part-")
    assert on_server == recorded  # the name was recorded before the remote file was created
    assert not journal.path.exists()
    assert sorted(p.name for p in local.iterdir()) == ["export_3.zip"]


def test_leftover_parts_named_by_the_journal_are_removed_and_nothing_else(remote, tmp_path):
    settings, local = remote
    ours = local / ".export_7.zip.part-0123456789ab"
    gone_already = ".export_6.zip.part-00000000000a"
    not_ours = local / ".export_8.zip.part-0123456789ab"  # same shape, another uploader's
    day_old = time.time() - 2 * 86400
    for path in (ours, not_ours):
        path.write_bytes(b"partial")
        os.utime(path, (day_old, day_old))
    journal_path = tmp_path / "status.xml.partials"
    journal_path.write_text(f"+{ours.name}\n+{gone_already}\n+../../etc/passwd\n+export_1.zip\n+.x.part-00112233aabb\n-.x.part-00112233aabb\n")
    journal = PartialsJournal(journal_path)
    with SftpConnection(settings, journal) as connection:
        assert connection.remove_leftover_parts() == 1
    assert sorted(path.name for path in local.iterdir()) == [not_ours.name]
    assert not journal_path.exists()
