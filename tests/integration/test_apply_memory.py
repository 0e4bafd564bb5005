"""The apply step (each action applying itself, parallel workers, recording, failures, cancellation) against
an in-memory SFTP server.

The middle tier: the real broker emulator over HTTP, real crypto and a real ledger file, but the SFTP
side is a fake kept in a dict, so these tests need no root and can make the server misbehave at will.
The fake keeps the real session's contract: it stops between two writes once its stop is set.
"""

from __future__ import annotations

import io
import os
import signal
import threading
import time
import zipfile
from datetime import datetime, timezone

import pytest
from cryptography.fernet import Fernet

from broker_sftp_uploader.broker.client import BrokerClient
from broker_sftp_uploader.engine.apply import Applier, OutOfTime, run_cancellation
from broker_sftp_uploader.engine.plan import Delete, DeletionGuard, Plan, Upload, fetch_completions, plan_sync
from broker_sftp_uploader.errors import LedgerError, SftpError
from broker_sftp_uploader.sftp.session import TransferStopped
from broker_sftp_uploader.state.ledger import Ledger
from test_resources import broker_actors as actors
from test_resources.broker_actors import ADMIN_KEY

# The fake's uploads that wait for their stop; a test that forgets to stop them fails after this long.
HOLD_LIMIT = 60.0


class MemorySession:
    """Stands in for SftpSession: files in a shared dict."""

    def __init__(self, server: MemoryServer, stop=None):
        self.server = server
        self.stop = stop

    def upload(self, source, name, size=None, progress=None) -> int:
        data = b""
        while chunk := source.read(65536):
            if self.stop is not None and self.stop.is_set():
                raise TransferStopped()  # as the real session does between two writes
            data += chunk
            if progress is not None:
                progress(len(chunk))
        self.server.before_store(self, name)
        if name in self.server.refuse:
            raise SftpError(f"upload of {name} refused")
        with self.server.lock:
            self.server.files[name] = data
        self.server.after_store(name)
        return len(data)

    def remove(self, name, quiet=False) -> bool:
        if name in self.server.refuse_removal:
            raise SftpError(f"cannot delete {name}")
        with self.server.lock:
            return self.server.files.pop(name, None) is not None

    def remove_leftover_parts(self) -> int:
        return 0

    def close(self) -> None:
        with self.server.lock:
            self.server.closed += 1


class MemoryServer:
    """Stands in for SftpConnection."""

    def __init__(self, sessions_allowed: int = 99):
        self.files: dict[str, bytes] = {}
        self.refuse: set[str] = set()
        self.refuse_removal: set[str] = set()
        self.hold: set[str] = set()  # uploads that wait until their session is stopped
        self.broken: set[str] = set()  # uploads that hit a bug (not an UploaderError)
        self.lock = threading.Lock()
        self.sessions_allowed = sessions_allowed
        self.opened = 0
        self.closed = 0
        self.stored_hook = None
        self.main = MemorySession(self)

    def open_session(self, stop=None) -> MemorySession:
        with self.lock:
            if self.opened >= self.sessions_allowed:
                raise SftpError("the server refused another session")
            self.opened += 1
        return MemorySession(self, stop)

    def before_store(self, session: MemorySession, name: str) -> None:
        if name in self.broken:
            raise RuntimeError(f"a bug while uploading {name}")
        if name in self.hold:
            waited = time.monotonic() + HOLD_LIMIT
            while not (session.stop is not None and session.stop.is_set()):
                assert time.monotonic() < waited, f"{name} was never stopped"
                time.sleep(0.005)
            raise TransferStopped()

    def after_store(self, name: str) -> None:
        if self.stored_hook is not None and name != "status.xml":
            self.stored_hook(name)

    def upload(self, source, name, size=None) -> int:
        return self.main.upload(source, name, size)

    def remove(self, name, quiet=False) -> bool:
        return self.main.remove(name, quiet)

    def remove_leftover_parts(self) -> int:
        return 0


@pytest.fixture
def published(broker) -> list[str]:
    """Six completed requests on the broker, the result of the n-th ``result n``; returns their ids."""
    return [actors.publish_completed(broker.url, result=f"result {number}\n".encode()) for number in range(6)]


def broker_client_for(broker) -> BrokerClient:
    return BrokerClient(broker.url, ADMIN_KEY, call_timeout=60, export_timeout=600, retries=3, concurrency=32)


