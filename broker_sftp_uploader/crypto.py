"""Streaming Fernet: encrypt result bundles for upload and decrypt them, in constant memory.

* Streaming: bundles can be GiB-sized, and ``Fernet.encrypt``/``decrypt`` hold the whole plaintext
  and token in memory (several times the file size). Here AES-128-CBC, the HMAC and base64 all run
  incrementally, so memory stays at a few chunks whatever the size.
* Format-compatible: the output is byte-for-byte a standard Fernet token, so the receiving institute
  decrypts with plain ``Fernet(key).decrypt(data)`` and needs none of our code; our decryptor accepts
  and rejects what ``Fernet.decrypt`` does (e.g. it ignores a trailing newline).
* Decrypt to a temp file, then rename: the HMAC sits at the token's end, so a streaming decryptor
  writes plaintext before it knows the token is authentic. Plaintext therefore only goes to a
  private 0600 temp file, renamed to the target (or copied to stdout) once the HMAC has verified
  and removed on any failure.

Keys are passed as their url-safe base64 text (``bytes``), as ``Fernet(key)`` takes them. Nothing here
logs key material or puts it in an exception message.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac as stdlib_hmac
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidSignature
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import hashes, hmac, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

try:  # the optional "fast" extra: the same bytes as the standard library's, in one SIMD pass
    from pybase64 import urlsafe_b64encode
except ImportError:  # the project's stack alone
    from base64 import urlsafe_b64encode

from broker_sftp_uploader.state.atomic import atomic_write, fsync_directory, private_temp_file
from broker_sftp_uploader.config import read_bounded_file, warn_if_exposed
from broker_sftp_uploader.errors import DecryptError, KeyFileError, OutputFileError

__all__ = [
    "CHUNK_SIZE", "EncryptingReader", "InvalidToken", "StreamEncryptor", "TokenProof", "decrypt_file",
    "decrypt_stream", "decrypt_to_stream", "decrypted_name", "encrypt_stream", "encrypted_size",
    "generate_key_file", "is_possible_token_size", "key_fingerprint", "load_keys", "make_output_dir",
    "output_path_for", "verify_token",
]

CHUNK_SIZE = 64 * 1024
# A key file holds a few 45-byte lines (and comments); anything bigger is the wrong file.
KEY_FILE_LIMIT = 64 * 1024
_VERSION = 0x80
_HEADER_LEN = 1 + 8 + 16  # version, timestamp, IV
_MAC_LEN = 32
_BLOCK = 16
_KEY_LINE = re.compile(rb"[A-Za-z0-9_-]{43}=")
_PAD_RUN = re.compile(rb"=+")
# base64.urlsafe_b64decode maps "-_" to "+/" and (non-strict) skips every byte outside the alphabet.
_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
_NOT_BASE64 = bytes(c for c in range(256) if c not in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                    b"0123456789+/-_=")


def _split_key(key: bytes | str) -> tuple[bytes, bytes]:
    """Return (signing key, encryption key) of a Fernet key; raise ``ValueError`` if it is not one."""
    try:
        raw = base64.urlsafe_b64decode(key)
    except (binascii.Error, TypeError, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ValueError("Fernet key must be 32 url-safe base64-encoded bytes")
    return raw[:16], raw[16:]


def key_fingerprint(key: bytes | str) -> str:
    """Return a Fernet key's fingerprint, safe to show and compare: the first 8 hex digits of SHA-256
    over the key's base64 text.

    The text is hashed without its line end (``printf %s KEY | sha256sum``), so a key reads the same
    whichever file, line end or line it sits on.
    """
    text = key.encode("ascii") if isinstance(key, str) else key
    return hashlib.sha256(text.strip()).hexdigest()[:8]


def generate_key_file(path: Path) -> str:
    """Write a new random key (plus newline) to a new 0600 file ``path`` and return its fingerprint.

    :raises KeyFileError: if ``path`` exists (it is never overwritten), its folder is missing, or the
        file cannot be written; a partly written file is removed.
    """
    path = Path(path)
    key = Fernet.generate_key()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key file") from None
    except FileNotFoundError:
        raise KeyFileError(f"cannot create key file {path}: folder {path.parent} does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"cannot create key file {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(key + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise KeyFileError(f"cannot write key file {path}: {exc.strerror or exc}") from None
    fsync_directory(path.parent)
    return key_fingerprint(key)


def load_keys(path: Path) -> list[bytes]:
    """Return the keys in key file ``path``, one per line; the first is the one to encrypt with.

    Blank lines and lines starting with ``#`` are skipped. Logs a warning if group or others may
    access the file (not for a systemd credential, see ``is_systemd_credential``).

    :raises KeyFileError: if the file is missing, unreadable, not a regular file or too large, holds no
        key, or a line is not a valid key (the message names the file and line number, never the line's
        text).
    """
    path = Path(path)
    what = f"key file {path}"
    data, mode = read_bounded_file(path, KEY_FILE_LIMIT, what, ", so it holds more than keys",
                                   error=KeyFileError)
    warn_if_exposed(path, mode, what)
    keys = []
    for number, line in enumerate(data.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        if not _KEY_LINE.fullmatch(line):
            raise KeyFileError(f"key file {path}, line {number}: not a valid Fernet key "
                               f"(expected 44 characters of url-safe base64)")
        keys.append(line)
    if not keys:
        raise KeyFileError(f"key file {path} holds no key")
    return keys


def encrypted_size(plain_size: int) -> int:
    """Return the exact length in bytes of the Fernet token for ``plain_size`` bytes of plaintext."""
    return _base64_size(_HEADER_LEN + (plain_size // _BLOCK + 1) * _BLOCK + _MAC_LEN)


def is_possible_token_size(size: int) -> bool:
    """Tell whether some Fernet token is exactly ``size`` bytes long (a truncated file almost never is)."""
    if size <= 0 or size % 4:
        return False
    # The raw token is header, at least one cipher block and the MAC; base64 makes 4 characters of up
    # to 3 bytes, so ``size`` holds 3/4 of it in raw bytes, or 1 or 2 fewer (padding).
    overhead = _HEADER_LEN + _MAC_LEN
    return any(raw >= overhead + _BLOCK and (raw - overhead) % _BLOCK == 0
               for raw in range(size // 4 * 3 - 2, size // 4 * 3 + 1))


def _base64_size(raw_size: int) -> int:
    """The length of the padded base64 text of ``raw_size`` bytes."""
    return (raw_size + 2) // 3 * 4


class StreamEncryptor:
    """Incremental Fernet encryption: feed plaintext to ``update``, end with ``finalize``.

    The concatenated return values are one standard Fernet token. ``timestamp`` and ``iv`` default
    to the current time and 16 random bytes; fix them only for tests.
    """

    def __init__(self, key: bytes, *, timestamp: int | None = None, iv: bytes | None = None):
        signing_key, encryption_key = _split_key(key)
        timestamp = int(time.time()) if timestamp is None else timestamp
        iv = os.urandom(_BLOCK) if iv is None else iv
        if len(iv) != _BLOCK:
            raise ValueError("iv must be 16 bytes")
        # CBC without a padder: the cipher holds back a partial block itself, and the PKCS7 padding is
        # added at the end from the plaintext's length (a padder copies every piece once more).
        self._cipher = Cipher(algorithms.AES(encryption_key), modes.CBC(iv)).encryptor()
        self._plain_size = 0
        # The standard library's HMAC-SHA256 (OpenSSL's, through hashlib) lets other threads run while it
        # hashes, unlike cryptography's: an upload's SSH encryption goes on meanwhile.
        self._mac = stdlib_hmac.new(signing_key, digestmod=hashlib.sha256)
        self._finished = False
        header = bytes([_VERSION]) + timestamp.to_bytes(8, "big") + iv
        self._mac.update(header)
        self._pending = bytearray(header)  # raw token bytes not yet base64-encoded

    def _encode(self, raw: bytes) -> bytes:
        """Base64-encode whole 3-byte groups of the pending bytes plus ``raw``; keep the remainder.

        With the optional ``fast`` extra, pybase64 gives the same bytes as ``base64.urlsafe_b64encode``
        with SIMD code in one pass: the standard library's encoder and its second pass for the url-safe
        alphabet were the largest cost of an upload, more than the AES and the HMAC (README, Benchmarks).
        """
        pending = self._pending
        pending += raw  # the one copy: the groups are encoded from it in place, and dropped from its front
        cut = len(pending) - len(pending) % 3
        with memoryview(pending) as groups:
            text = urlsafe_b64encode(groups[:cut])
        del pending[:cut]
        return text

    def update(self, data: bytes) -> bytes:
        """Encrypt the next plaintext piece; return the next token bytes (possibly empty)."""
        if self._finished:
            raise ValueError("finalize() was already called")
        self._plain_size += len(data)
        ciphertext = self._cipher.update(data)
        self._mac.update(ciphertext)
        return self._encode(ciphertext)

    def finalize(self) -> bytes:
        """Return the last token bytes: final block, HMAC and base64 padding."""
        if self._finished:
            raise ValueError("finalize() was already called")
        self._finished = True
        pad = _BLOCK - self._plain_size % _BLOCK  # PKCS7: 1 to 16 bytes, each holding the count
        tail = self._cipher.update(bytes([pad]) * pad) + self._cipher.finalize()
        self._mac.update(tail)
        out = self._encode(tail + self._mac.digest())
        return out + urlsafe_b64encode(bytes(self._pending))


def encrypt_stream(key: bytes, source: BinaryIO, target: BinaryIO, chunk_size: int = CHUNK_SIZE) -> int:
    """Read ``source`` to its end, write its Fernet token to ``target``; return the token length."""
    encryptor = StreamEncryptor(key)
    written = 0
    while chunk := source.read(chunk_size):
        out = encryptor.update(chunk)
        target.write(out)
        written += len(out)
    out = encryptor.finalize()
    target.write(out)
    return written + len(out)


class EncryptingReader:
    """A read-only file object whose content is the Fernet token of ``source`` (e.g. for ``putfo``).

    ``read(n)`` holds at most about ``n`` plus 1.4 ``chunk_size`` bytes; ``read()`` returns the
    whole remaining token. ``plain_bytes_read`` counts plaintext bytes taken from ``source``.
    """

    def __init__(self, source: BinaryIO, key: bytes, *, chunk_size: int = CHUNK_SIZE,
                 timestamp: int | None = None, iv: bytes | None = None):
        self._source = source
        self._encryptor = StreamEncryptor(key, timestamp=timestamp, iv=iv)
        self._chunk_size = chunk_size
        self._buffer = bytearray()
        self._done = False
        self.plain_bytes_read = 0

    def _fill(self) -> None:
        chunk = self._source.read(self._chunk_size)
        if chunk:
            self.plain_bytes_read += len(chunk)
            self._buffer += self._encryptor.update(chunk)
        else:
            self._buffer += self._encryptor.finalize()
            self._done = True

    def read(self, n: int | None = -1) -> bytes:
        """Return up to ``n`` token bytes (all remaining if ``n`` is negative); ``b""`` at the end."""
        while not self._done and (n is None or n < 0 or len(self._buffer) < n):
            self._fill()
        if n is None or n < 0:
            n = len(self._buffer)
        with memoryview(self._buffer) as buffered:  # one copy, where a slice of the bytearray makes two
            out = bytes(buffered[:n])
        del self._buffer[:n]
        return out


class _Base64Decoder:
    """Incremental twin of ``base64.urlsafe_b64decode``: same output, same accept/reject decisions.

    Bytes outside the alphabet are skipped; "=" ends the data once it completes a group (anything
    after is ignored) and is skipped elsewhere; a dangling partial group is an error.
    """

    def __init__(self) -> None:
        self._group = b""  # data characters of the unfinished 4-character group
        self._pads = 0  # "=" seen since the last data character
        self.done = False

    def feed(self, text: bytes) -> bytes:
        """Decode the next piece of text; return the bytes it completes."""
        out, pos = [], 0
        text = text.translate(_TO_STANDARD, _NOT_BASE64)
        while pos < len(text) and not self.done:
            cut = text.find(b"=", pos)
            end = len(text) if cut < 0 else cut
            if end > pos:
                data = self._group + text[pos:end]
                whole = len(data) - len(data) % 4
                out.append(binascii.a2b_base64(data[:whole]))
                self._group, self._pads = data[whole:], 0
            if cut < 0:
                break
            pos = _PAD_RUN.match(text, cut).end()
            self._pads += pos - cut
            if len(self._group) >= 2 and len(self._group) + self._pads >= 4:
                out.append(binascii.a2b_base64(self._group + b"=="))
                self.done = True
        return b"".join(out)

    def complete(self) -> bool:
        """Tell whether the text so far is complete base64 (no dangling partial group)."""
        return self.done or not self._group


class _TokenScanner:
    """Read a token's text from ``source``; yield its signed part (header first, then ciphertext).

    After the iteration ``mac`` holds the token's last 32 bytes. Raises ``DecryptError`` on format
    problems; the HMAC itself is the caller's to check.
    """

    def __init__(self, source: BinaryIO, chunk_size: int, name: str):
        self._source, self._chunk_size, self._name = source, chunk_size, name
        self.mac = b""

    def __iter__(self) -> Iterator[bytes]:
        decoder = _Base64Decoder()
        pending = b""  # decoded bytes held back: the incomplete header, then the last 32 bytes
        header_sent = False
        body_len = 0
        while chunk := self._source.read(self._chunk_size):
            pending += decoder.feed(chunk)
            if not header_sent:
                if pending[:1] not in (b"", bytes([_VERSION])):
                    raise DecryptError(f"{self._name} is not a Fernet token")
                if len(pending) < _HEADER_LEN + _MAC_LEN:
                    continue
                header_sent = True
                yield pending[:_HEADER_LEN]
                pending = pending[_HEADER_LEN:]
            if len(pending) > _MAC_LEN:
                body_len += len(pending) - _MAC_LEN
                yield pending[:-_MAC_LEN]
                pending = pending[-_MAC_LEN:]
        if not header_sent and not pending:
            raise DecryptError(f"{self._name} is empty or not a Fernet token")
        if not header_sent or not decoder.complete() or body_len == 0 or body_len % _BLOCK:
            raise DecryptError(f"{self._name} is truncated or not a complete Fernet token")
        self.mac = pending


def _scan_token(keys: Sequence[bytes], source: BinaryIO, chunk_size: int,
                name: str) -> tuple[int | None, bytes, bytes]:
    """Read the token in ``source`` once, with an HMAC per key over its signed part.

    :returns: the position in ``keys`` of the first key whose HMAC verifies (None: none does), the
        token's header, and its last 32 signed bytes (the IV or the block before the last, then the
        last cipher block: enough to check the padding without decrypting anything else).
    :raises DecryptError: the token is malformed or truncated.
    """
    macs = [hmac.HMAC(_split_key(key)[0], hashes.SHA256()) for key in keys]
    scanner = _TokenScanner(source, chunk_size, name)
    header, tail = b"", b""
    for piece in scanner:
        header = header or piece  # the scanner yields the header first, whole
        tail = (tail + piece[-2 * _BLOCK:])[-2 * _BLOCK:]
        for mac in macs:
            mac.update(piece)
    for position, mac in enumerate(macs):
        try:
            mac.verify(scanner.mac)
            return position, header, tail
        except InvalidSignature:
            pass
    return None, header, tail


def _find_key(keys: Sequence[bytes], source: BinaryIO, chunk_size: int, name: str) -> bytes:
    """Return the first of ``keys`` whose HMAC verifies over the token; read the source once."""
    position, _, _ = _scan_token(keys, source, chunk_size, name)
    if position is None:
        raise DecryptError(f"{name} does not decrypt with the given key(s) or was modified")
    return keys[position]


class InvalidToken(DecryptError):
    """``verify_token``'s finding: ``kind`` is "malformed" (not a Fernet token, empty, truncated),
    "no_key" (no key's HMAC verifies: modified, or made with a key not given) or "bad_padding" (the HMAC
    verifies, so a key holder made it, but ``Fernet.decrypt`` would still refuse it)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class TokenProof:
    """What ``verify_token`` proved of a token."""

    key_position: int  # which of the keys given verifies it: 0 is the one new files are encrypted with
    timestamp: int  # when it was made, in seconds since the epoch, as the token itself says


