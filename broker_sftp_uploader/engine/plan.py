"""The sync job's plan: what to do, from the broker's listing and the ledger (``apply.py`` does it).

``plan_sync`` is pure: new, changed and relisted requests are uploaded, vanished ones deleted unless
the mass-deletion guard refuses (``report.py`` tells what a run did). Each action knows how to apply
itself at a ``Site`` (the server, and the broker's results) and how to record itself in the ledger;
``apply.py`` decides when and in which thread.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol

from broker_sftp_uploader.broker.client import BrokerClient
from broker_sftp_uploader.concurrency import Cancellation, map_in_threads
from broker_sftp_uploader.config import MAX_DELETE_PERCENT
from broker_sftp_uploader.errors import UploaderError
from broker_sftp_uploader.state.ledger import LEDGER_FILE, Ledger, LedgerEntry, default_file_name

logger = logging.getLogger(__name__)

LEDGER_REMOTE_NAME = LEDGER_FILE


class Site(Protocol):
    """Where actions apply themselves: the SFTP folder, and the broker's results to send there."""

    def remove(self, name: str, quiet: bool = False) -> bool:
        """Delete ``name`` in the folder; return whether it was there. :raises UploaderError: refused."""

    def send_result(self, request_id: str, file_name: str) -> int:
        """Export the request's result, encrypt it and upload it as ``file_name``; return the bytes uploaded.

        :raises UploaderError: the broker or the server failed.
        """


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

    kind = "upload"

    @property
    def file_name(self) -> str:
        return default_file_name(self.request_id)

    def apply(self, site: Site) -> int:
        """Upload the result; return the bytes uploaded. :raises UploaderError: broker or server failed."""
        logger.info("%s", self.describe())
        return site.send_result(self.request_id, self.file_name)

    def record(self, ledger: Ledger, when: datetime, size: int) -> None:
        """Note in ``ledger`` (not yet saved) that the upload of ``size`` bytes completed at ``when``."""
        ledger.record_upload(self.request_id, self.completion, self.file_name, when, size)

    def tidy_up(self, site: Site) -> None:
        """Once recorded: remove the file an earlier version used for this request, if any (a failure is
        only logged: the new file is in place)."""
        if self.legacy_file is None:
            return
        try:
            site.remove(self.legacy_file)
        except UploaderError as error:
            logger.warning("could not remove %s, the old file of request %s (%s); delete it by hand",
                           self.legacy_file, self.request_id, error)
            return
        logger.info("removed %s, the name an earlier version used for request %s", self.legacy_file,
                    self.request_id)

    def describe(self) -> str:
        if self.reason == "changed":
            return (f"re-upload request {self.request_id} "
                    f"(completion {self.previous_completion} -> {self.completion})")
        if self.reason == "relisted":
            return f"upload request {self.request_id} again (listed again after deletion, completion {self.completion})"
        if self.reason == "requested":
            return f"re-send request {self.request_id} (asked for, completion {self.completion})"
        if self.reason == "repair":
            return f"re-upload request {self.request_id} (its file on the server is missing or damaged)"
        return f"upload request {self.request_id} (new, completion {self.completion})"


@dataclass(frozen=True)
class Delete:
    """Delete the file of a request that is no longer listed by the broker."""

    request_id: str
    remote_name: str

    kind = "delete"
    reason = "vanished"

    def describe(self) -> str:
        return f"delete {self.remote_name} (request {self.request_id} is no longer listed)"

    def apply(self, site: Site) -> int:
        """Delete the file (one already gone is fine); return 0 bytes. :raises UploaderError: refused."""
        logger.info("%s", self.describe())
        site.remove(self.remote_name)
        return 0

    def record(self, ledger: Ledger, when: datetime, size: int) -> None:
        """Note in ``ledger`` (not yet saved) that the file was deleted at ``when``."""
        ledger.record_deletion(self.request_id, when)

    def tidy_up(self, site: Site) -> None:
        """Nothing is left to tidy after a deletion."""


