"""The ``sync`` command's work, from a validated config to a report: lock, keys, ledger, broker, SFTP.

Order of the checks decides which failure an operator sees first: config (by the caller), lock,
keys (Fernet, SSH), ledger, broker, SFTP. Nothing is written anywhere before the broker has answered.
``execute_sync`` wraps a run for the CLI: it times it, and leaves its JSON report in
``WORKING_DIR/last-run.json`` and, when configured, the Prometheus textfile, whatever the outcome.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from broker_sftp_uploader.broker.client import BrokerClient, broker_client
from broker_sftp_uploader.concurrency import Cancellation, Cancelled, in_background
from broker_sftp_uploader.config import Config
from broker_sftp_uploader.crypto import load_keys
from broker_sftp_uploader.engine.apply import Applier, run_cancellation
from broker_sftp_uploader.engine.plan import (
    DeletionGuard,
    Plan,
    add_uploads,
    fetch_completions,
    ledger_copy_due,
    ledger_digest_path,
    list_requests,
    plan_requests,
    plan_sync,
)
from broker_sftp_uploader.engine.progress import Progress
from broker_sftp_uploader.engine.report import (
    LAST_RUN_FILE,
    Report,
    report_document,
    write_last_run,
    write_metrics,
)
from broker_sftp_uploader.errors import EXIT_LOCKED, EXIT_USAGE, UploaderError
from broker_sftp_uploader.sftp.transport import sftp_connection
from broker_sftp_uploader.state.atomic import leftover_temp_files
from broker_sftp_uploader.state.journal import JOURNAL_SUFFIX, PartialsJournal
from broker_sftp_uploader.state.ledger import Ledger, LedgerEntry
from broker_sftp_uploader.state.lock import RunLock

if TYPE_CHECKING:
    from broker_sftp_uploader.sftp.connection import SftpConnection

logger = logging.getLogger(__name__)


class RequestNotListedError(UploaderError):
    """``sync --request ID`` named a request the broker does not list under the tag."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class SyncOptions:
    """What the operator asked for, besides the config."""

    dry_run: bool = False
    allow_deletes: bool = False
    requests: tuple[str, ...] = ()  # --request: re-send exactly these, nothing else
    repair: bool = False  # --repair: re-upload live files missing or damaged on the server first
    verify: bool = False  # --repair --verify: damaged includes failing the Fernet check (engine/audit.py)


@dataclass
class SyncOutcome:
    """How a run ended, for the CLI: its report (None if it stopped early), exit code and JSON document."""

    report: Report | None
    exit_code: int
    document: dict = field(default_factory=dict)
    error: UploaderError | None = None


def execute_sync(config: Config, options: SyncOptions = SyncOptions(), *, show: Callable[[str], None] = print,
                 progress: Progress | None = None) -> SyncOutcome:
    """Run ``run_sync`` and leave its report (``last-run.json``, metrics) whatever happens.

    A run stopped by a failure gets that failure's exit code and message in the report; a run that
    found the lock taken leaves the other run's report alone.
    """
    started, clock = time.time(), time.monotonic()
    report, error = None, None
    try:
        report = run_sync(config, options, show=show, progress=progress)
        code = report.exit_code()
    except UploaderError as failure:
        error, code = failure, failure.exit_code
    duration = time.monotonic() - clock
    if report is not None:
        report.started, report.duration = started, duration
    document = report_document(report, code, started=started, duration=duration, dry_run=options.dry_run,
                               error=str(error) if error is not None else None)
    if code != EXIT_LOCKED and not options.dry_run:
        _leave_reports(config, document)
    return SyncOutcome(report, code, document, error)


def _leave_reports(config: Config, document: dict) -> None:
    try:
        write_last_run(config.working_dir, document)
    except OSError as failure:
        logger.warning("cannot write %s/last-run.json: %s", config.working_dir, failure.strerror or failure)
    if config.metrics_file is not None:
        try:
            write_metrics(config.metrics_file, document)
        except OSError as failure:
            logger.warning("cannot write MISC.METRICS_FILE %s: %s", config.metrics_file, failure.strerror or failure)