def run(broker, tmp_path, server: MemoryServer, workers: int = 4, ledger: Ledger | None = None,
        cancellation=None, plan: Plan | None = None, connect=None, upload_ledger: bool = True):
    key = Fernet.generate_key()
    ledger = ledger or Ledger.load(tmp_path / "status.xml")
    with broker_client_for(broker) as client:
        if plan is None:
            listing = fetch_completions(client, client.list_tagged_request_ids("rki"), 32)
            plan = plan_sync(listing, ledger.entries(), DeletionGuard(allow=True))
        applier = Applier(client, connect or (lambda: server), ledger, key, workers=workers,
                          cancellation=cancellation, upload_ledger=upload_ledger)
        report = applier.run(plan)
    return report, ledger, key


def file_of(request_id: str) -> str:
    return f"export_{request_id}.zip"


def recorded_ids(ledger: Ledger) -> list[str]:
    entries = Ledger.load(ledger.path).entries()
    return [request_id for request_id, entry in entries.items() if not entry.is_deleted]


def test_parallel_uploads_are_isolated_and_recorded_in_order(broker, published, tmp_path):
    server = MemoryServer()
    server.refuse.add(file_of(published[2]))
    report, ledger, key = run(broker, tmp_path, server)
    assert sorted(report.uploaded, key=int) == [request_id for request_id in published if request_id != published[2]]
    assert [request_id for request_id, _ in report.failures] == [published[2]]
    assert report.exit_code() == 3
    reloaded = Ledger.load(ledger.path).entries()
    assert list(reloaded) == [request_id for request_id in published if request_id != published[2]]
    token = server.files[file_of(published[0])]
    assert reloaded[published[0]].size == len(token)
    with zipfile.ZipFile(io.BytesIO(Fernet(key).decrypt(token))) as bundle:
        assert bundle.read("0_result.txt") == b"result 0\n"
    assert server.files["status.xml"] == ledger.path.read_bytes()
    assert 1 <= server.opened <= 4 and server.closed == server.opened  # every worker session was closed


def test_refused_sessions_leave_the_work_to_the_main_session(broker, published, tmp_path):
    server = MemoryServer(sessions_allowed=1)
    report, _, _ = run(broker, tmp_path, server, workers=4)
    assert sorted(report.uploaded, key=int) == published and not report.failures


def test_no_session_at_all_leaves_every_upload_to_the_main_session(broker, published, tmp_path):
    server = MemoryServer(sessions_allowed=0)
    report, ledger, _ = run(broker, tmp_path, server, workers=4)
    assert sorted(report.uploaded, key=int) == published and not report.failures
    assert recorded_ids(ledger) == published
    assert server.opened == server.closed == 0


def test_a_ledger_that_cannot_be_saved_stops_the_run(broker, published, tmp_path):
    server = MemoryServer()
    ledger = Ledger.load(tmp_path / "status.xml")

    def broken_save():
        raise LedgerError("cannot save ledger: disk full")

    ledger.save = broken_save
    with pytest.raises(LedgerError, match="disk full"):
        run(broker, tmp_path, server, ledger=ledger)
    assert server.closed == server.opened


# -- each action applies itself, one at a time on the main session -------------------------------------------


def test_each_action_applies_and_records_itself(broker, published, tmp_path):
    """A deletion removes its file and is recorded deleted; an upload that replaces a file an earlier version
    named otherwise puts the new one in place, records it, and removes the old name."""
    server = MemoryServer()
    ledger = Ledger.load(tmp_path / "status.xml")
    ledger.record_upload("900", "1.0", "export_900.zip", _now(), 10)
    ledger.record_upload(published[0], "0.5", "bundle_old.zip", _now(), 10)
    server.files.update({"export_900.zip": b"x" * 10, "bundle_old.zip": b"y" * 10})
    replacing = Upload(published[0], "1.0", "changed", "0.5", legacy_file="bundle_old.zip")
    plan = Plan(deletes=(Delete("900", "export_900.zip"),), uploads=(replacing,), unchanged=0)
    report, ledger, key = run(broker, tmp_path, server, workers=1, ledger=ledger, plan=plan)
    assert (report.deleted, report.uploaded, report.failures) == (["900"], [published[0]], [])
    assert sorted(server.files) == sorted([file_of(published[0]), "status.xml"])
    entries = Ledger.load(ledger.path).entries()
    assert entries["900"].is_deleted
    replaced = entries[published[0]]
    assert (replaced.completion, replaced.file_name) == ("1.0", file_of(published[0]))
    assert [(result.action, result.reason, result.outcome) for result in report.actions] == [
        ("delete", "vanished", "done"), ("upload", "changed", "done"), ("ledger", None, "done")]


