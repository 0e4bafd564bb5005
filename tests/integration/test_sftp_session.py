"""One SFTP session's own logic against real servers: the bound on pipelined writes in flight, and the
rename into place (posix-rename on OpenSSH; on ProFTPD without it, SFTP v3's rename, with the previous
file deleted first when there is one).

The pipeline and posix-rename tests speak to OpenSSH's sftp-server over its pipes, as the openssh
transport does, through a channel that reads the packet types as they pass: what is measured is what
reached the server.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from broker_sftp_uploader.config import SftpSettings
from broker_sftp_uploader.errors import SftpError
from broker_sftp_uploader.sftp.connection import SftpConnection
from broker_sftp_uploader.sftp.paramiko_internals import PipeChannel
from broker_sftp_uploader.sftp.session import (
    MAX_IN_FLIGHT,
    METHOD_DELETE_THEN_RENAME,
    WRITE_SIZE,
    SftpSession,
)
from test_resources import sftp_server
from test_resources.availability import require_server
from test_resources.proftpd import ProftpdServer
from tests.integration.test_other_sftp_servers import REJECTED_POSIX_RENAME

# SFTP packet types (draft-ietf-secsh-filexfer-02, section 3).
OPEN, CLOSE, WRITE, LSTAT, REMOVE, STAT, RENAME, EXTENDED = 3, 4, 6, 7, 13, 17, 18, 200


class PacketTypes:
    """The packet types of one direction of an SFTP byte stream, noted as its bytes pass."""

    def __init__(self) -> None:
        self.types: list[int] = []
        self._header = b""  # the current packet's length and type, while incomplete
        self._skip = 0  # the current packet's bytes still to pass

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._skip:
                passed = min(self._skip, len(view))
                self._skip -= passed
                view = view[passed:]
                continue
            needed = 5 - len(self._header)
            self._header += bytes(view[:needed])
            view = view[needed:]
            if len(self._header) == 5:
                self.types.append(self._header[4])
                self._skip = int.from_bytes(self._header[:4], "big") - 1
                self._header = b""


class CountingChannel(PipeChannel):
    """A ``PipeChannel`` noting the packets sent and received, and the requests unanswered at each write."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent, self.received = PacketTypes(), PacketTypes()
        self.unanswered_at_writes: list[int] = []
        self.turns: list[list[int]] = []  # the packet types sent between two waits for a reply
        self._sending = False  # the last call was a send: the next send belongs to the same turn

    def send(self, data: bytes) -> int:
        written = super().send(data)
        sent_before = len(self.sent.types)
        writes_before = self.sent.types.count(WRITE)
        self.sent.feed(data[:written])
        if self.sent.types.count(WRITE) > writes_before:
            self.unanswered_at_writes.append(len(self.sent.types) - len(self.received.types))
        if self.turns and self._sending:
            self.turns[-1] += self.sent.types[sent_before:]
        else:
            self.turns.append(self.sent.types[sent_before:])
        self._sending = True
        return written

    def recv(self, size: int) -> bytes:
        self._sending = False
        data = super().recv(size)
        self.received.feed(data)
        return data


@pytest.fixture
def folder(tmp_path) -> Path:
    path = tmp_path / "rki"
    path.mkdir()
    return path


@pytest.mark.parametrize("with_progress", [False, True], ids=["no progress callback", "progress callback"])
def test_writes_in_flight_never_exceed_the_bound(folder, with_progress):
    """The ledger's upload passes no progress callback: its writes must be bounded all the same."""
    content = os.urandom(3 * MAX_IN_FLIGHT * WRITE_SIZE + 1)
    reported: list[int] = []
    with sftp_server.sftp_client(folder, channel_class=CountingChannel) as client:
        session = SftpSession(client, ".", "sftp-server")
        written = session.upload(io.BytesIO(content), "export_1.zip", len(content),
                                 progress=reported.append if with_progress else None)
        channel = client.get_channel()
    assert written == len(content) == (folder / "export_1.zip").stat().st_size
    assert (folder / "export_1.zip").read_bytes() == content
    assert len(channel.unanswered_at_writes) == 3 * MAX_IN_FLIGHT + 1
    # Pipelined up to the bound, and never past it (each sent write counted as unanswered at once).
    assert max(channel.unanswered_at_writes) == MAX_IN_FLIGHT
    assert reported == ([WRITE_SIZE] * (3 * MAX_IN_FLIGHT) + [1] if with_progress else [])


def test_large_writes_over_paramikos_own_channel_land_whole(sshd, tmp_path):
    """Writes of 255 KiB, framed by send_write and cut into SSH packets from a memoryview, many in flight:
    every byte lands in order, over a real OpenSSH."""
    folder = sshd.folder("large-writes")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[{sshd.host}]:{sshd.port} {sshd.host_public_key_line}\n")
    settings = SftpSettings(host=sshd.host, port=sshd.port, username=sshd.password_user, password=sshd.password,
                            timeout=10, folder="large-writes", known_hosts=known_hosts)
    content = os.urandom(3 * MAX_IN_FLIGHT * WRITE_SIZE + 12345)
    with SftpConnection(settings) as connection:
        assert connection.upload(io.BytesIO(content), "export_1.zip", len(content)) == len(content)
    assert (folder / "export_1.zip").read_bytes() == content


