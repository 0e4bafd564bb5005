"""Carrying out a plan: deletions, then uploads (several at once), then the ledger copy on the server.

Each upload is one stream: broker download -> Fernet encryption -> SFTP upload, with bounded buffers;
nothing but a small result (``IN_MEMORY_RESULT``) is held whole in memory and nothing is written to the
local disk. With ``workers`` > 1, that many uploads run at once on a thread pool (``concurrency.Workers``),
each on an SFTP session of its own (a channel of the one SSH connection) and its own keep-alive broker
connection, while up to ``EXPORTS_PER_SESSION`` times as many exports and downloads of small results run
ahead of them.

Every action applies itself at a ``Site`` (``plan.py``) in whichever thread runs it; its outcome is
recorded in the ledger, and the ledger saved, by the main thread alone, as soon as the action
completes: a crash loses at most the actions in flight, which the next run repeats (their partial
files are in the journal). The run's ``Cancellation`` stops the workers between two SFTP writes, each
removing its partial file: an interrupt (Ctrl-C, SIGTERM) or a worker's failure stops the run, and
the actions completed meanwhile are recorded before it goes on; the run's time limit makes every
action not done by then fail, and the run ends normally with its report.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, BinaryIO

from broker_sftp_uploader.broker.client import BrokerClient
from broker_sftp_uploader.concurrency import Cancellation, Cancelled, Workers
from broker_sftp_uploader.crypto import EncryptingReader, encrypted_size
from broker_sftp_uploader.engine.plan import (
    LEDGER_REMOTE_NAME,
    Delete,
    Plan,
    Upload,
    ledger_copy_due,
    ledger_digest_path,
)
from broker_sftp_uploader.engine.prefetch import Prefetcher
from broker_sftp_uploader.engine.progress import Progress
from broker_sftp_uploader.engine.report import ActionResult, Report
from broker_sftp_uploader.errors import BrokerError, LedgerError, UploaderError
from broker_sftp_uploader.state.atomic import atomic_write
from broker_sftp_uploader.state.ledger import Ledger

if TYPE_CHECKING:  # sftp (paramiko) is imported only by a run that connects
    from broker_sftp_uploader.sftp.connection import SftpConnection
    from broker_sftp_uploader.sftp.session import SftpSession

logger = logging.getLogger(__name__)

# Below this size a result is read and sent in a few pieces: a read-ahead thread would cost more than
# the overlap it buys.
SMALL_RESULT = 4 * 1024 * 1024
# A result up to this size is downloaded and encrypted whole before its upload takes an SFTP session, so
# that more results are exported at once than there are sessions: a first run over many small results
# waits mostly for the broker (an export and a download, two round trips each), not for the SFTP server.
# Memory: this much and its token (a third more) per worker, at most.
IN_MEMORY_RESULT = 256 * 1024
EXPORTS_PER_SESSION = 3  # upload workers per SFTP session, within BROKER.CONCURRENCY
# A larger result's download starts again once its session is free (the broker would drop a download
# left waiting that long); its link lives 10 minutes from the export, so an older one is exported anew.
LINK_REUSE = 5 * 60.0


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class OutOfTime(BrokerError):
    """The run reached MISC.RUN_TIMEOUT: what was not done by then fails, and the next run does it."""

    def __init__(self) -> None:
        super().__init__("the run reached its time limit (MISC.RUN_TIMEOUT) before this action; "
                         "the next run does it")


def run_cancellation(deadline: float | None) -> Cancellation:
    """The cancellation of a run that must end by ``deadline`` (a ``time.monotonic()`` value; None: never),
    which counts as cancelled with ``OutOfTime`` from then on."""
    return Cancellation(deadline, expired=OutOfTime)


class _NoSession(Exception):
    """The server gave the upload workers no SFTP session at all (e.g. OpenSSH's MaxSessions)."""


@dataclass(frozen=True)
class _Outcome:
    """How one action went, for the main thread to record.

    ``state``: ``done`` (``size`` bytes), ``failed`` (``error``), ``stopped`` by the run's cancellation
    (the run is ending: nothing to record), or ``deferred`` to the main session (no session for a worker).
    """

    action: Delete | Upload
    state: str
    size: int = 0
    seconds: float = 0.0
    error: UploaderError | None = None


class Applier:
    """Applies a plan with a broker client, the SFTP connection and the ledger (see ``run``).

    :param connect: returns the logged-in SFTP connection, waiting for the login if it runs in the
        background (parallel uploads start their exports before that, so login and exports overlap).
    :param cancellation: the run's (see ``run_cancellation``); the default never cancels by itself.
    """

    def __init__(self, broker: BrokerClient, connect: Callable[[], SftpConnection], ledger: Ledger,
                 key: bytes, *, upload_ledger: bool = True, workers: int = 1,
                 progress: Progress | None = None, cancellation: Cancellation | None = None,
                 now: Callable[[], datetime] = _utc_now):
        self.broker = broker
        self.connect = connect
        self.ledger = ledger
        self.key = key
        self.upload_ledger = upload_ledger
        self.workers = workers
        self.progress = progress or Progress()
        self.cancellation = cancellation or run_cancellation(None)
        self.now = now
        self._connection: SftpConnection | None = None  # once logged in
        self._main: _Site | None = None  # the main session's site, once logged in

    def run(self, plan: Plan) -> Report:
        """Do every action of ``plan``, recording each; then upload the ledger copy if it is due.

        :raises LedgerError: the ledger cannot be saved (the run stops: nothing more can be recorded).
        :raises UploaderError: the SFTP login failed.
        :raises BaseException: an interrupt, or a worker's bug, after the completed actions were recorded.
        """
        report = Report(unchanged=plan.unchanged, refusal=plan.refusal())
        report.actions.extend(ActionResult(action.request_id, action.kind, action.reason, "refused",
                                           error="mass-deletion guard") for action in plan.refused)
        if self.workers > 1 and len(plan.uploads) > 1:
            self._apply_in_parallel(plan, report)
        else:
            self._apply_one_at_a_time(plan, report)
        if ledger_copy_due(self.upload_ledger, self.ledger.path):
            self._upload_ledger_copy(report)
        return report

    def _apply_one_at_a_time(self, plan: Plan, report: Report) -> None:
        """Everything in this thread on the main session."""
        main = self._connect()
        for action in plan.actions:
            self._record(report, [self._attempt(action, main)])

    def _apply_in_parallel(self, plan: Plan, report: Report) -> None:
        """The uploads on up to ``workers`` threads; meanwhile this thread waits for the login, deletes,
        then records the uploads as they complete (one ledger save for all completed meanwhile).

        A worker takes an SFTP session once its download has begun, so the exports overlap the login.
        """
        sessions = _Sessions(self.cancellation, limit=self.workers)
        in_worker = _Site(self, sessions.lend)
        exports = max(self.workers, min(self.workers * EXPORTS_PER_SESSION, self.broker.concurrency))
        uploads = Workers(lambda action: self._attempt(action, in_worker), plan.uploads, exports,
                          self.cancellation, name="upload")
        deferred: list[Upload] = []
        try:
            with sessions, uploads:  # leaving by an exception cancels the uploads and waits for them a while
                main = self._connect()
                sessions.serve(self._connection)
                for action in plan.deletes:
                    self._record(report, [self._attempt(action, main)])
                for batch in uploads.batches():
                    self._record(report, batch)
                    deferred += [outcome.action for outcome in batch if outcome.state == "deferred"]
        except LedgerError:
            raise  # nothing more can be recorded
        except BaseException:
            # Record what completed meanwhile: only the uploads in flight are lost. (A batch whose recording
            # the interrupt cut short comes again: recording an upload twice changes nothing.) The failures
            # are not told: most are downloads the stop itself cut.
            completed = [outcome for outcome in uploads.arrived_meanwhile() if outcome.state == "done"]
            self._record(report, completed)
            raise
        reason = self.cancellation.reason
        if reason is not None and not isinstance(reason, OutOfTime):
            raise reason  # a worker's bug: its traceback goes out
        # Left for want of a worker session, or not started before the time limit (then they fail here).
        for action in sorted(deferred + uploads.not_started(), key=lambda upload: int(upload.request_id)):
            self._record(report, [self._attempt(action, main)])

    def _connect(self) -> _Site:
        """Wait for the login, remove the partial files a killed run left; return the main session's site."""
        connection = self._connection = self.connect()
        connection.remove_leftover_parts()
        self._main = _Site(self, lambda: contextlib.nullcontext(connection.main))
        return self._main

    def _attempt(self, action: Delete | Upload, site: _Site) -> _Outcome:
        """Apply ``action`` at ``site`` unless the run is being cancelled (any thread); return its outcome."""
        started = time.monotonic()
        try:
            self.cancellation.check()
            size = action.apply(site)
        except Cancelled:
            reason = self.cancellation.reason
            if isinstance(reason, OutOfTime):
                return _Outcome(action, "failed", seconds=time.monotonic() - started, error=reason)
            return _Outcome(action, "stopped")
        except _NoSession:
            return _Outcome(action, "deferred")
        except UploaderError as error:
            return _Outcome(action, "failed", seconds=time.monotonic() - started, error=error)
        return _Outcome(action, "done", size, time.monotonic() - started)

    def _record(self, report: Report, outcomes: list[_Outcome]) -> None:
        """Main thread: record the completed actions among ``outcomes`` with one ledger save, then note
        every outcome in ``report`` (and tidy up after the completed uploads).

        :raises LedgerError: the ledger cannot be saved.
        """
        done = [outcome for outcome in outcomes if outcome.state == "done"]
        for outcome in done:
            outcome.action.record(self.ledger, self.now(), outcome.size)
        if done:
            self.ledger.save()
        for outcome in outcomes:
            action = outcome.action
            if outcome.state == "done":
                (report.deleted if action.kind == "delete" else report.uploaded).append(action.request_id)
                report.actions.append(ActionResult(action.request_id, action.kind, action.reason, "done",
                                                   outcome.size, outcome.seconds))
                assert self._main is not None  # an action completed, so the login did
                action.tidy_up(self._main)
            elif outcome.state == "failed":
                assert outcome.error is not None
                logger.error("request %s: %s", action.request_id, outcome.error)
                report.failures.append((action.request_id, outcome.error))
                report.actions.append(ActionResult(action.request_id, action.kind, action.reason, "failed",
                                                   seconds=outcome.seconds, error=str(outcome.error)))

    def _upload_ledger_copy(self, report: Report) -> None:
        """Upload the ledger as ``status.xml`` and remember its digest; a failure is reported, not raised."""
        started = time.monotonic()
        try:
            content = self.ledger.path.read_bytes()
            self._connection.upload(io.BytesIO(content), LEDGER_REMOTE_NAME, len(content))
            with atomic_write(ledger_digest_path(self.ledger.path), mode=0o644) as handle:
                handle.write(hashlib.sha256(content).hexdigest().encode("ascii") + b"\n")
        except UploaderError as error:
            logger.error("ledger upload: %s", error)
            report.failures.append((LEDGER_REMOTE_NAME, error))
            report.actions.append(ActionResult(None, "ledger", None, "failed",
                                               seconds=time.monotonic() - started, error=str(error)))
            return
        logger.info("uploaded the ledger as %s", LEDGER_REMOTE_NAME)
        report.ledger_uploaded = True
        report.actions.append(ActionResult(None, "ledger", None, "done", len(content),
                                           time.monotonic() - started))


class _Site:
    """Where actions apply themselves: the broker's results, and an SFTP session from ``session()``."""

    def __init__(self, applier: Applier,
                 session: Callable[[], contextlib.AbstractContextManager[SftpSession]]):
        self._applier = applier
        self._session = session

    def remove(self, name: str, quiet: bool = False) -> bool:
        """``SftpSession.remove`` on this site's session."""
        with self._session() as session:
            return session.remove(name, quiet)

    def send_result(self, request_id: str, file_name: str) -> int:
        """Export, download, encrypt and upload one request's result; return the bytes uploaded.

        The session is taken once the download has begun (a worker's may wait for the login or for a
        free session): a result of up to ``IN_MEMORY_RESULT`` is read and encrypted whole before; a larger
        one is downloaded again, from the same link, once the session is there.
        """
        broker = self._applier.broker
        link = broker.export_result(request_id)
        exported = time.monotonic()
        with broker.open_download(request_id, link) as result:
            token = None
            if result.size is not None and result.size <= IN_MEMORY_RESULT:
                token = EncryptingReader(result, self._applier.key).read()
        with self._session() as session:
            if token is not None:
                return self._upload(session, request_id, file_name, io.BytesIO(token), len(token))
            if time.monotonic() - exported > LINK_REUSE:
                link = broker.export_result(request_id)
            with broker.open_download(request_id, link) as result:
                encrypting = EncryptingReader(result, self._applier.key)
                size = encrypted_size(result.size) if result.size is not None else None
                if size is not None and size <= SMALL_RESULT:
                    return self._upload(session, request_id, file_name, encrypting, size)
                # Pieces of one SFTP write each: the writer takes them as they are, copying nothing.
                with Prefetcher(encrypting, piece_size=session.write_size) as token_stream:
                    return self._upload(session, request_id, file_name, token_stream, size)

    def _upload(self, session: SftpSession, request_id: str, file_name: str, token: BinaryIO,
                size: int | None) -> int:
        """Upload ``token`` (``size`` bytes, None: unknown) as ``file_name``; return the bytes uploaded."""
        from broker_sftp_uploader.sftp.session import TransferStopped  # loaded with the connection

        applier = self._applier
        transfer = applier.progress.start(file_name, size)
        try:
            uploaded = session.upload(token, file_name, size, transfer.advance)
        except TransferStopped:  # the session's stop is the run's cancellation
            raise Cancelled(applier.cancellation.reason) from None
        finally:
            applier.progress.finish(transfer)
        logger.debug("request %s: %d bytes uploaded encrypted as %s", request_id, uploaded, file_name)
        return uploaded


class _Sessions:
    """SFTP sessions for the upload workers, opened as needed (up to ``limit``) once the login is done and
    lent one per upload.

    A server may refuse more sessions (OpenSSH's MaxSessions): then fewer uploads run at once, sharing
    the sessions it gave; if it gave none, every upload is left to the main session (``_NoSession``).
    """

    def __init__(self, cancellation: Cancellation, limit: int):
        self._cancellation = cancellation
        self._limit = limit  # sessions opened at most
        self._connection: SftpConnection | None = None
        self._idle: list[SftpSession] = []
        self._opened: list[SftpSession] = []
        self._opening = 0
        self._refused = False
        self._changed = threading.Condition()
        cancellation.on_cancel(self._wake)

    def serve(self, connection: SftpConnection) -> None:
        """The login is done: open sessions on ``connection`` for the workers waiting for one."""
        with self._changed:
            self._connection = connection
            self._changed.notify_all()

    @contextlib.contextmanager
    def lend(self) -> Iterator[SftpSession]:
        """A session for one upload.

        :raises Cancelled: the run was cancelled while waiting for one.
        :raises _NoSession: the server gave none.
        """
        session = self._take()
        try:
            yield session
        finally:
            with self._changed:
                self._idle.append(session)
                self._changed.notify()

    def _take(self) -> SftpSession:
        while True:
            with self._changed:
                while True:
                    self._cancellation.check()
                    if self._idle:
                        return self._idle.pop()
                    if self._connection is not None and not self._refused and \
                            len(self._opened) + self._opening < self._limit:
                        self._opening += 1
                        connection = self._connection
                        break
                    if self._refused and not self._opened and not self._opening:
                        raise _NoSession()
                    self._changed.wait()
            try:
                session = connection.open_session(self._cancellation)  # stops between writes once cancelled
            except UploaderError as error:
                with self._changed:
                    self._opening -= 1
                    if not self._refused:
                        logger.warning("%s; fewer uploads run at once", error)
                    self._refused = True
                    self._changed.notify_all()
                continue
            with self._changed:
                self._opening -= 1
                self._opened.append(session)
                self._changed.notify_all()
            return session

    def _wake(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def __enter__(self) -> _Sessions:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close every session opened (those of workers still stuck after a cancellation too)."""
        with self._changed:
            opened, self._opened, self._idle = self._opened, [], []
        for session in opened:
            session.close()