def test_failed_actions_are_reported_and_the_others_go_on(broker, published, tmp_path, caplog):
    server = MemoryServer()
    ledger = Ledger.load(tmp_path / "status.xml")
    ledger.record_upload("900", "1.0", "export_900.zip", _now(), 10)
    ledger.record_upload(published[1], "0.5", "bundle_old.zip", _now(), 10)
    server.refuse_removal.update({"export_900.zip", "bundle_old.zip"})
    server.refuse.add(file_of(published[0]))
    uploads = (Upload(published[0], "1.0", "new"),
               Upload(published[1], "1.0", "changed", "0.5", legacy_file="bundle_old.zip"))
    plan = Plan(deletes=(Delete("900", "export_900.zip"),), uploads=uploads, unchanged=0)
    report, ledger, _ = run(broker, tmp_path, server, workers=1, ledger=ledger, plan=plan)
    assert [request_id for request_id, _ in report.failures] == ["900", published[0]]
    assert report.uploaded == [published[1]] and report.exit_code() == 3
    entries = Ledger.load(ledger.path).entries()
    assert not entries["900"].is_deleted and published[0] not in entries
    assert entries[published[1]].file_name == file_of(published[1])
    # The old name could not be removed: only a warning, the new file is in place and recorded.
    assert "could not remove bundle_old.zip" in caplog.text


def test_the_ledger_copy_is_uploaded_only_when_the_ledger_differs(broker, published, tmp_path):
    server = MemoryServer()
    report, ledger, _ = run(broker, tmp_path, server, workers=1)
    assert report.ledger_uploaded and server.files["status.xml"] == ledger.path.read_bytes()
    del server.files["status.xml"]
    again, _, _ = run(broker, tmp_path, server, workers=1, ledger=Ledger.load(ledger.path))
    assert not again.actions and "status.xml" not in server.files  # unchanged since the last copy
    (tmp_path / "status.xml.uploaded-sha256").write_text("0" * 64 + "\n")
    third, _, _ = run(broker, tmp_path, server, workers=1, ledger=Ledger.load(ledger.path))
    assert third.ledger_uploaded and server.files["status.xml"] == ledger.path.read_bytes()


def test_no_ledger_copy_when_switched_off(broker, published, tmp_path):
    server = MemoryServer()
    report, _, _ = run(broker, tmp_path, server, workers=1, upload_ledger=False)
    assert len(report.uploaded) == 6 and not report.ledger_uploaded and "status.xml" not in server.files


# -- cancellation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 4])
def test_past_the_time_limit_every_action_fails_and_the_run_reports(broker, published, tmp_path, workers):
    server = MemoryServer()
    past = run_cancellation(time.monotonic() - 1)
    report, ledger, _ = run(broker, tmp_path, server, workers=workers, cancellation=past)
    assert report.uploaded == []
    assert sorted(request_id for request_id, _ in report.failures) == sorted(published)
    assert all(isinstance(error, OutOfTime) for _, error in report.failures)
    assert "time limit (MISC.RUN_TIMEOUT)" in str(report.failures[0][1])
    assert server.files == {} and not ledger.path.exists()


def test_reaching_the_time_limit_during_parallel_uploads_fails_the_rest_and_keeps_the_done(broker, published,
                                                                                          tmp_path):
    """Once the limit passes, the uploads in flight stop between writes and the rest do not start: all fail
    with the time limit, the completed ones stay recorded, and the run ends with its report."""
    server = MemoryServer()
    cancellation = run_cancellation(None)
    slow = {file_of(request_id) for request_id in published[3:]}
    server.hold.update(slow)
    stored = []

    def after(name):
        stored.append(name)
        if len(stored) == 2:
            cancellation.cancel(OutOfTime())  # as the deadline does when somebody looks after it passed

    server.stored_hook = after
    # One session more than the held uploads: whichever downloads end first, two uploads can complete.
    report, ledger, _ = run(broker, tmp_path, server, workers=len(slow) + 1, cancellation=cancellation)
    done = sorted(report.uploaded, key=int)
    # Two completed before the limit; one more may have been past its last write when it came.
    assert len(done) >= 2 and set(map(file_of, done)) == set(stored)
    failed = sorted((request_id for request_id, _ in report.failures), key=int)
    assert sorted(done + failed, key=int) == published
    assert all(isinstance(error, OutOfTime) for _, error in report.failures)
    assert recorded_ids(ledger) == done
    assert not slow & set(server.files)
    assert server.closed == server.opened