def test_a_small_upload_takes_four_round_trips(folder):
    """open; the write, the close and the stat; the rename; the two checks after it: each group sent
    before any of its replies is awaited."""
    (folder / "export_1.zip").write_bytes(b"the previous version")
    with sftp_server.sftp_client(folder, channel_class=CountingChannel) as client:
        session = SftpSession(client, ".", "sftp-server")
        channel = client.get_channel()
        channel.turns.clear()  # after the version exchange
        assert session.upload(io.BytesIO(b"the new version"), "export_1.zip") == 15
    assert channel.turns == [[OPEN], [WRITE, CLOSE, STAT], [EXTENDED], [LSTAT, STAT]]
    assert (folder / "export_1.zip").read_bytes() == b"the new version"
    assert sorted(path.name for path in folder.iterdir()) == ["export_1.zip"]


def test_an_existing_file_is_replaced_by_one_posix_rename(folder):
    (folder / "export_1.zip").write_bytes(b"previous")
    with sftp_server.sftp_client(folder, channel_class=CountingChannel) as client:
        session = SftpSession(client, ".", "sftp-server")
        session.upload(io.BytesIO(b"new version"), "export_1.zip")
        session.upload(io.BytesIO(b"a new file"), "export_2.zip")
        sent = client.get_channel().sent.types
    assert sorted(path.name for path in folder.iterdir()) == ["export_1.zip", "export_2.zip"]
    assert (folder / "export_1.zip").read_bytes() == b"new version"
    assert (sent.count(EXTENDED), sent.count(RENAME), sent.count(REMOVE)) == (2, 0, 0)
    assert session.traits.posix_rename is True and "posix-rename@openssh.com" in session.traits.extensions
    assert session.traits.rename_method == "posix-rename"


def test_posix_rename_is_not_sent_to_a_server_that_does_not_offer_it(folder):
    """sftp-server -P posix-rename leaves it out of its VERSION reply: plain RENAME, refused over an
    existing file, so the previous file is deleted first; learnt once, with no request of its own."""
    (folder / "export_1.zip").write_bytes(b"previous")
    with sftp_server.sftp_client(folder, "-P", "posix-rename", channel_class=CountingChannel) as client:
        session = SftpSession(client, ".", "sftp-server")
        assert session.traits.posix_rename is False and session.traits.rename_method is None
        session.upload(io.BytesIO(b"new version"), "export_1.zip")
        assert session.traits.rename_method == METHOD_DELETE_THEN_RENAME
        session.upload(io.BytesIO(b"newer version"), "export_1.zip")
        session.upload(io.BytesIO(b"a new file"), "export_2.zip")
        sent = client.get_channel().sent.types
    assert sorted(path.name for path in folder.iterdir()) == ["export_1.zip", "export_2.zip"]
    assert (folder / "export_1.zip").read_bytes() == b"newer version"
    assert (sent.count(EXTENDED), sent.count(RENAME), sent.count(REMOVE)) == (0, 5, 2)


def test_a_refused_rename_keeps_the_previous_file_and_removes_the_temp_file(folder):
    """The server refuses renames (here: denied by policy), so nothing is renamed or deleted."""
    (folder / "export_1.zip").write_bytes(b"previous")
    with sftp_server.sftp_client(folder, "-P", "posix-rename,rename") as client:
        session = SftpSession(client, ".", "sftp-server")
        refusal = "^upload of export_1.zip to sftp-server failed: Permission denied$"
        with pytest.raises(SftpError, match=refusal):
            session.upload(io.BytesIO(b"new version"), "export_1.zip")
    assert [path.name for path in folder.iterdir()] == ["export_1.zip"]
    assert (folder / "export_1.zip").read_bytes() == b"previous"


@pytest.fixture(scope="module")
def proftpd_without_posix_rename():
    require_server(ProftpdServer)
    base = Path(tempfile.mkdtemp(prefix="bsu-proftpd-"))  # not tmp_path: pytest may make it 0700
    try:
        with ProftpdServer(base, posix_rename=False) as server:
            yield server
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_without_posix_rename_a_previous_file_is_deleted_then_the_new_one_renamed(
        tmp_path, proftpd_without_posix_rename):
    server = proftpd_without_posix_rename
    local = server.folder(f"fallback-{os.urandom(3).hex()}")
    (local / "export_1.zip").write_bytes(b"previous")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[{server.host}]:{server.port} {server.host_public_key_line}\n")
    settings = SftpSettings(host=server.host, port=server.port, username=server.username,
                            password=server.password, timeout=10, folder=local.name, known_hosts=known_hosts)
    rejected_before = server.log_text().count(REJECTED_POSIX_RENAME)

    with SftpConnection(settings) as connection:
        connection.upload(io.BytesIO(b"a new file"), "export_2.zip")  # plain rename: no previous file
        assert connection.traits.posix_rename is False  # not offered in the VERSION reply
        connection.upload(io.BytesIO(b"new version"), "export_1.zip")  # refused; delete, then rename
        worker = connection.open_session()
        try:
            worker.upload(io.BytesIO(b"newer version"), "export_1.zip")
        finally:
            worker.close()

    assert sorted(path.name for path in local.iterdir()) == ["export_1.zip", "export_2.zip"]
    assert (local / "export_1.zip").read_bytes() == b"newer version"
    assert (local / "export_2.zip").read_bytes() == b"a new file"
    # not offered in ProFTPD's VERSION reply, so never asked for
    assert server.log_text().count(REJECTED_POSIX_RENAME) == rejected_before