def run_sync(config: Config, options: SyncOptions = SyncOptions(), *, show: Callable[[str], None] = print,
             progress: Progress | None = None) -> Report:
    """Synchronise the broker's tagged results to the SFTP server as ``config`` says.

    The run, top down: lock, load, plan, apply, report. With ``options.dry_run`` the plan is passed
    line by line to ``show`` and nothing is changed anywhere (no lock file, no export on the broker,
    no ledger write; ``--repair`` only lists the server's folder).

    :raises UploaderError: a failure that stops the whole run (lock, key, ledger, broker, SFTP connect).
    """
    deadline = config.run_deadline()
    cancellation = run_cancellation(deadline)
    with _lock(config, options.dry_run):
        key, ledger, journal = _load(config, options.dry_run)
        login = SftpLogin(config, journal, deadline, cancellation)
        try:
            with broker_client(config, deadline) as broker:
                cancellation.on_cancel(broker.close)  # when the run stops, the broker calls in flight are cut
                plan = _plan(config, options, broker, ledger.entries(), journal, login, cancellation)
                if options.dry_run:
                    _show_plan(plan, ledger_copy_due(config.sftp.upload_ledger, config.ledger_path,
                                                     changes_planned=bool(plan.actions)), show)
                    return Report(unchanged=plan.unchanged, refusal=plan.refusal())
                if _nothing_to_do(config, plan, journal):
                    logger.info("nothing to do: %d request(s) unchanged", plan.unchanged)
                    return Report(unchanged=plan.unchanged, refusal=plan.refusal())
                report = _apply(config, plan, broker, ledger, key, login, cancellation, progress)
        except BaseException as stopped:
            cancellation.cancel(stopped)  # stops what still runs for the run (a login in the background)
            raise
        finally:
            login.close()
            if journal is not None:
                journal.close()
    logger.info("%s", report.summary())
    return report


def _lock(config: Config, dry_run: bool) -> contextlib.AbstractContextManager:
    """The run lock, or nothing for a dry run (it writes nothing). Entering raises ``LockedError``."""
    return contextlib.nullcontext() if dry_run else RunLock(config.working_dir)


def _load(config: Config, dry_run: bool) -> tuple[bytes, Ledger, PartialsJournal | None]:
    """Remove the temp files a killed run left, then load the Fernet key, the ledger and the journal of
    partial uploads. A dry run removes nothing and gets no journal (it writes nothing).

    :raises KeyFileError: the key file is missing or invalid.
    :raises LedgerError: the ledger cannot be read.
    """
    journal_path = config.ledger_path.with_name(config.ledger_path.name + JOURNAL_SUFFIX)
    if not dry_run:
        reports = [config.working_dir / LAST_RUN_FILE, *([config.metrics_file] if config.metrics_file else [])]
        remove_stale_temp_files([config.ledger_path, ledger_digest_path(config.ledger_path),
                                 config.sftp.known_hosts, journal_path, *reports])
    key = load_keys(config.key_path)[0]
    ledger = Ledger.load(config.ledger_path)
    return key, ledger, None if dry_run else PartialsJournal(journal_path)


def _plan(config: Config, options: SyncOptions, broker: BrokerClient, entries: dict[str, LedgerEntry],
          journal: PartialsJournal | None, login: SftpLogin, cancellation: Cancellation) -> Plan:
    """Ask the broker for the tagged requests and their completions, and plan the run.

    A run that will certainly work on the server starts the SFTP login right after the listing, so the
    login runs while the status calls do.

    :raises BrokerError: the broker failed.
    :raises RequestNotListedError: ``--request`` named a request the broker does not list.
    :raises SftpError: ``--repair`` could not list the server's folder.
    """
    ids = list_requests(broker, config.broker.tag)
    if journal is not None and _server_work_certain(ids, entries, options, journal):  # None: a dry run
        login.start()
    listing = fetch_completions(broker, ids, config.broker.concurrency, cancellation)
    return _choose_plan(config, options, listing, entries, login, cancellation)


