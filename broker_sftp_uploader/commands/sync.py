"""The ``sync`` command's work, from a validated config to a report: lock, keys, ledger, broker, SFTP.

Order of the checks decides which failure an operator sees first: config (by the caller), lock,
keys (Fernet, SSH), ledger, broker, SFTP. Nothing is written anywhere before the broker has answered.
``execute_sync`` wraps a run for the CLI: it times it, and leaves its JSON report in
``WORKING_DIR/last-run.json`` and, when configured, the Prometheus textfile, whatever the outcome.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from broker_sftp_uploader.state.atomic import leftover_temp_files
from broker_sftp_uploader.config import Config
from broker_sftp_uploader.crypto import load_keys
from broker_sftp_uploader.errors import EXIT_LOCKED, EXIT_USAGE, UploaderError
from broker_sftp_uploader.state.journal import JOURNAL_SUFFIX, PartialsJournal
from broker_sftp_uploader.state.ledger import Ledger, LedgerEntry
from broker_sftp_uploader.state.lock import RunLock
from broker_sftp_uploader.engine.progress import Progress
from broker_sftp_uploader.engine.report import Report, report_document, write_last_run, write_metrics
from broker_sftp_uploader.broker.client import broker_client
from broker_sftp_uploader.sftp.transport import sftp_connection
from broker_sftp_uploader.engine.plan import (
    DeletionGuard,
    Plan,
    add_uploads,
    ledger_digest_path,
    ledger_needs_upload,
    list_requests,
    plan_requests,
    plan_sync,
)

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

    With ``options.dry_run`` the plan is passed line by line to ``show`` and nothing is changed
    anywhere (no lock file, no export on the broker, no ledger write; ``--repair`` only lists the
    server's folder).

    :raises UploaderError: a failure that stops the whole run (lock, key, ledger, broker, SFTP connect).
    """
    deadline = time.monotonic() + config.run_timeout
    dry_run = options.dry_run
    lock = contextlib.nullcontext() if dry_run else RunLock(config.working_dir)
    with lock:
        journal_path = config.ledger_path.with_name(config.ledger_path.name + JOURNAL_SUFFIX)
        if not dry_run:
            remove_stale_temp_files([config.ledger_path, ledger_digest_path(config.ledger_path),
                                     config.sftp.known_hosts, journal_path])
        key = load_keys(config.key_path)[0]
        ledger = Ledger.load(config.ledger_path)
        journal = None if dry_run else PartialsJournal(journal_path)
        # A private key is loaded now, so that a bad one stops the run before it does anything.
        sftp = sftp_connection(config, journal, deadline) if config.sftp.private_key is not None else None
        opening = None
        try:
            with broker_client(config, deadline) as broker:
                ids = list_requests(broker, config.broker.tag)
                entries = ledger.entries()
                if not dry_run and (options.repair or _certainly_work(ids, entries, options)
                                    or (journal is not None and journal.leftovers())):
                    # Log in while the status calls run: the run will need the connection anyway.
                    sftp = sftp or sftp_connection(config, journal, deadline)
                    opening = _Opening(sftp)
                listing = broker.get_completions(ids)
                if options.repair and dry_run:
                    sftp = sftp or sftp_connection(config, journal, deadline)
                    opening = _Opening(sftp)
                plan = _plan(config, options, listing, entries, opening and (lambda: _remote_files(sftp, opening)))
                ledger_upload = config.sftp.upload_ledger and ledger_needs_upload(config.ledger_path)
                if dry_run:
                    _show_plan(plan, config.sftp.upload_ledger and (bool(plan.actions) or ledger_upload), show)
                    return Report(unchanged=plan.unchanged, refusal=plan.refusal())
                leftovers = journal is not None and journal.leftovers()
                if not plan.actions and not leftovers and not ledger_upload:
                    logger.info("nothing to do: %d request(s) unchanged", plan.unchanged)
                    return Report(unchanged=plan.unchanged, refusal=plan.refusal())
                from broker_sftp_uploader.engine.apply import SyncRunner

                sftp = sftp or sftp_connection(config, journal, deadline)
                opening = opening or _Opening(sftp)
                runner = SyncRunner(broker, sftp, ledger, key, upload_ledger=config.sftp.upload_ledger,
                                    deadline=deadline, workers=config.sftp.parallel_uploads,
                                    progress=progress)
                if progress is not None:
                    progress.planned = len(plan.uploads)
                report = runner.run(plan, connected=opening.wait)
        finally:
            if sftp is not None:
                sftp.close()
            if journal is not None:
                journal.close()
    logger.info("%s", report.summary())
    return report


def _plan(config: Config, options: SyncOptions, listing: dict[str, str], entries: dict[str, LedgerEntry],
          remote_files: Callable[[], dict[str, int]] | None) -> Plan:
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
    if options.repair and remote_files is not None:
        from broker_sftp_uploader.engine.audit import compare_remote

        comparison = compare_remote(entries, remote_files())
        for request_id, name in comparison.missing:
            logger.warning("%s (request %s) is missing on the server", name, request_id)
        for wrong in comparison.wrong_size:
            logger.warning("%s (request %s) has %d bytes on the server, expected %s", wrong.file_name,
                           wrong.request_id, wrong.size, wrong.expected or "the size of a Fernet token")
        plan = add_uploads(plan, [request_id for request_id in comparison.needs_repair if request_id in listing],
                           listing, entries, "repair")
    return plan


def _remote_files(sftp: SftpConnection, opening: _Opening) -> dict[str, int]:
    opening.wait()
    return sftp.main.list_sizes()


def remove_stale_temp_files(files: list[Path]) -> None:
    """Remove the save temp files a killed run (SIGKILL, power loss) left beside ``files``.

    Only call it under the lock, when no other run can be saving them.
    """
    for leftover in sorted({temp for path in files for temp in leftover_temp_files(path)}):
        logger.warning("removing %s, left behind by an interrupted run", leftover)
        leftover.unlink(missing_ok=True)


def _certainly_work(ids: list[str], entries: dict[str, LedgerEntry], options: SyncOptions) -> bool:
    """True when some listed request is new or listed again (or asked for): it will be uploaded."""
    if options.requests:
        return any(request_id in ids for request_id in options.requests)
    return any(entries.get(request_id) is None or entries[request_id].is_deleted for request_id in ids)


class _Opening:
    """Connects (and logs in) in a thread of its own while the main thread goes on."""

    def __init__(self, sftp: SftpConnection):
        self._sftp = sftp
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._connect, name="sftp-connect", daemon=True)
        self._thread.start()

    def _connect(self) -> None:
        try:
            self._sftp.connect(self._sftp.deadline)
        except BaseException as error:  # noqa: BLE001 - raised in the main thread by wait()
            self._error = error

    def wait(self) -> None:
        """Wait for the connection; raise (a copy of, in each thread its own) what connecting raised."""
        self._thread.join()
        if self._error is not None:
            raise copy.copy(self._error).with_traceback(self._error.__traceback__)


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
