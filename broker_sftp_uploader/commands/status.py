"""The ``status`` command: the ledger as a table or JSON and, with ``--remote``, what the next run would
do and what the server's folder holds against the ledger.

Read-only everywhere. Without ``--remote`` it reads only the ledger, which a sync always replaces in
one step, so it works while a sync holds the lock. With ``--remote`` it asks the broker for the
listing and each request's completion (as a dry run does) and lists FOLDERNAME over SFTP, logging in
with a throwaway copy of known_hosts (``sftp/readonly_login.py``).

JSON, version 1::

    {"version": 1, "ledger": "/var/lib/aktin-sftp/status.xml",
     "requests": [{"id": "2", "completion": "0.5", "file": "export_2.zip", "size": 1234,
                   "uploaded": "2021-10-11 09:39:50", "last_update": null, "deleted": null}, ...],
     "totals": {"requests": 3, "live": 2, "deleted": 1}}

newest first; null for what the ledger does not hold; timestamps exactly as in the ledger. With
``--remote`` also::

     "broker": {"tag": "rki", "listed": 5, "unchanged": 3},
     "plan": [{"request_id": "4", "action": "upload", "reason": "new", "file": "export_4.zip",
               "completion": "0.5", "previous_completion": null, "refused": false}, ...],
     "remote": {"folder": "rki", "files": 4, "missing": [{"request_id": "2", "file": "export_2.zip"}],
                "wrong_size": [{"request_id": "3", "file": "export_3.zip", "size": 10, "expected": 1234}],
                "unowned": ["notes.txt"]}

``expected`` is null when the ledger recorded no size and the file is not even a possible Fernet token.
With ``--verify`` (see ``engine/audit.py``) ``remote`` also has::

     "verify": {"checked": 3, "verified": 1,
                "failed": [{"request_id": "3", "file": "export_3.zip", "problem": "no_key",
                            "detail": "…", "key": null}, ...]}

``problem`` is one of malformed, no_key, bad_padding, other_key (``key``: the fingerprint of the key
file's key that verifies it), future, unreadable. ``exit_code`` says whether delivery is proven: with
``--verify``, 17 (``EXIT_NOT_PROVEN``) when a live request's file is missing, has the wrong size or fails
the check, else 0.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from broker_sftp_uploader.config import Config
from broker_sftp_uploader.concurrency import Cancellation
from broker_sftp_uploader.crypto import load_keys
from broker_sftp_uploader.errors import EXIT_NOT_PROVEN, EXIT_OK, SftpError
from broker_sftp_uploader.state.ledger import Ledger, LedgerEntry
from broker_sftp_uploader.engine.audit import (DeliveryProof, RemoteComparison, compare_remote,
                                               files_to_prove, prove_delivery)
from broker_sftp_uploader.engine.plan import (Delete, DeletionGuard, Plan, Upload, fetch_completions,
                                              list_requests, plan_sync)

logger = logging.getLogger(__name__)

STATUS_VERSION = 1
_UNSET = "-"


@dataclass(frozen=True)
class RemoteView:
    """What ``--remote`` found: the broker's listing turned into the next run's plan, and the folder."""

    tag: str
    listed: int
    plan: Plan
    folder: str
    files: int
    comparison: RemoteComparison
    proof: DeliveryProof | None = None  # with --verify


@dataclass(frozen=True)
class StatusView:
    """The ledger's entries (newest first) and, with ``--remote``, the ``RemoteView``."""

    ledger_path: Path
    entries: tuple[LedgerEntry, ...]
    remote: RemoteView | None = None

    def totals(self) -> dict[str, int]:
        deleted = sum(1 for entry in self.entries if entry.is_deleted)
        return {"requests": len(self.entries), "live": len(self.entries) - deleted, "deleted": deleted}

    @property
    def exit_code(self) -> int:
        """17 when ``--verify`` found a live request's file missing, of the wrong size or failing the
        Fernet check; else 0 (``--remote`` alone only reports)."""
        remote = self.remote
        if remote is None or remote.proof is None:
            return EXIT_OK
        proven = not (remote.comparison.missing or remote.comparison.wrong_size or remote.proof.failed)
        return EXIT_OK if proven else EXIT_NOT_PROVEN

    def document(self) -> dict:
        """The JSON form (see the module's docstring)."""
        document = {
            "version": STATUS_VERSION,
            "ledger": str(self.ledger_path),
            "requests": [{"id": entry.request_id, "completion": entry.completion, "file": entry.remote_name,
                          "size": entry.size, "uploaded": entry.uploaded, "last_update": entry.last_update,
                          "deleted": entry.deleted} for entry in self.entries],
            "totals": self.totals(),
        }
        if self.remote is not None:
            document.update(_remote_document(self.remote))
        return document

    def lines(self) -> list[str]:
        """The table, its totals, and the ``--remote`` sections."""
        totals = self.totals()
        if not self.entries:
            lines = [f"the ledger {self.ledger_path} holds no request yet"]
        else:
            rows = [("ID", "COMPLETION", "FILE", "UPLOADED", "LAST UPDATE", "DELETED")]
            rows += [(entry.request_id, entry.completion or _UNSET, entry.file_name, entry.uploaded or _UNSET,
                      entry.last_update or _UNSET, entry.deleted or _UNSET) for entry in self.entries]
            lines = _aligned(rows)
            lines.append(f"{totals['requests']} request(s) in {self.ledger_path}: {totals['live']} live, "
                         f"{totals['deleted']} deleted")
        if self.remote is not None:
            lines += _remote_lines(self.remote)
        return lines