def test_an_interrupt_stops_the_workers_and_records_what_completed(broker, published, tmp_path,
                                                                   signal_handlers):
    """SIGTERM while two uploads are in flight: they stop between writes (no file), the four that completed
    are in the ledger, every session is closed, and the interrupt goes on."""
    server = MemoryServer()
    slow = {file_of(request_id) for request_id in published[:2]}
    server.hold.update(slow)
    stored = []

    def after(name):
        stored.append(name)
        if len(stored) == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # reaches the main thread, which is waiting for the workers

    server.stored_hook = after
    ledger = Ledger.load(tmp_path / "status.xml")
    with pytest.raises(KeyboardInterrupt):
        run(broker, tmp_path, server, workers=4, ledger=ledger)
    assert recorded_ids(ledger) == published[2:]
    assert sorted(server.files) == sorted(map(file_of, published[2:]))
    assert server.closed == server.opened


def test_a_bug_in_a_worker_stops_the_others_and_goes_out(broker, published, tmp_path):
    server = MemoryServer()
    server.broken.add(file_of(published[0]))
    server.hold.update(file_of(request_id) for request_id in published[1:3])
    ledger = Ledger.load(tmp_path / "status.xml")
    with pytest.raises(RuntimeError, match="a bug while uploading"):
        run(broker, tmp_path, server, workers=3, ledger=ledger)
    on_server = {name for name in server.files if name != "status.xml"}
    assert {file_of(request_id) for request_id in recorded_ids(ledger)} == on_server
    assert not {file_of(request_id) for request_id in published[:3]} & on_server
    assert server.closed == server.opened


def test_a_failed_login_stops_the_parallel_uploads_before_anything_is_uploaded(broker, published, tmp_path):
    server = MemoryServer()

    def refused():
        raise SftpError("SFTP login as x@y:22 was refused")

    ledger = Ledger.load(tmp_path / "status.xml")
    with pytest.raises(SftpError, match="refused"):
        run(broker, tmp_path, server, workers=4, ledger=ledger, connect=refused)
    assert server.files == {} and server.opened == 0 and not ledger.path.exists()


def _now() -> datetime:
    return datetime.now(timezone.utc)


# -- a cancellation cuts the broker calls the workers are blocked in, so no thread outlives the run ----------
# (pool threads are joined when the interpreter exits: one left blocked would keep an interrupted run alive)


def interrupt_once_received(broker, method: str, path_end: str, count: int) -> threading.Thread:
    """A helper thread that sends this process SIGTERM once the broker received ``count`` such calls."""

    def interrupt() -> None:
        waited = time.monotonic() + HOLD_LIMIT
        while sum(1 for call in list(broker.requests_log)
                  if call.method == method and call.path.endswith(path_end)) < count:
            assert time.monotonic() < waited, "the calls never reached the broker"
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    helper = threading.Thread(target=interrupt, daemon=True)
    helper.start()
    return helper


def pool_threads_left(prefix: str) -> list[str]:
    """The names of the pool threads still alive a while after their work was cancelled (an idle pool thread
    takes a moment to end; one blocked in a call that was not cut stays)."""
    threads = [thread for thread in threading.enumerate() if thread.name.startswith(prefix)]
    for thread in threads:
        thread.join(HOLD_LIMIT / len(threads))
    return [thread.name for thread in threads if thread.is_alive()]


def test_an_interrupt_cuts_the_exports_in_flight(broker, published, tmp_path, signal_handlers):
    broker.inject_fault("POST", r"/export/", delay=600.0, times=10)  # a broker building huge bundles
    server = MemoryServer()
    cancellation = run_cancellation(None)
    plan = Plan((), tuple(Upload(request_id, "1.0", "new") for request_id in published[:2]), 0)
    helper = interrupt_once_received(broker, "POST", published[1], 1)
    with broker_client_for(broker) as client:
        cancellation.on_cancel(client.close)  # as run_sync does
        applier = Applier(client, lambda: server, Ledger.load(tmp_path / "status.xml"), Fernet.generate_key(),
                          workers=2, cancellation=cancellation)
        with pytest.raises(KeyboardInterrupt):
            applier.run(plan)
    helper.join()
    assert pool_threads_left("upload") == [] and server.files == {}


def test_an_interrupt_cuts_the_status_calls_in_flight(broker, published, signal_handlers):
    broker.inject_fault("GET", r"/status$", delay=600.0, times=10)  # a broker that stopped answering
    cancellation = run_cancellation(None)
    helper = interrupt_once_received(broker, "GET", "/status", len(published))
    with broker_client_for(broker) as client:
        cancellation.on_cancel(client.close)  # as run_sync does
        with pytest.raises(KeyboardInterrupt):
            fetch_completions(client, published, 32, cancellation)
    helper.join()
    assert pool_threads_left("status") == []
