"""Carrying out a plan: deletions, then uploads (several at once), then the ledger copy on the server.

Each upload is one stream: broker download -> Fernet encryption -> SFTP upload, with bounded buffers;
nothing is held whole in memory and nothing is written to the local disk. With ``workers`` > 1,
that many uploads run at once, each in a thread with its own SFTP session (a channel of the one SSH
connection) and its own keep-alive broker connection.

Every completed action is recorded in the ledger, and the ledger saved, by the main thread alone, as
soon as the action completes: a crash loses at most the actions in flight, which the next run repeats
(their partial files are in the journal). An interrupt (Ctrl-C, SIGTERM) stops the workers between
two SFTP writes; each removes its partial file, and the actions completed meanwhile are recorded
before the interrupt goes on.
"""

from __future__ import annotations

import hashlib
import io
import logging
import queue
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from broker_sftp_uploader.state.atomic import atomic_write
from broker_sftp_uploader.broker.client import BrokerClient
from broker_sftp_uploader.crypto import EncryptingReader, encrypted_size
from broker_sftp_uploader.errors import BrokerError, LedgerError, UploaderError
from broker_sftp_uploader.state.ledger import Ledger
from broker_sftp_uploader.engine.prefetch import Prefetcher
from broker_sftp_uploader.engine.progress import Progress
from broker_sftp_uploader.engine.report import ActionResult, Report
from broker_sftp_uploader.engine.plan import (
    LEDGER_REMOTE_NAME,
    Delete,
    Plan,
    Upload,
    ledger_digest_path,
    ledger_needs_upload,
)

if TYPE_CHECKING:  # sftp (paramiko) is imported only by a run that connects
    from broker_sftp_uploader.sftp.connection import SftpConnection
    from broker_sftp_uploader.sftp.session import SftpSession

logger = logging.getLogger(__name__)

# After an interrupt, how long the workers get to stop and remove their partial files.
STOP_GRACE = 30.0
# Below this size a result is read and sent in a few pieces: a read-ahead thread would cost more than
# the overlap it buys.
SMALL_RESULT = 4 * 1024 * 1024


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class _Stopped(Exception):
    """A worker gave up an action because the run is being interrupted."""


class _NoSession(Exception):
    """The server refused a worker another SFTP session (e.g. OpenSSH's MaxSessions)."""

    def __init__(self, error: UploaderError):
        super().__init__(str(error))
        self.error = error