def newest_first(entries: Mapping[str, LedgerEntry]) -> tuple[LedgerEntry, ...]:
    """The entries by their latest timestamp (uploaded, last update, deleted), newest first; ties and
    entries without any timestamp by id, highest first. The ledger's format sorts as text."""

    def latest(entry: LedgerEntry) -> tuple[str, int]:
        stamps = [stamp for stamp in (entry.uploaded, entry.last_update, entry.deleted) if stamp]
        return max(stamps, default=""), int(entry.request_id)

    return tuple(sorted(entries.values(), key=latest, reverse=True))


def build_status(config: Config, remote: bool = False, verify: bool = False) -> StatusView:
    """Read the ledger and, with ``remote``, ask the broker and the SFTP server; with ``verify`` too, read
    back every live file and check its Fernet token (``engine/audit.py``); change nothing.

    :raises LedgerError: the ledger cannot be read.
    :raises BrokerError: (``remote``) the broker failed.
    :raises KeyFileError, SftpError: (``remote``) the SSH key, login or folder listing failed; (``verify``)
        the Fernet key file cannot be read, or no SFTP session could be opened to read the files.
    """
    entries = Ledger.load(config.ledger_path).entries()
    view = _remote_view(config, entries, verify) if remote or verify else None
    return StatusView(config.ledger_path, newest_first(entries), view)


def _remote_view(config: Config, entries: Mapping[str, LedgerEntry], verify: bool) -> RemoteView:
    # paramiko is imported only by a status that connects
    from broker_sftp_uploader.sftp.readonly_login import sftp_without_recording
    from broker_sftp_uploader.broker.client import broker_client

    deadline = config.run_deadline()
    tag = config.broker.tag
    keys = load_keys(config.key_path) if verify else []  # a bad key file fails before any connection
    with broker_client(config, deadline) as broker:
        listing = fetch_completions(broker, list_requests(broker, tag), config.broker.concurrency)
    plan = plan_sync(listing, entries, DeletionGuard(config.max_delete_percent, config.max_delete_count))
    with sftp_without_recording(config, deadline) as visit:
        if visit.error is not None:
            raise visit.error
        if visit.new_host_keys:
            logger.warning("the host key of %s:%s (%s) is not yet recorded in %s; status did not record it, "
                           "the next sync will", config.sftp.host, config.sftp.port,
                           ", ".join(visit.new_host_keys), config.sftp.known_hosts)
        files = visit.folder_session().list_sizes()
        proof = None
        if verify:
            proof = prove_delivery(keys, files_to_prove(entries, files), visit.open_folder_session,
                                   config.sftp.parallel_uploads, Cancellation(deadline, _out_of_time))
    return RemoteView(tag, len(listing), plan, config.sftp.folder, len(files), compare_remote(entries, files),
                      proof)


