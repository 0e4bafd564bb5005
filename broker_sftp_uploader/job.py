"""The ``sync`` command's work, from a validated config to a report: lock, key, ledger, broker, SFTP.

Order of the checks decides which failure an operator sees first: config (by the caller), lock,
keys (Fernet, SSH), ledger, broker, SFTP. Nothing is written anywhere before the broker has answered.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from broker_sftp_uploader.atomic import leftover_temp_files
from broker_sftp_uploader.broker import BrokerClient
from broker_sftp_uploader.config import Config
from broker_sftp_uploader.crypto import load_keys
from broker_sftp_uploader.errors import EXIT_DELETES_REFUSED, EXIT_OK, EXIT_PARTIAL
from broker_sftp_uploader.journal import JOURNAL_SUFFIX, PartialsJournal
from broker_sftp_uploader.ledger import Ledger
from broker_sftp_uploader.lock import RunLock
from broker_sftp_uploader.sync import (
    DeletionGuard,
    Plan,
    Report,
    ledger_digest_path,
    ledger_needs_upload,
    list_requests,
    plan_sync,
)

if TYPE_CHECKING:
    from broker_sftp_uploader.sftp import SftpConnection

logger = logging.getLogger(__name__)


def run_sync(config: Config, *, dry_run: bool = False, allow_deletes: bool = False,
             show: Callable[[str], None] = print) -> Report:
    """Synchronise the broker's tagged results to the SFTP server as ``config`` says.

    With ``dry_run`` the plan is passed line by line to ``show`` and nothing is changed anywhere
    (no lock file, no export on the broker, no SFTP connection, no ledger write).
    ``allow_deletes`` lifts the mass-deletion guard for this run.

    :raises UploaderError: a failure that stops the whole run (lock, key, ledger, broker, SFTP connect).
    """
    deadline = time.monotonic() + config.run_timeout
    lock = contextlib.nullcontext() if dry_run else RunLock(config.working_dir)
    with lock:
        journal_path = config.ledger_path.with_name(config.ledger_path.name + JOURNAL_SUFFIX)
        if not dry_run:
            remove_stale_temp_files([config.ledger_path, ledger_digest_path(config.ledger_path),
                                     config.sftp.known_hosts, journal_path])
        key = load_keys(config.key_path)[0]
        ledger = Ledger.load(config.ledger_path)
        journal = None if dry_run else PartialsJournal(journal_path)
        guard = DeletionGuard(config.max_delete_percent, config.max_delete_count, allow_deletes)
        # A private key is loaded now, so that a bad one stops the run before it does anything.
        sftp = _sftp_connection(config, journal, deadline) if config.sftp.private_key is not None else None
        broker_settings = config.broker
        with BrokerClient(broker_settings.url, broker_settings.api_key, ca_bundle=broker_settings.ca_bundle,
                          call_timeout=broker_settings.call_timeout, export_timeout=broker_settings.export_timeout,
                          retries=broker_settings.retries, run_deadline=deadline,
                          concurrency=broker_settings.concurrency) as broker:
            ids = list_requests(broker, broker_settings.tag)
            entries = ledger.entries()
            opening = None
            if not dry_run and (_certainly_work(ids, entries) or (journal is not None and journal.leftovers())):
                # Log in while the status calls run: the run will need the connection anyway.
                sftp = sftp or _sftp_connection(config, journal, deadline)
                opening = _Opening(sftp)
            listing = broker.get_completions(ids)
            plan = plan_sync(listing, entries, guard)
            if not listing and plan.live:
                logger.warning("the broker lists no request tagged %r while the ledger has %d live file(s); "
                               "check REQUESTS.TAG", broker_settings.tag, plan.live)
            ledger_upload = config.sftp.upload_ledger and ledger_needs_upload(config.ledger_path)
            if dry_run:
                _show_plan(plan, config.sftp.upload_ledger and (bool(plan.actions) or ledger_upload), show)
                return Report(unchanged=plan.unchanged, refusal=plan.refusal())
            leftovers = journal is not None and journal.leftovers()
            if not plan.actions and not leftovers and not ledger_upload:
                logger.info("nothing to do: %d request(s) unchanged", plan.unchanged)
                return Report(unchanged=plan.unchanged, refusal=plan.refusal())
            from broker_sftp_uploader.apply import SyncRunner

            sftp = sftp or _sftp_connection(config, journal, deadline)
            runner = SyncRunner(broker, sftp, ledger, key, upload_ledger=config.sftp.upload_ledger,
                                deadline=deadline, workers=config.sftp.parallel_uploads)
            try:
                opening = opening or _Opening(sftp)
                report = runner.run(plan, connected=opening.wait)
            finally:
                sftp.close()
                if journal is not None:
                    journal.close()
    logger.info("%s", report.summary())
    return report


def remove_stale_temp_files(files: list[Path]) -> None:
    """Remove the save temp files a killed run (SIGKILL, power loss) left beside ``files``.

    Only call it under the lock, when no other run can be saving them.
    """
    for leftover in sorted({temp for path in files for temp in leftover_temp_files(path)}):
        logger.warning("removing %s, left behind by an interrupted run", leftover)
        leftover.unlink(missing_ok=True)


def _certainly_work(ids: list[str], entries: dict) -> bool:
    """True when some listed request is new or listed again: it will be uploaded, whatever its status."""
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


def _sftp_connection(config: Config, journal: PartialsJournal | None, deadline: float) -> SftpConnection:
    """The SFTP connection (not yet open). paramiko costs a tenth of a second to import, so only a run
    that may connect imports it."""
    if config.sftp.transport == "openssh":
        from broker_sftp_uploader.openssh import OpensshConnection

        return OpensshConnection(config.sftp, journal, deadline)
    from broker_sftp_uploader.sftp import SftpConnection

    return SftpConnection(config.sftp, journal, deadline)


def _show_plan(plan: Plan, ledger_note: bool, show: Callable[[str], None]) -> None:
    for action in plan.actions:
        show(f"would {action.describe()}")
    for action in plan.refused:
        show(f"would NOT {action.describe()}: mass-deletion guard")
    if ledger_note:
        show("would upload the ledger as status.xml")
    if not plan.actions and not ledger_note:
        show(f"nothing to do: {plan.unchanged} request(s) unchanged")


def exit_code_for(report: Report) -> int:
    """0 when everything worked; 3 when some actions failed and others worked; else the failure's code.

    Refused deletions (exit 4) count only when nothing failed: a failure is the more urgent news.
    """
    if not report.failures:
        return EXIT_DELETES_REFUSED if report.refusal else EXIT_OK
    if report.uploaded or report.deleted or report.ledger_uploaded:
        return EXIT_PARTIAL
    return report.failures[0][1].exit_code