def verify_token(keys: Sequence[bytes], source: BinaryIO, chunk_size: int = CHUNK_SIZE,
                 name: str = "input") -> TokenProof:
    """Check the Fernet token in ``source`` as ``Fernet.decrypt`` would (format, HMAC, padding) without
    decrypting it: the source is read once and no plaintext exists anywhere (only the last cipher block is
    deciphered, in memory, to check the padding). The timestamp is only reported; judging it is the
    caller's.

    :returns: which key verifies the token and the token's timestamp.
    :raises InvalidToken: the token is malformed or truncated, no key verifies it, or its padding is wrong.
    """
    keys = list(keys)
    if not keys:
        raise DecryptError(f"no key given to verify {name}")
    try:
        position, header, tail = _scan_token(keys, source, chunk_size, name)
    except DecryptError as error:
        raise InvalidToken("malformed", error.message) from None
    if position is None:
        raise InvalidToken("no_key", f"{name} does not verify with the given key(s): it was modified, or "
                                     "encrypted with another key")
    decryptor = Cipher(algorithms.AES(_split_key(keys[position])[1]), modes.CBC(tail[:_BLOCK])).decryptor()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        unpadder.update(decryptor.update(tail[_BLOCK:]) + decryptor.finalize())
        unpadder.finalize()
    except ValueError:
        raise InvalidToken("bad_padding", f"{name} verifies with its key but its padding is invalid: "
                                          "Fernet.decrypt refuses it") from None
    return TokenProof(position, int.from_bytes(header[1:9], "big"))


