"""What the server's folder holds against the ledger: missing files, damaged files, files nobody owns.

Pure: it compares the ledger's live entries with a listing of FOLDERNAME (name -> size). A file's
size is checked against the size recorded at upload (``<size>``); for entries of older ledgers, which
lack it, against the sizes a Fernet token can have at all, which a truncated or damaged file almost
never has.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from broker_sftp_uploader.crypto import is_possible_token_size
from broker_sftp_uploader.state.ledger import LEDGER_FILE, LedgerEntry


@dataclass(frozen=True)
class WrongSize:
    """A live entry's file whose size does not fit."""

    request_id: str
    file_name: str
    size: int
    expected: int | None  # the recorded size, or None when only the token shape was checked


@dataclass(frozen=True)
class RemoteComparison:
    """The folder against the ledger; all tuples in request-id (or name) order."""

    missing: tuple[tuple[str, str], ...]  # (request id, file name) of live entries without a file
    wrong_size: tuple[WrongSize, ...]
    unowned: tuple[str, ...]  # names in the folder no live entry owns (besides the ledger copy)

    @property
    def needs_repair(self) -> tuple[str, ...]:
        """Request ids whose file must be uploaded again."""
        ids = {request_id for request_id, _ in self.missing} | {wrong.request_id for wrong in self.wrong_size}
        return tuple(sorted(ids, key=int))

    @property
    def clean(self) -> bool:
        return not (self.missing or self.wrong_size or self.unowned)


def compare_remote(entries: Mapping[str, LedgerEntry], files: Mapping[str, int]) -> RemoteComparison:
    """Given the ledger's entries and the folder's regular files (name -> size), say what is off.

    Hidden files (our partial uploads, a check's probe) are not judged.
    """
    missing, wrong, owned = [], [], {LEDGER_FILE}
    for request_id in sorted(entries, key=int):
        entry = entries[request_id]
        if entry.is_deleted:
            continue
        name = entry.file_name
        owned.add(name)
        if name not in files:
            missing.append((request_id, name))
        elif entry.size is not None and files[name] != entry.size:
            wrong.append(WrongSize(request_id, name, files[name], entry.size))
        elif entry.size is None and not is_possible_token_size(files[name]):
            wrong.append(WrongSize(request_id, name, files[name], None))
    unowned = sorted(name for name in files if name not in owned and not name.startswith("."))
    return RemoteComparison(tuple(missing), tuple(wrong), tuple(unowned))
