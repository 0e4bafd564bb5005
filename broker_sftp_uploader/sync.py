"""The sync job: plan what to do from the broker's listing and the ledger, then do it step by step.

``plan_sync`` is pure. ``apply_plan`` performs one action at a time and saves the ledger after each
one that completed, so a crash loses at most the action in flight; a failed action is reported and
the run goes on with the next one.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from broker_sftp_uploader.atomic import atomic_write
from broker_sftp_uploader.broker import BrokerClient, default_remote_name
from broker_sftp_uploader.crypto import EncryptingReader, encrypted_size
from broker_sftp_uploader.errors import LedgerError, UploaderError
from broker_sftp_uploader.ledger import Ledger, LedgerEntry
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
class Plan:
    """The actions of one run, deletions first, each list in request-id order."""

    deletes: tuple[Delete, ...]
    uploads: tuple[Upload, ...]
    unchanged: int

    @property
    def actions(self) -> tuple[Delete | Upload, ...]:
        return self.deletes + self.uploads


@dataclass
class Report:
    """What a run did; ``failures`` holds (request id, message) for every action that failed."""

    uploaded: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    failures: list[tuple[str, UploaderError]] = field(default_factory=list)
    ledger_uploaded: bool = False
    unchanged: int = 0

    def summary(self) -> str:
        return (f"{len(self.uploaded)} uploaded, {len(self.deleted)} deleted, {self.unchanged} unchanged, "
                f"{len(self.failures)} failed")


def _by_id(request_id: str) -> int:
    return int(request_id)


def plan_sync(listed: Mapping[str, str], ledger: Mapping[str, LedgerEntry]) -> Plan:
    """Given the broker's completion by request id and the ledger's entries, return the ``Plan``.

    Listed and unknown: upload. Completion differs: re-upload. Deleted but listed again: upload
    again. In the ledger, not deleted, and no longer listed: delete its file.
    """
    uploads, deletes, unchanged = [], [], 0
    for request_id in sorted(listed, key=_by_id):
        completion = listed[request_id]
        entry = ledger.get(request_id)
        if entry is None:
            uploads.append(Upload(request_id, completion, "new"))
        elif entry.is_deleted:
            uploads.append(Upload(request_id, completion, "relisted", entry.completion))
        elif entry.completion != completion:
            uploads.append(Upload(request_id, completion, "changed", entry.completion))
        else:
            unchanged += 1
    for request_id in sorted(ledger, key=_by_id):
        entry = ledger[request_id]
        if request_id not in listed and not entry.is_deleted:
            deletes.append(Delete(request_id, entry.remote_name or default_remote_name(request_id)))
    return Plan(deletes=tuple(deletes), uploads=tuple(uploads), unchanged=unchanged)


def fetch_listing(broker: BrokerClient, tag: str) -> dict[str, str]:
    """Ask the broker for the tagged requests and each one's completion string."""
    broker.check_status()
    ids = broker.list_tagged_request_ids(tag)
    logger.info("broker lists %d request(s) tagged %r", len(ids), tag)
    return {request_id: broker.get_completion(request_id) for request_id in ids}


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
                 upload_ledger: bool = True, now: Callable[[], datetime] = _utc_now):
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
        report = Report(unchanged=plan.unchanged)
        for action in plan.actions:
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
            self.sftp.upload(token, result.remote_name, size)
            logger.debug("request %s: %d bytes uploaded encrypted as %s", action.request_id,
                         token.plain_bytes_read, result.remote_name)
        self.ledger.record_upload(action.request_id, action.completion, result.remote_name, self.now())
        self.ledger.save()

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