def decrypt_stream(keys: Sequence[bytes], source: BinaryIO, target: BinaryIO,
                   chunk_size: int = CHUNK_SIZE, name: str = "input") -> int:
    """Decrypt the Fernet token in ``source`` into ``target``; return the plaintext length.

    With several keys a first pass finds the one whose HMAC matches, then ``source`` is rewound
    (so it must be seekable). Plaintext is written BEFORE the HMAC is known to verify: ``target``
    must be a private temp file that is discarded if this raises.

    :raises DecryptError: the token is malformed, truncated, or does not verify with the key(s).
    """
    keys = list(keys)
    if not keys:
        raise DecryptError(f"no key given to decrypt {name}")
    key = keys[0]
    if len(keys) > 1:
        start = source.tell()
        key = _find_key(keys, source, chunk_size, name)
        source.seek(start)
    signing_key, encryption_key = _split_key(key)
    mac = hmac.HMAC(signing_key, hashes.SHA256())
    unpadder = padding.PKCS7(128).unpadder()
    scanner = _TokenScanner(source, chunk_size, name)
    pieces = iter(scanner)
    header = next(pieces)
    mac.update(header)
    cipher = Cipher(algorithms.AES(encryption_key), modes.CBC(header[9:_HEADER_LEN])).decryptor()
    written = 0
    for piece in pieces:
        mac.update(piece)
        plain = unpadder.update(cipher.update(piece))
        target.write(plain)
        written += len(plain)
    try:
        mac.verify(scanner.mac)  # the file may have changed since _find_key's pass
        tail = unpadder.update(cipher.finalize()) + unpadder.finalize()
    except (InvalidSignature, ValueError):
        raise DecryptError(f"{name} does not decrypt with the given key(s) or was modified") from None
    target.write(tail)
    return written + len(tail)