class SyncRunner:
    """Applies a plan with a broker client, an open SFTP connection and the ledger."""

    def __init__(self, broker: BrokerClient, sftp: SftpConnection, ledger: Ledger, key: bytes,
                 upload_ledger: bool = True, now: Callable[[], datetime] = _utc_now,
                 deadline: float | None = None, workers: int = 1, progress: Progress | None = None):
        self.deadline = deadline
        self.progress = progress or Progress()
        self.broker = broker
        self.sftp = sftp
        self.ledger = ledger
        self.key = key
        self.upload_ledger = upload_ledger
        self.now = now
        self.workers = workers

    def run(self, plan: Plan, connected: Callable[[], None] = lambda: None) -> Report:
        """Do every action of ``plan``, recording each; then upload the ledger if it changed.

        ``connected`` waits until the SFTP connection is up (raising what connecting raised): parallel
        uploads start their exports before that, so the login and the broker's work overlap.

        :raises LedgerError: the ledger cannot be saved (the run stops: nothing more can be recorded).
        :raises UploaderError: what ``connected`` raised.
        """
        report = Report(unchanged=plan.unchanged, refusal=plan.refusal())
        report.actions.extend(ActionResult(action.request_id, "delete", "vanished", "refused",
                                           error="mass-deletion guard") for action in plan.refused)
        if self.workers > 1 and len(plan.uploads) > 1:
            self._upload_in_parallel(plan, report, connected)
        else:
            self._before_uploads(plan, report, connected)
            for action in plan.uploads:
                self._attempt(report, action, lambda action=action: self._finish_upload(
                    action, self._upload(lambda: self.sftp.main, action)))
        if self.upload_ledger and self.ledger_needs_upload():
            started = time.monotonic()
            try:
                size = self._upload_ledger()
                report.ledger_uploaded = True
                report.actions.append(ActionResult(None, "ledger", None, "done", size, time.monotonic() - started))
            except UploaderError as error:
                logger.error("ledger upload: %s", error)
                report.failures.append((LEDGER_REMOTE_NAME, error))
                report.actions.append(ActionResult(None, "ledger", None, "failed",
                                                   seconds=time.monotonic() - started, error=str(error)))
        return report

    def _before_uploads(self, plan: Plan, report: Report, connected: Callable[[], None]) -> None:
        """Main thread: wait for the connection, remove a killed run's partial files, delete."""
        connected()
        self.sftp.remove_leftover_parts()
        for action in plan.deletes:
            self._attempt(report, action, lambda action=action: self._delete(action))

    def _out_of_time(self) -> BrokerError | None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return BrokerError("the run reached its time limit (MISC.RUN_TIMEOUT) before this action; "
                               "the next run does it")
        return None

    def _attempt(self, report: Report, action: Delete | Upload, work: Callable[[], int | None]) -> None:
        """Run one action in this thread and note its outcome in ``report``."""
        started = time.monotonic()
        try:
            late = self._out_of_time()
            if late is not None:
                raise late
            size = work()
        except UploaderError as error:
            if isinstance(error, LedgerError):  # nothing more could be recorded
                raise
            self._failed(report, action, error, time.monotonic() - started)
            return
        self._done(report, action, size or 0, time.monotonic() - started)

    @staticmethod
    def _done(report: Report, action: Delete | Upload, size: int, seconds: float) -> None:
        is_delete = isinstance(action, Delete)
        (report.deleted if is_delete else report.uploaded).append(action.request_id)
        report.actions.append(ActionResult(action.request_id, "delete" if is_delete else "upload",
                                           "vanished" if is_delete else action.reason, "done", size, seconds))

    @staticmethod
    def _failed(report: Report, action: Delete | Upload, error: UploaderError, seconds: float = 0.0) -> None:
        logger.error("request %s: %s", action.request_id, error)
        report.failures.append((action.request_id, error))
        is_delete = isinstance(action, Delete)
        report.actions.append(ActionResult(action.request_id, "delete" if is_delete else "upload",
                                           "vanished" if is_delete else action.reason, "failed",
                                           seconds=seconds, error=str(error)))

    def _delete(self, action: Delete) -> None:
        logger.info("%s", action.describe())
        self.sftp.remove(action.remote_name)
        self.ledger.record_deletion(action.request_id, self.now())
        self.ledger.save()

    def _upload(self, session_for_upload: Callable[[], SftpSession], action: Upload) -> int:
        """Export, download, encrypt and upload one request's result; return the bytes uploaded.

        ``session_for_upload`` is asked once the download has started (it may wait for the login).
        """
        logger.info("%s", action.describe())
        with self.broker.open_result(action.request_id) as result:
            session = session_for_upload()
            encrypting = EncryptingReader(result, self.key)
            size = encrypted_size(result.size) if result.size is not None else None
            transfer = self.progress.start(action.file_name, size)
            try:
                if size is not None and size <= SMALL_RESULT:
                    uploaded = session.upload(encrypting, action.file_name, size, transfer.advance)
                else:
                    with Prefetcher(encrypting) as token:
                        uploaded = session.upload(token, action.file_name, size, transfer.advance)
            finally:
                self.progress.finish(transfer)
            logger.debug("request %s: %d bytes uploaded encrypted as %s", action.request_id,
                         encrypting.plain_bytes_read, action.file_name)
        return uploaded

    def _finish_upload(self, action: Upload, uploaded: int) -> int:
        """Record a completed upload and save the ledger (main thread only); then retire an earlier
        version's file name. Returns ``uploaded``."""
        self.ledger.record_upload(action.request_id, action.completion, action.file_name, self.now(), uploaded)
        self.ledger.save()
        self._retire_legacy_name(action)
        return uploaded

    def _retire_legacy_name(self, action: Upload) -> None:
        if action.legacy_file is not None:
            try:
                self.sftp.remove(action.legacy_file)
                logger.info("removed %s, the name an earlier version used for request %s",
                            action.legacy_file, action.request_id)
            except UploaderError as error:
                logger.warning("could not remove %s, the old file of request %s (%s); delete it by hand",
                               action.legacy_file, action.request_id, error)

    def _upload_in_parallel(self, plan: Plan, report: Report, connected: Callable[[], None]) -> None:
        """Run the uploads on ``workers`` threads; record each outcome here, as it arrives.

        The workers start at once; the main thread meanwhile waits for the connection and does the
        deletions. A worker opens its SFTP session when its first download has begun.
        """
        from broker_sftp_uploader.sftp.session import TransferStopped

        uploads = plan.uploads
        stop = threading.Event()
        todo: queue.SimpleQueue[Upload] = queue.SimpleQueue()
        for action in uploads:
            todo.put(action)
        outcomes: queue.SimpleQueue[tuple[Upload, int | BaseException, float] | None] = queue.SimpleQueue()

        def work() -> None:
            sessions: list[SftpSession] = []

            def session_for_upload() -> SftpSession:
                if not sessions:
                    connected()
                    try:
                        sessions.append(self.sftp.open_session(stop))
                    except UploaderError as error:
                        raise _NoSession(error) from None
                return sessions[0]

            try:
                while not stop.is_set():
                    try:
                        action = todo.get_nowait()
                    except queue.Empty:
                        break
                    started = time.monotonic()
                    try:
                        late = self._out_of_time()
                        if late is not None:
                            raise late
                        size = self._upload(session_for_upload, action)
                        outcomes.put((action, size, time.monotonic() - started))
                    except TransferStopped:
                        outcomes.put((action, _Stopped(), 0.0))
                    except _NoSession as refused:  # the main session takes this one over at the end
                        logger.warning("%s; fewer uploads run at once", refused.error)
                        todo.put(action)
                        break
                    except BaseException as error:  # noqa: BLE001 - judged by the main thread
                        outcomes.put((action, error, time.monotonic() - started))
            finally:
                for session in sessions:
                    session.close()
                outcomes.put(None)

        count = min(self.workers, len(uploads))
        threads = [threading.Thread(target=work, name=f"upload-{number}", daemon=True) for number in range(count)]
        for thread in threads:
            thread.start()
        running = count
        try:
            self._before_uploads(plan, report, connected)
            while running:
                # Whatever completed meanwhile is recorded with a single save of the ledger.
                batch = [outcomes.get()]
                while True:
                    try:
                        batch.append(outcomes.get_nowait())
                    except queue.Empty:
                        break
                running -= batch.count(None)
                self._judge_all(report, [outcome for outcome in batch if outcome is not None])
        except BaseException:
            stop.set()
            self.broker.close()  # cuts downloads that a worker is waiting on
            deadline = time.monotonic() + STOP_GRACE
            for thread in threads:
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
            while True:  # record what completed meanwhile: only the actions in flight are lost
                try:
                    outcome = outcomes.get_nowait()
                except queue.Empty:
                    break
                if outcome is not None and isinstance(outcome[1], int):
                    self._judge_all(report, [outcome])
            raise
        # Sessions that could not be opened leave actions behind: the main session does them.
        while True:
            try:
                action = todo.get_nowait()
            except queue.Empty:
                break
            self._attempt(report, action, lambda action=action: self._finish_upload(
                action, self._upload(lambda: self.sftp.main, action)))

    def _judge_all(self, report: Report, outcomes: list[tuple[Upload, int | BaseException, float]]) -> None:
        """Record the completed uploads among ``outcomes`` (one ledger save), report the failures."""
        completed = []
        for action, outcome, seconds in outcomes:
            if isinstance(outcome, int):
                self.ledger.record_upload(action.request_id, action.completion, action.file_name, self.now(),
                                          outcome)
                completed.append((action, outcome, seconds))
            elif isinstance(outcome, _Stopped):
                continue
            elif isinstance(outcome, LedgerError):
                raise outcome
            elif isinstance(outcome, UploaderError):
                self._failed(report, action, outcome, seconds)
            else:
                raise outcome  # a bug in a worker: let its traceback out
        if not completed:
            return
        self.ledger.save()
        for action, size, seconds in completed:
            self._done(report, action, size, seconds)
            self._retire_legacy_name(action)

    def digest_path(self) -> Path:
        return ledger_digest_path(self.ledger.path)

    def ledger_needs_upload(self) -> bool:
        """True when the server's copy of the ledger may differ from the local one."""
        return ledger_needs_upload(self.ledger.path)

    def _upload_ledger(self) -> int:
        content = self.ledger.path.read_bytes()
        self.sftp.upload(io.BytesIO(content), LEDGER_REMOTE_NAME, len(content))
        with atomic_write(self.digest_path(), mode=0o644) as handle:
            handle.write(hashlib.sha256(content).hexdigest().encode("ascii") + b"\n")
        logger.info("uploaded the ledger as %s", LEDGER_REMOTE_NAME)
        return len(content)