def _out_of_time() -> BaseException:
    return SftpError("status --verify ran out of time (MISC.RUN_TIMEOUT) before every file was read back")


def _plan_item(action: Upload | Delete, refused: bool) -> dict:
    if isinstance(action, Upload):
        return {"request_id": action.request_id, "action": "upload", "reason": action.reason,
                "file": action.file_name, "completion": action.completion,
                "previous_completion": action.previous_completion, "refused": refused}
    return {"request_id": action.request_id, "action": "delete", "reason": "vanished",
            "file": action.remote_name, "completion": None, "previous_completion": None, "refused": refused}


def _remote_document(remote: RemoteView) -> dict:
    plan, comparison = remote.plan, remote.comparison
    return {
        "broker": {"tag": remote.tag, "listed": remote.listed, "unchanged": plan.unchanged},
        "plan": [_plan_item(action, False) for action in plan.actions]
                + [_plan_item(action, True) for action in plan.refused],
        "remote": {
            "folder": remote.folder,
            "files": remote.files,
            "missing": [{"request_id": request_id, "file": name} for request_id, name in comparison.missing],
            "wrong_size": [{"request_id": wrong.request_id, "file": wrong.file_name, "size": wrong.size,
                            "expected": wrong.expected} for wrong in comparison.wrong_size],
            "unowned": list(comparison.unowned),
        } | ({} if remote.proof is None else {"verify": {
            "checked": remote.proof.checked,
            "verified": remote.proof.verified,
            "failed": [{"request_id": failed.request_id, "file": failed.file_name, "problem": failed.problem,
                        "detail": failed.detail, "key": failed.key} for failed in remote.proof.failed],
        }}),
    }


def _remote_lines(remote: RemoteView) -> list[str]:
    plan, comparison = remote.plan, remote.comparison
    lines = ["", f"next run (the broker lists {remote.listed} request(s) tagged {remote.tag!r}):"]
    lines += [f"  would {action.describe()}" for action in plan.actions]
    lines += [f"  would NOT {action.describe()}: mass-deletion guard" for action in plan.refused]
    changes = len(plan.actions) + len(plan.refused)
    lines.append(f"  {changes} change(s), {plan.unchanged} unchanged" if changes
                 else f"  nothing to do: {plan.unchanged} request(s) unchanged")
    lines += ["", f"server folder {remote.folder!r} ({remote.files} file(s)) against the ledger:"]
    lines += [f"  missing: {name} (request {request_id})" for request_id, name in comparison.missing]
    for wrong in comparison.wrong_size:
        expected = f"{wrong.expected} recorded" if wrong.expected is not None else "not a whole Fernet token"
        lines.append(f"  wrong size: {wrong.file_name} (request {wrong.request_id}): {wrong.size} bytes, "
                     f"{expected}")
    lines += [f"  not in the ledger: {name}" for name in comparison.unowned]
    if comparison.needs_repair:
        lines.append(f"  {len(comparison.needs_repair)} file(s) to upload again: run `sync --repair`")
    if comparison.clean:
        lines.append("  every live request's file is there with the right size, and nothing else")
    if remote.proof is not None:
        lines += _proof_lines(remote.proof)
    return lines


def _proof_lines(proof: DeliveryProof) -> list[str]:
    lines = ["", f"Fernet check of the {proof.checked} live file(s) on the server:"]
    lines += [f"  FAILED ({failed.problem}): {failed.detail} (request {failed.request_id})"
              for failed in proof.failed]
    if proof.failed:
        lines.append(f"  {len(proof.failed)} file(s) fail: run `sync --repair --verify` to upload them again")
    else:
        lines.append(f"  all {proof.checked} verify with the current key")
    return lines


def _aligned(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
