"""The sync job: plan what to do from the broker's listing and the ledger, then do it step by step.

``plan_sync`` is pure. ``apply_plan`` performs one action at a time and saves the ledger after each
one that completed, so a crash loses at most the action in flight; a failed action is reported and
the run goes on with the next one.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from broker_sftp_uploader.atomic import atomic_write
from broker_sftp_uploader.broker import BrokerClient
from broker_sftp_uploader.crypto import EncryptingReader, encrypted_size
from broker_sftp_uploader.errors import BrokerError, LedgerError, UploaderError
from broker_sftp_uploader.ledger import Ledger, LedgerEntry, default_file_name
from broker_sftp_uploader.sftp import SftpConnection

logger = logging.getLogger(__name__)

LEDGER_REMOTE_NAME = "status.xml"


@dataclass(frozen=True)
class Upload:
    """Export, encrypt and upload a request's result. ``reason``: new, changed or relisted."""

    request_id: str
    completion: str
    reason: str
    previous_completion: str | None = None
    # A file name an earlier version recorded for this request, other than export_<id>.zip: removed
    # once the new file is in place, so the request keeps exactly one file on the server.
    legacy_file: str | None = None

    @property
    def file_name(self) -> str:
        return default_file_name(self.request_id)

    def describe(self) -> str:
        if self.reason == "changed":
            return (f"re-upload request {self.request_id} "
                    f"(completion {self.previous_completion} -> {self.completion})")
        if self.reason == "relisted":
            return f"upload request {self.request_id} again (listed again after deletion, completion {self.completion})"
        return f"upload request {self.request_id} (new, completion {self.completion})"


@dataclass(frozen=True)
class Delete:
    """Delete the file of a request that is no longer listed by the broker."""

    request_id: str
    remote_name: str

    def describe(self) -> str:
        return f"delete {self.remote_name} (request {self.request_id} is no longer listed)"


@dataclass(frozen=True)
class DeletionGuard:
    """How many of the live remote files one run may delete before it deletes none of them.

    A wrong REQUESTS.TAG, or a broker that answers an empty or partial listing, looks exactly like
    requests that vanished; deleting is the one action a later run cannot undo on the receiving side.
    """

    max_percent: float = 50.0
    max_count: int | None = None
    allow: bool = False

    def refuses(self, deleting: int, live: int) -> bool:
        """True when deleting ``deleting`` of ``live`` files exceeds a limit (and was not allowed)."""
        if self.allow or deleting == 0:
            return False
        if self.max_count is not None and deleting > self.max_count:
            return True
        return deleting * 100 > self.max_percent * live

    def describe_limit(self) -> str:
        limits = [f"REQUESTS.MAX_DELETE_PERCENT = {self.max_percent:g}"]
        if self.max_count is not None:
            limits.append(f"REQUESTS.MAX_DELETE_COUNT = {self.max_count}")
        return " or ".join(limits)


@dataclass(frozen=True)
class Plan:
    """The actions of one run, deletions first, each list in request-id order.

    ``refused`` holds the deletions the guard held back (then ``deletes`` is empty).
    """

    deletes: tuple[Delete, ...]
    uploads: tuple[Upload, ...]
    unchanged: int
    refused: tuple[Delete, ...] = ()
    live: int = 0
    guard: DeletionGuard = field(default_factory=DeletionGuard)

    @property
    def actions(self) -> tuple[Delete | Upload, ...]:
        return self.deletes + self.uploads

    def refusal(self) -> str | None:
        """The operator's message when deletions were refused, else None."""
        if not self.refused:
            return None
        names = ", ".join(action.remote_name for action in self.refused[:5])
        more = f" and {len(self.refused) - 5} more" if len(self.refused) > 5 else ""
        return (f"refused to delete {len(self.refused)} of {self.live} files on the server ({names}{more}): "
                f"more than {self.guard.describe_limit()} allows, so nothing was deleted (uploads went "
                "ahead). If the broker really dropped these requests, run `sync --allow-deletes` once; "
                "if not, check REQUESTS.TAG and the broker")


@dataclass
class Report:
    """What a run did; ``failures`` holds (request id, message) for every action that failed."""

    uploaded: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    failures: list[tuple[str, UploaderError]] = field(default_factory=list)
    ledger_uploaded: bool = False
    unchanged: int = 0
    refusal: str | None = None

    def summary(self) -> str:
        refused = ", deletions refused" if self.refusal else ""
        return (f"{len(self.uploaded)} uploaded, {len(self.deleted)} deleted, {self.unchanged} unchanged, "
                f"{len(self.failures)} failed{refused}")


def _by_id(request_id: str) -> int:
    return int(request_id)


def plan_sync(listed: Mapping[str, str], ledger: Mapping[str, LedgerEntry],
              guard: DeletionGuard = DeletionGuard()) -> Plan:
    """Given the broker's completion by request id and the ledger's entries, return the ``Plan``.

    Listed and unknown: upload. Completion differs: re-upload. Deleted but listed again: upload
    again. In the ledger, not deleted, and no longer listed: delete its file, unless ``guard``
    refuses that many deletions, which then all move to ``Plan.refused``.
    """
    uploads, deletes, unchanged = [], [], 0
    for request_id in sorted(listed, key=_by_id):
        completion = listed[request_id]
        entry = ledger.get(request_id)
        legacy = None
        if entry is not None and not entry.is_deleted and entry.file_name != default_file_name(request_id):
            legacy = entry.file_name
        if entry is None:
            uploads.append(Upload(request_id, completion, "new"))
        elif entry.is_deleted:
            uploads.append(Upload(request_id, completion, "relisted", entry.completion))
        elif entry.completion != completion:
            uploads.append(Upload(request_id, completion, "changed", entry.completion, legacy))
        else:
            unchanged += 1
    for request_id in sorted(ledger, key=_by_id):
        entry = ledger[request_id]
        if request_id not in listed and not entry.is_deleted:
            deletes.append(Delete(request_id, entry.file_name))
    live = sum(1 for entry in ledger.values() if not entry.is_deleted)
    if guard.refuses(len(deletes), live):
        return Plan((), tuple(uploads), unchanged, refused=tuple(deletes), live=live, guard=guard)
    return Plan(tuple(deletes), tuple(uploads), unchanged, live=live, guard=guard)