def _server_work_certain(ids: Sequence[str], entries: dict[str, LedgerEntry], options: SyncOptions,
                         journal: PartialsJournal) -> bool:
    """True when the run will work on the server whatever the status calls answer: ``--repair``, partial
    files a killed run left, or a listed request that is new, listed again after deletion, or asked for."""
    if options.repair or journal.leftovers():
        return True
    if options.requests:
        return any(request_id in ids for request_id in options.requests)
    return any(entries.get(request_id) is None or entries[request_id].is_deleted for request_id in ids)


def _choose_plan(config: Config, options: SyncOptions, listing: dict[str, str],
                 entries: dict[str, LedgerEntry], login: SftpLogin,
                 cancellation: Cancellation | None = None) -> Plan:
    """The run's plan: the normal one, the one-off ``--request`` one, and ``--repair``'s additions."""
    if options.requests:
        missing = [request_id for request_id in options.requests if request_id not in listing]
        if missing:
            raise RequestNotListedError(f"the broker lists no request {', '.join(missing)} tagged "
                                        f"{config.broker.tag!r}; check the id (see `status`) and REQUESTS.TAG")
        return plan_requests(options.requests, listing, entries)
    guard = DeletionGuard(config.max_delete_percent, config.max_delete_count, options.allow_deletes)
    plan = plan_sync(listing, entries, guard)
    if not listing and plan.live:
        logger.warning("the broker lists no request tagged %r while the ledger has %d live file(s); "
                       "check REQUESTS.TAG", config.broker.tag, plan.live)
    if options.repair:
        from broker_sftp_uploader.engine.audit import compare_remote

        files = login.connection().main.list_sizes()
        comparison = compare_remote(entries, files)
        for request_id, name in comparison.missing:
            logger.warning("%s (request %s) is missing on the server", name, request_id)
        for wrong in comparison.wrong_size:
            logger.warning("%s (request %s) has %d bytes on the server, expected %s", wrong.file_name,
                           wrong.request_id, wrong.size, wrong.expected or "the size of a Fernet token")
        repairs = set(comparison.needs_repair)
        if options.verify:
            repairs |= _failing_verification(config, login, entries, files, cancellation)
        plan = add_uploads(plan, [request_id for request_id in sorted(repairs, key=int)
                                  if request_id in listing], listing, entries, "repair")
    return plan


def _failing_verification(config: Config, login: SftpLogin, entries: dict[str, LedgerEntry],
                          files: dict[str, int], cancellation: Cancellation | None) -> set[str]:
    """``--repair --verify``: read every live file of the folder (``files``: name -> size) back and check its
    Fernet token, as ``status --remote --verify`` does; return the ids of those that fail (each is logged).

    :raises KeyFileError: the key file cannot be read.
    :raises SftpError: no session can be opened to read the files.
    :raises BaseException: ``cancellation``'s reason, when the run is stopped meanwhile (time limit, signal).
    """
    from broker_sftp_uploader.engine.audit import files_to_prove, prove_delivery

    proof = prove_delivery(load_keys(config.key_path), files_to_prove(entries, files),
                           login.connection().open_session, config.sftp.parallel_uploads, cancellation)
    for failed in proof.failed:
        logger.warning("%s (request %s) fails the Fernet check: %s", failed.file_name, failed.request_id,
                       failed.detail)
    logger.info("Fernet check: %d of %d live file(s) on the server verified", proof.verified, proof.checked)
    return {failed.request_id for failed in proof.failed}


def _nothing_to_do(config: Config, plan: Plan, journal: PartialsJournal) -> bool:
    """True when the run need not connect: no action, no partial file to remove, no ledger copy due."""
    return (not plan.actions and not journal.leftovers()
            and not ledger_copy_due(config.sftp.upload_ledger, config.ledger_path))