def decrypted_name(source: Path) -> str:
    """Given an encrypted file's path, return the name of its plaintext beside it.

    ``export_2.zip`` becomes ``export_2.decrypted.zip``: clearly not the input, and still a ``.zip`` that
    opens with a double click.
    """
    source = Path(source)
    return f"{source.stem}.decrypted{source.suffix}"


def output_path_for(source: Path, output_dir: Path | None) -> Path:
    """Given an encrypted file and ``decrypt --output-dir`` (or None), return where its plaintext goes.

    Without a folder: beside the input, named by ``decrypted_name``. With a folder: there, under the
    input's own name, unless that folder is the input's own (the name would be the input's), then by
    ``decrypted_name`` as well.
    """
    source = Path(source)
    if output_dir is None:
        return source.with_name(decrypted_name(source))
    target = Path(output_dir) / source.name
    if _same_file(source, target):
        return Path(output_dir) / decrypted_name(source)
    return target


def make_output_dir(folder: Path) -> None:
    """Create ``folder`` and its parents for plaintext, the new folder itself private (0700).

    :raises OutputFileError: ``folder`` is a file, or cannot be created.
    """
    folder = Path(folder)
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputFileError(f"output folder {folder} is a file; choose another --output-dir") from None
    except OSError as exc:
        raise OutputFileError(f"cannot create output folder {folder}: {exc.strerror or exc}") from None