def fetch_listing(broker: BrokerClient, tag: str) -> dict[str, str]:
    """Ask the broker for the tagged requests and each one's completion string."""
    broker.check_status()
    ids = broker.list_tagged_request_ids(tag)
    logger.info("broker lists %d request(s) tagged %r", len(ids), tag)
    return broker.get_completions(ids)


def ledger_digest_path(ledger_path: Path) -> Path:
    """Where the digest of the last uploaded copy of the ledger is kept: beside the ledger."""
    return ledger_path.with_name(ledger_path.name + ".uploaded-sha256")


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class SyncRunner:
    """Carries out a plan: broker download -> Fernet encryption -> SFTP upload, one request at a time.

    The three are one stream with bounded buffers: nothing is held whole in memory and nothing is
    written to the local disk, so neither memory nor disk limits the size of a result.
    """

    def __init__(self, broker: BrokerClient, sftp: SftpConnection, ledger: Ledger, key: bytes,
                 upload_ledger: bool = True, now: Callable[[], datetime] = _utc_now,
                 deadline: float | None = None):
        self.deadline = deadline
        self.broker = broker
        self.sftp = sftp
        self.ledger = ledger
        self.key = key
        self.upload_ledger = upload_ledger
        self.now = now

    def run(self, plan: Plan) -> Report:
        """Do every action of ``plan``, saving the ledger after each; then upload the ledger if it changed.

        :raises LedgerError: the ledger cannot be saved (the run stops: nothing more can be recorded).
        """
        report = Report(unchanged=plan.unchanged, refusal=plan.refusal())
        for action in plan.actions:
            if self.deadline is not None and time.monotonic() >= self.deadline:
                error = BrokerError("the run reached its time limit (MISC.RUN_TIMEOUT) before this action; "
                                    "the next run does it")
                logger.error("request %s: %s", action.request_id, error)
                report.failures.append((action.request_id, error))
                continue
            try:
                if isinstance(action, Delete):
                    self._delete(action)
                    report.deleted.append(action.request_id)
                else:
                    self._upload(action)
                    report.uploaded.append(action.request_id)
            except UploaderError as error:
                if isinstance(error, LedgerError):  # nothing more could be recorded
                    raise
                logger.error("request %s: %s", action.request_id, error)
                report.failures.append((action.request_id, error))
        if self.upload_ledger and self.ledger_needs_upload():
            try:
                self._upload_ledger()
                report.ledger_uploaded = True
            except UploaderError as error:
                logger.error("ledger upload: %s", error)
                report.failures.append(("status.xml", error))
        return report

    def _delete(self, action: Delete) -> None:
        logger.info("%s", action.describe())
        self.sftp.remove(action.remote_name)
        self.ledger.record_deletion(action.request_id, self.now())
        self.ledger.save()

    def _upload(self, action: Upload) -> None:
        logger.info("%s", action.describe())
        with self.broker.open_result(action.request_id) as result:
            token = EncryptingReader(result, self.key)
            size = encrypted_size(result.size) if result.size is not None else None
            self.sftp.upload(token, action.file_name, size)
            logger.debug("request %s: %d bytes uploaded encrypted as %s", action.request_id,
                         token.plain_bytes_read, action.file_name)
        self.ledger.record_upload(action.request_id, action.completion, action.file_name, self.now())
        self.ledger.save()
        if action.legacy_file is not None:
            try:
                self.sftp.remove(action.legacy_file)
                logger.info("removed %s, the name an earlier version used for request %s",
                            action.legacy_file, action.request_id)
            except UploaderError as error:
                logger.warning("could not remove %s, the old file of request %s (%s); delete it by hand",
                               action.legacy_file, action.request_id, error)

    # The ledger copy on the server is refreshed whenever the local ledger differs from what was
    # last uploaded; the digest of that upload lives beside the ledger, so a failed ledger upload
    # is retried by the next run even if nothing else changes.
    def digest_path(self) -> Path:
        return ledger_digest_path(self.ledger.path)

    def ledger_needs_upload(self) -> bool:
        """True when the server's copy of the ledger may differ from the local one."""
        if not self.ledger.path.exists():
            return False
        try:
            recorded = self.digest_path().read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return True
        return recorded != hashlib.sha256(self.ledger.path.read_bytes()).hexdigest()

    def _upload_ledger(self) -> None:
        content = self.ledger.path.read_bytes()
        self.sftp.upload(io.BytesIO(content), LEDGER_REMOTE_NAME, len(content))
        with atomic_write(self.digest_path(), mode=0o644) as handle:
            handle.write(hashlib.sha256(content).hexdigest().encode("ascii") + b"\n")
        logger.info("uploaded the ledger as %s", LEDGER_REMOTE_NAME)