def _apply(config: Config, plan: Plan, broker: BrokerClient, ledger: Ledger, key: bytes, login: SftpLogin,
           cancellation: Cancellation, progress: Progress | None) -> Report:
    """Carry out ``plan`` (``engine/apply.py``) and return what was done. A login not begun yet starts now,
    so the parallel uploads' exports overlap it.

    :raises LedgerError: the ledger could not be saved.
    :raises SftpError: the login failed.
    """
    login.start()
    if progress is not None:
        progress.planned = len(plan.uploads)
    applier = Applier(broker, login.connection, ledger, key, upload_ledger=config.sftp.upload_ledger,
                      workers=config.sftp.parallel_uploads, progress=progress, cancellation=cancellation)
    return applier.run(plan)


def remove_stale_temp_files(files: list[Path]) -> None:
    """Remove the save temp files a killed run (SIGKILL, power loss) left beside ``files``.

    Only call it under the lock, when no other run can be saving them.
    """
    for leftover in sorted({temp for path in files for temp in leftover_temp_files(path)}):
        logger.warning("removing %s, left behind by an interrupted run", leftover)
        leftover.unlink(missing_ok=True)


class SftpLogin:
    """The run's SFTP connection, logged in at most once, on a thread of its own when started early.

    The run's one deliberate overlap: ``start`` begins the login in the background, so that it runs
    while the main thread waits for the broker's status calls (and the parallel uploads' exports);
    ``connection`` waits for it, starting it first if nobody did.
    """

    def __init__(self, config: Config, journal: PartialsJournal | None, deadline: float,
                 cancellation: Cancellation):
        """Load ``SFTP.PRIVATE_KEY`` now, so that a bad key stops the run before it does anything.

        :raises KeyFileError: the private key is missing, unreadable or locked with another passphrase.
        """
        self._config = config
        self._journal = journal
        self._deadline = deadline
        self._cancellation = cancellation
        self._sftp = None
        if config.sftp.private_key is not None:
            self._sftp = sftp_connection(config, journal, deadline)
        self._login: Future[SftpConnection] | None = None

    def start(self) -> None:
        """Begin logging in, in the background (once; later calls do nothing)."""
        if self._login is None:
            self._login = in_background(self._log_in, name="sftp-login")

    def _log_in(self) -> SftpConnection:
        # paramiko is imported here, in the background too (a tenth of a second the status calls go on).
        sftp = self._sftp = self._sftp or sftp_connection(self._config, self._journal, self._deadline)
        # The waits between connect attempts end early when the run stops.
        return sftp.connect(self._deadline, sleep=self._cancellation.sleep)

    def connection(self) -> SftpConnection:
        """The logged-in connection, waiting for the login (and starting it if nobody did).

        :raises SftpError: the login failed (unreachable, host key, refused, folder missing, out of time).
        """
        self.start()
        assert self._login is not None
        try:
            return self._login.result()
        except Cancelled as cancelled:  # the run stopped during the login: for that reason
            raise cancelled.reason or cancelled from None

    def close(self) -> None:
        """Close the connection; a login still running is closed when it ends."""
        if self._login is None:
            self._close_connection()
        else:
            self._login.add_done_callback(lambda _login: self._close_connection())

    def _close_connection(self) -> None:
        if self._sftp is not None:
            self._sftp.close()


def _show_plan(plan: Plan, ledger_note: bool, show: Callable[[str], None]) -> None:
    for action in plan.actions:
        show(f"would {action.describe()}")
    for action in plan.refused:
        show(f"would NOT {action.describe()}: mass-deletion guard")
    if ledger_note:
        show("would upload the ledger as status.xml")
    refused = f", {len(plan.refused)} deletions refused" if plan.refused else ""
    show(f"plan: {len(plan.uploads)} to upload, {len(plan.deletes)} to delete, {plan.unchanged} unchanged"
         f"{refused}")


def exit_code_for(report: Report) -> int:
    """The run's exit code (see ``Report.exit_code``)."""
    return report.exit_code()
