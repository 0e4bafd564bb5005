"""The apply step (parallel workers, recording, failure isolation) against an in-memory SFTP server.

The middle tier: the real broker emulator over HTTP, real crypto and a real ledger file, but the SFTP
side is a fake kept in a dict, so these tests need no root and can make the server misbehave at will.
"""

from __future__ import annotations

import io
import threading
import zipfile

import pytest
from cryptography.fernet import Fernet

from broker_sftp_uploader.engine.apply import SyncRunner
from broker_sftp_uploader.broker.client import BrokerClient
from broker_sftp_uploader.errors import LedgerError, SftpError
from broker_sftp_uploader.state.ledger import Ledger
from broker_sftp_uploader.engine.plan import DeletionGuard, plan_sync
from test_resources import broker_actors as actors
from tests.conftest import ADMIN_KEY, CLIENT_1


class MemorySession:
    """Stands in for SftpSession: files in a shared dict."""

    def __init__(self, server: MemoryServer):
        self.server = server

    def upload(self, source, name, size=None, progress=None) -> int:
        data = b""
        while chunk := source.read(65536):
            data += chunk
            if progress is not None:
                progress(len(chunk))
        if name in self.server.refuse:
            raise SftpError(f"upload of {name} refused")
        with self.server.lock:
            self.server.files[name] = data
        return len(data)

    def remove(self, name, quiet=False) -> bool:
        with self.server.lock:
            return self.server.files.pop(name, None) is not None

    def remove_leftover_parts(self) -> int:
        return 0

    def close(self) -> None:
        self.server.closed += 1


class MemoryServer:
    """Stands in for SftpConnection."""

    def __init__(self, sessions_allowed: int = 99):
        self.files: dict[str, bytes] = {}
        self.refuse: set[str] = set()
        self.lock = threading.Lock()
        self.sessions_allowed = sessions_allowed
        self.opened = 0
        self.closed = 0
        self.main = MemorySession(self)

    def open_session(self, stop=None) -> MemorySession:
        with self.lock:
            if self.opened >= self.sessions_allowed:
                raise SftpError("the server refused another session")
            self.opened += 1
        return MemorySession(self)

    def upload(self, source, name, size=None) -> int:
        return self.main.upload(source, name, size)

    def remove(self, name, quiet=False) -> bool:
        return self.main.remove(name, quiet)

    def remove_leftover_parts(self) -> int:
        return 0


@pytest.fixture
def published(broker):
    ids = []
    for number in range(6):
        request_id = actors.create_request(broker.url, "rki")
        actors.put_result(broker.url, CLIENT_1, request_id, f"result {number}\n".encode())
        actors.post_status(broker.url, CLIENT_1, request_id, "completed")
        ids.append(str(request_id))
    return ids


def run(broker, tmp_path, server: MemoryServer, workers: int = 4, ledger: Ledger | None = None):
    key = Fernet.generate_key()
    ledger = ledger or Ledger.load(tmp_path / "status.xml")
    with BrokerClient(broker.url, ADMIN_KEY) as client:
        listing = client.get_completions(client.list_tagged_request_ids("rki"))
        plan = plan_sync(listing, ledger.entries(), DeletionGuard())
        report = SyncRunner(client, server, ledger, key, workers=workers).run(plan)
    return report, ledger, key


def test_parallel_uploads_are_isolated_and_recorded_in_order(broker, published, tmp_path):
    server = MemoryServer()
    server.refuse.add(f"export_{published[2]}.zip")
    report, ledger, key = run(broker, tmp_path, server)
    assert sorted(report.uploaded, key=int) == [request_id for request_id in published if request_id != published[2]]
    assert [request_id for request_id, _ in report.failures] == [published[2]]
    assert report.exit_code() == 3
    reloaded = Ledger.load(ledger.path).entries()
    assert list(reloaded) == [request_id for request_id in published if request_id != published[2]]
    token = server.files[f"export_{published[0]}.zip"]
    assert reloaded[published[0]].size == len(token)
    with zipfile.ZipFile(io.BytesIO(Fernet(key).decrypt(token))) as bundle:
        assert bundle.read("0_result.txt") == b"result 0\n"
    assert server.files["status.xml"] == ledger.path.read_bytes()
    assert server.opened == server.closed == 4  # every worker closed its session


def test_refused_sessions_leave_the_work_to_the_main_session(broker, published, tmp_path):
    server = MemoryServer(sessions_allowed=1)
    report, _, _ = run(broker, tmp_path, server, workers=4)
    assert sorted(report.uploaded, key=int) == published and not report.failures


def test_a_ledger_that_cannot_be_saved_stops_the_run(broker, published, tmp_path):
    server = MemoryServer()
    ledger = Ledger.load(tmp_path / "status.xml")

    def broken_save():
        raise LedgerError("cannot save ledger: disk full")

    ledger.save = broken_save
    with pytest.raises(LedgerError, match="disk full"):
        run(broker, tmp_path, server, ledger=ledger)