@dataclass(frozen=True)
class DeletionGuard:
    """How many of the live remote files one run may delete before it deletes none of them.

    A wrong REQUESTS.TAG, or a broker that answers an empty or partial listing, looks exactly like
    requests that vanished; deleting is the one action a later run cannot undo on the receiving side.
    """

    max_percent: float = MAX_DELETE_PERCENT.default
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
        if entry is None:
            uploads.append(_upload_of(request_id, completion, entry, "new"))
        elif entry.is_deleted:
            uploads.append(_upload_of(request_id, completion, entry, "relisted"))
        elif entry.completion != completion:
            uploads.append(_upload_of(request_id, completion, entry, "changed"))
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


def plan_requests(requested: tuple[str, ...], listed: Mapping[str, str],
                  ledger: Mapping[str, LedgerEntry]) -> Plan:
    """The plan of ``sync --request``: upload exactly ``requested`` (all listed), nothing else."""
    wanted = sorted(set(requested), key=_by_id)
    uploads = tuple(_upload_of(request_id, listed[request_id], ledger.get(request_id), "requested")
                    for request_id in wanted)
    return Plan((), uploads, unchanged=len(listed) - len(uploads))


def add_uploads(plan: Plan, request_ids: list[str], listed: Mapping[str, str],
                ledger: Mapping[str, LedgerEntry], reason: str) -> Plan:
    """``plan`` plus uploads of ``request_ids`` (each listed) that it does not upload already."""
    planned = {upload.request_id for upload in plan.uploads}
    extra = [_upload_of(request_id, listed[request_id], ledger.get(request_id), reason)
             for request_id in request_ids if request_id not in planned]
    if not extra:
        return plan
    uploads = tuple(sorted(plan.uploads + tuple(extra), key=lambda upload: _by_id(upload.request_id)))
    return dataclasses.replace(plan, uploads=uploads, unchanged=plan.unchanged - len(extra))


def _upload_of(request_id: str, completion: str, entry: LedgerEntry | None, reason: str) -> Upload:
    """An upload of ``request_id``; a live entry's other (older) file name is retired by it."""
    if entry is None:
        return Upload(request_id, completion, reason)
    legacy = entry.file_name if entry.file_name != default_file_name(request_id) and not entry.is_deleted else None
    return Upload(request_id, completion, reason, entry.completion, legacy)


def list_requests(broker: BrokerClient, tag: str) -> list[str]:
    """Check the broker answers, then return the ids of the requests tagged ``tag``."""
    broker.check_status()
    ids = broker.list_tagged_request_ids(tag)
    logger.info("broker lists %d request(s) tagged %r", len(ids), tag)
    return ids


def fetch_completions(broker: BrokerClient, request_ids: list[str], workers: int,
                      cancellation: Cancellation | None = None) -> dict[str, str]:
    """The completion of every request in ``request_ids`` (in that order), ``workers`` status calls at a time.

    :raises BrokerError: the first call that failed (no call starts after it).
    """
    completions = map_in_threads(broker.get_completion, request_ids, workers, cancellation, name="status")
    return dict(zip(request_ids, completions))


def ledger_digest_path(ledger_path: Path) -> Path:
    """Where the digest of the last uploaded copy of the ledger is kept: beside the ledger."""
    return ledger_path.with_name(ledger_path.name + ".uploaded-sha256")


# The ledger copy on the server is refreshed whenever the local ledger differs from what was last
# uploaded; the digest of that upload lives beside the ledger, so a failed ledger upload is retried
# by the next run even if nothing else changes.
def ledger_copy_due(enabled: bool, ledger_path: Path, changes_planned: bool = False) -> bool:
    """Whether a run uploads the ledger as ``status.xml``: when the copy is ``enabled`` (SFTP.UPLOAD_LEDGER)
    and the ledger changes (``changes_planned``) or differs from the copy last uploaded."""
    return enabled and (changes_planned or _differs_from_copy(ledger_path))


def _differs_from_copy(ledger_path: Path) -> bool:
    """True when the server's copy of the ledger at ``ledger_path`` may differ from the local one."""
    if not ledger_path.exists():
        return False
    try:
        recorded = ledger_digest_path(ledger_path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return True
    return recorded != hashlib.sha256(ledger_path.read_bytes()).hexdigest()
