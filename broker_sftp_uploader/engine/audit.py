"""What the server's folder holds against the ledger: missing files, damaged files, files nobody owns.

``compare_remote`` is pure: it compares the ledger's live entries with a listing of FOLDERNAME (name -> size). A file's
size is checked against the size recorded at upload (``<size>``); for entries of older ledgers, which
lack it, against the sizes a Fernet token can have at all, which a truncated or damaged file almost
never has.

``prove_delivery`` (``status --remote --verify``, ``sync --repair --verify``) goes beyond sizes, as rclone's
``cryptcheck`` does: it reads every live file back from the server, on up to ``SFTP.PARALLEL_UPLOADS``
sessions, and checks its Fernet token (format, HMAC, padding) with the key file's keys, window by window,
writing nothing. A file fails when it is not a whole token, no key verifies it (modified on the server,
or encrypted with a key the file lacks), only an older key of the key file verifies it (the fingerprint is
named; ``--repair --verify`` re-encrypts it with the current key), its padding is wrong behind a valid
HMAC, its timestamp lies more than ``CLOCK_SKEW`` seconds in the future (a failure, not a warning:
``Fernet.decrypt`` with a ``ttl`` refuses such a token, and this program never writes one on a sane
clock), or the server does not let it be read. A file larger than its recorded size is not read (it fails
by its size already).
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from broker_sftp_uploader.concurrency import Cancellation, Cancelled, map_in_threads
from broker_sftp_uploader.crypto import InvalidToken, is_possible_token_size, key_fingerprint, verify_token
from broker_sftp_uploader.errors import UploaderError
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


# How far in the future a token's timestamp may lie: cryptography's Fernet allows as much (with a ttl).
CLOCK_SKEW = 60


@dataclass(frozen=True)
class FailedProof:
    """A live entry's file on the server that does not pass the Fernet check."""

    request_id: str
    file_name: str
    problem: str  # "malformed", "no_key", "bad_padding", "other_key", "future" or "unreadable"
    detail: str  # one line for the operator
    key: str | None = None  # ("other_key") the fingerprint of the key in the key file that verifies it


@dataclass(frozen=True)
class DeliveryProof:
    """What ``prove_delivery`` found: how many files it read, and those that failed (in request-id order)."""

    checked: int
    failed: tuple[FailedProof, ...]

    @property
    def verified(self) -> int:
        return self.checked - len(self.failed)


class ReadableSession(Protocol):
    """What ``prove_delivery`` needs of an SFTP session (``sftp.session.SftpSession`` is one)."""

    def read_chunks(self, name: str, size: int) -> Iterator[bytes]: ...

    def close(self) -> None: ...


class _ChunkReader(io.RawIOBase):
    """A read-only file object over an iterator of non-empty byte chunks, holding at most one chunk."""

    def __init__(self, chunks: Iterable[bytes]):
        super().__init__()
        self._chunks = iter(chunks)
        self._chunk = b""
        self._position = 0  # in ``_chunk``: what is before it was read (no copy of the rest per read)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all of the current chunk if negative); ``b""`` at the end."""
        if self._position >= len(self._chunk):
            self._chunk, self._position = next(self._chunks, b""), 0
        end = len(self._chunk) if size is None or size < 0 else self._position + size
        out = self._chunk[self._position:end]
        self._position += len(out)
        return out


def judge_token(keys: Sequence[bytes], chunks: Iterable[bytes], request_id: str, name: str,
                now: float | None = None) -> FailedProof | None:
    """Check one file's content (``chunks``) as a Fernet token made with ``keys[0]``; return what is wrong
    with it, or None when it passes. A failure to read ``chunks`` (an ``UploaderError``, e.g. the server
    refused to open the file, or the connection died) is this file's "unreadable" finding.
    """
    now = time.time() if now is None else now
    try:
        proof = verify_token(keys, _ChunkReader(chunks), name=name)
    except InvalidToken as error:
        return FailedProof(request_id, name, error.kind, error.message)
    except UploaderError as error:
        return FailedProof(request_id, name, "unreadable", error.message)
    if proof.key_position != 0:
        fingerprint = key_fingerprint(keys[proof.key_position])
        return FailedProof(request_id, name, "other_key",
                           f"{name} is encrypted with key {fingerprint} (key {proof.key_position + 1} of the "
                           f"key file), not with the current key {key_fingerprint(keys[0])}", fingerprint)
    if proof.timestamp > now + CLOCK_SKEW:
        made = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(proof.timestamp))
        return FailedProof(request_id, name, "future",
                           f"{name} says it was made at {made}, {int(proof.timestamp - now)} s in the "
                           "future: a clock was wrong, or someone else holding the key made it")
    return None


def files_to_prove(entries: Mapping[str, LedgerEntry],
                   files: Mapping[str, int]) -> list[tuple[str, str, int]]:
    """The live entries whose file is in the folder: (request id, file name, size listed), by request id.

    A file larger than the size the ledger recorded is left out: it fails by its size already, and a
    hostile server could list any size at all (a truncated file is read: how it breaks is worth saying).
    """
    targets = []
    for request_id in sorted(entries, key=int):
        entry = entries[request_id]
        size = files.get(entry.file_name)
        if entry.is_deleted or size is None or (entry.size is not None and size > entry.size):
            continue
        targets.append((request_id, entry.file_name, size))
    return targets


def prove_delivery(keys: Sequence[bytes], targets: Sequence[tuple[str, str, int]],
                   open_session: Callable[[], ReadableSession], workers: int,
                   cancellation: Cancellation | None = None) -> DeliveryProof:
    """Read each of ``targets`` (from ``files_to_prove``) from the server and check it with ``judge_token``,
    on up to ``workers`` threads, each with a session of its own from ``open_session`` (all closed on
    return). Memory: a read window and a base64 chunk per thread, whatever the files' sizes.

    :raises UploaderError: a session could not be opened (the connection is gone: nothing can be proven).
    :raises BaseException: ``cancellation``'s reason, when it was cancelled meanwhile (deadline, interrupt).
    """
    cancellation = cancellation or Cancellation()
    sessions: list[ReadableSession] = []
    mine = threading.local()
    lock = threading.Lock()

    def session() -> ReadableSession:
        if getattr(mine, "session", None) is None:
            mine.session = open_session()
            with lock:
                sessions.append(mine.session)
        return mine.session

    def prove(target: tuple[str, str, int]) -> FailedProof | None:
        request_id, name, size = target
        reader = session()  # here, not in judge_token: a session refused fails the proof, not one file
        chunks = _until_cancelled(reader.read_chunks(name, size), cancellation)
        return judge_token(keys, chunks, request_id, name)

    try:
        outcomes = map_in_threads(prove, list(targets), workers, cancellation, name="verify")
    except Cancelled as stopped:  # (one worker) the reason itself, as from several
        raise stopped.reason or stopped from None
    finally:
        for opened in sessions:
            opened.close()
    return DeliveryProof(len(targets), tuple(outcome for outcome in outcomes if outcome is not None))


def _until_cancelled(chunks: Iterable[bytes], cancellation: Cancellation) -> Iterator[bytes]:
    """``chunks``, checking ``cancellation`` between them: a large file does not keep a stopped run going.
    (``Cancelled`` is no ``UploaderError``, so ``judge_token`` does not take it for the file's fault.)"""
    for chunk in chunks:
        cancellation.check()
        yield chunk