def _same_file(first: Path, second: Path) -> bool:
    """Tell whether two paths name one file (same path, or links to one inode)."""
    if first.resolve() == second.resolve():
        return True
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


def _open_source(source_path: Path) -> BinaryIO:
    try:
        return open(source_path, "rb")
    except FileNotFoundError:
        raise DecryptError(f"{source_path} does not exist") from None
    except OSError as exc:
        raise DecryptError(f"cannot read {source_path}: {exc.strerror or exc}") from None


def decrypt_file(keys: Sequence[bytes], source_path: Path, target_path: Path, *,
                 overwrite: bool = False) -> int:
    """Decrypt file ``source_path`` to a new 0600 file ``target_path``; return the plaintext length.

    The plaintext goes to a temp file beside the target and is renamed only once verified; on any
    failure neither the target nor the temp file is left behind.

    :raises DecryptError: the source is missing, unreadable or not a token made with one of ``keys``.
    :raises OutputFileError: the target is the source, exists and ``overwrite`` is False, or cannot be
        written (its folder is missing, not writable, the disk is full).
    """
    source_path, target_path = Path(source_path), Path(target_path)
    with _open_source(source_path) as source:
        if _same_file(source_path, target_path):
            raise OutputFileError(f"refusing to decrypt {source_path} onto itself; choose another output")
        if not overwrite and os.path.lexists(target_path):
            raise OutputFileError(f"{target_path} already exists; pass --force to replace it")
        if not target_path.parent.is_dir():
            raise OutputFileError(f"cannot write {target_path}: folder {target_path.parent} is missing")
        try:
            with atomic_write(target_path, overwrite=overwrite) as target:
                return decrypt_stream(keys, source, target, name=str(source_path))
        except FileExistsError:
            raise OutputFileError(f"{target_path} already exists; pass --force to replace it") from None
        except OSError as exc:
            raise OutputFileError(f"cannot decrypt {source_path} to {target_path}: "
                                  f"{exc.strerror or exc}") from None


def decrypt_to_stream(keys: Sequence[bytes], source_path: Path, out: BinaryIO,
                      temp_dir: Path | None = None) -> int:
    """Decrypt file ``source_path`` and copy the verified plaintext to ``out``; return its length.

    The plaintext is first decrypted into a private temp file in ``temp_dir`` (default: the system
    temp folder), which is removed in every outcome; ``out`` receives nothing unless the HMAC verified.

    :raises DecryptError: as ``decrypt_stream``, or when the temp file cannot be created or written.
        Errors writing to ``out`` propagate unchanged.
    """
    folder = Path(temp_dir) if temp_dir is not None else Path(tempfile.gettempdir())
    with _open_source(Path(source_path)) as source, contextlib.ExitStack() as stack:
        try:
            temp, _ = stack.enter_context(private_temp_file(folder, prefix=".bsu-decrypt-"))
            size = decrypt_stream(keys, source, temp, name=str(source_path))
            temp.flush()
            temp.seek(0)
        except OSError as exc:
            raise DecryptError(f"cannot decrypt {source_path} via a temp file in {folder}: "
                               f"{exc.strerror or exc}") from None
        shutil.copyfileobj(temp, out, CHUNK_SIZE)
        return size
