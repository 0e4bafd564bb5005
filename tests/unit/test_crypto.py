"""Tests of broker_sftp_uploader.crypto with real cryptography; ``Fernet`` is the oracle both ways."""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import random
import tracemalloc
from pathlib import Path

import pytest
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from broker_sftp_uploader import crypto
from broker_sftp_uploader.crypto import (
    CHUNK_SIZE,
    EncryptingReader,
    StreamEncryptor,
    decrypt_file,
    decrypt_stream,
    decrypt_to_stream,
    encrypt_stream,
    encrypted_size,
    generate_key_file,
    key_fingerprint,
    load_keys,
    output_path_for,
)
from broker_sftp_uploader.errors import EXIT_KEY, EXIT_OUTPUT, DecryptError, KeyFileError, OutputFileError

MIB = 1024 * 1024
SMALL_CHUNK = 48
SIZES = sorted({0, 1, 15, 16, 17, 31, 32, 33}
               | {c + d for c in (SMALL_CHUNK, CHUNK_SIZE) for d in (-1, 0, 1)}
               | {3 * MIB + 5})
B64_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def payload(size: int) -> bytes:
    return random.Random(size).randbytes(size)


def ours_encrypt(key: bytes, data: bytes, chunk_size: int = CHUNK_SIZE) -> bytes:
    out = io.BytesIO()
    written = encrypt_stream(key, io.BytesIO(data), out, chunk_size)
    assert written == len(out.getvalue())
    return out.getvalue()


def ours_decrypt(keys: list[bytes], token: bytes, chunk_size: int = CHUNK_SIZE) -> bytes:
    out = io.BytesIO()
    written = decrypt_stream(keys, io.BytesIO(token), out, chunk_size)
    assert written == len(out.getvalue())
    return out.getvalue()


def with_bit_flipped(token: bytes, position: int, significant: bool) -> bytes:
    """Replace the base64 character at ``position`` by another one (or "=" by "A").

    ``significant`` flips the top bit of the 6-bit value, which always changes the decoded bytes;
    otherwise the lowest bit, which may fall into the unused bits before "=" padding.
    """
    old = token[position]
    if old == ord("="):
        new = ord("A")
    else:
        new = B64_CHARS[B64_CHARS.index(old) ^ (32 if significant else 1)]
    return token[:position] + bytes([new]) + token[position + 1:]


@pytest.fixture
def key() -> bytes:
    return Fernet.generate_key()


class GeneratedSource:
    """A readable stream of ``total`` bytes built from one repeated block; allocates nothing per read."""

    def __init__(self, total: int, block: bytes):
        self.remaining = total
        self.block = block

    def read(self, n: int = -1) -> bytes:
        if self.remaining <= 0:
            return b""
        take = min(self.remaining, len(self.block) if n < 0 else n, len(self.block))
        self.remaining -= take
        return self.block if take == len(self.block) else self.block[:take]


class CountingSink:
    def __init__(self) -> None:
        self.count = 0

    def write(self, data: bytes) -> int:
        self.count += len(data)
        return len(data)


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [SMALL_CHUNK, CHUNK_SIZE])
@pytest.mark.parametrize("size", SIZES)
def test_our_token_decrypts_with_fernet(key, size, chunk_size):
    data = payload(size)
    token = ours_encrypt(key, data, chunk_size)
    assert Fernet(key).decrypt(token) == data
    assert len(token) == encrypted_size(size)


@pytest.mark.parametrize("chunk_size", [SMALL_CHUNK, CHUNK_SIZE])
@pytest.mark.parametrize("size", SIZES)
def test_fernet_token_decrypts_with_ours(key, size, chunk_size):
    data = payload(size)
    assert ours_decrypt([key], Fernet(key).encrypt(data), chunk_size) == data


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 100, 1000])
def test_token_equals_fernet_token_for_same_time_and_iv(key, size):
    data, timestamp, iv = payload(size), 1_700_000_000, bytes(range(16))
    expected = Fernet(key)._encrypt_from_parts(data, timestamp, iv)
    encryptor = StreamEncryptor(key, timestamp=timestamp, iv=iv)
    rnd, pos, out = random.Random(size), 0, []
    while pos < size:  # uneven update sizes must not matter
        step = rnd.randint(0, 40)
        out.append(encryptor.update(data[pos:pos + step]))
        pos += step
    assert b"".join(out) + encryptor.finalize() == expected


def test_encrypted_size_matches_actual_tokens(key):
    fernet = Fernet(key)
    for size in range(260):
        assert encrypted_size(size) == len(fernet.encrypt(b"x" * size)), size
    for size in (4095, 4096, 4097, CHUNK_SIZE * 3 + 2, MIB + 1):
        assert encrypted_size(size) == len(ours_encrypt(key, bytes(size))), size


def test_finalize_twice_is_an_error(key):
    encryptor = StreamEncryptor(key)
    encryptor.finalize()
    with pytest.raises(ValueError):
        encryptor.finalize()
    with pytest.raises(ValueError):
        encryptor.update(b"x")


def test_invalid_key_is_rejected_without_echoing_it():
    with pytest.raises(ValueError) as info:
        StreamEncryptor(b"not-a-key")
    assert "not-a-key" not in str(info.value)


# --- EncryptingReader --------------------------------------------------------------------------


@pytest.mark.parametrize("read_size", [1, 7, 32768, -1])
def test_encrypting_reader_gives_the_token(key, read_size):
    data, timestamp, iv = payload(100_003), 1_700_000_000, os.urandom(16)
    reader = EncryptingReader(io.BytesIO(data), key, chunk_size=4099, timestamp=timestamp, iv=iv)
    pieces = []
    while piece := reader.read(read_size):
        assert read_size < 0 or len(piece) <= read_size
        pieces.append(piece)
    token = b"".join(pieces)
    assert token == Fernet(key)._encrypt_from_parts(data, timestamp, iv)
    assert Fernet(key).decrypt(token) == data
    assert reader.plain_bytes_read == len(data)
    assert reader.read(10) == b""


def test_encrypting_reader_of_empty_source(key):
    reader = EncryptingReader(io.BytesIO(b""), key)
    assert Fernet(key).decrypt(reader.read(32768)) == b""
    assert reader.plain_bytes_read == 0


# --- base64 leniency: same decisions as base64.urlsafe_b64decode --------------------------------


def test_base64_decoder_agrees_with_urlsafe_b64decode():
    rnd = random.Random(7)
    alphabet = B64_CHARS + b"+/= \n\r\t!\x80"
    for _ in range(3000):
        text = bytes(rnd.choice(alphabet) for _ in range(rnd.randrange(0, 24)))
        try:
            expected = base64.urlsafe_b64decode(text)
        except binascii.Error:
            expected = None
        decoder, pos, out = crypto._Base64Decoder(), 0, []
        while pos < len(text):
            step = rnd.randint(1, 5)
            out.append(decoder.feed(text[pos:pos + step]))
            pos += step
        assert (b"".join(out) if decoder.complete() else None) == expected, text


@pytest.mark.parametrize("chunk_size", [1, 3, 7, SMALL_CHUNK])
def test_whitespace_anywhere_is_accepted_like_fernet(key, chunk_size):
    data = payload(300)
    token = Fernet(key).encrypt(data)
    wrapped = b"\n".join(token[i:i + 76] for i in range(0, len(token), 76)) + b"\r\n"
    spaced = b" ".join(token[i:i + 5] for i in range(0, len(token), 5)) + b"\n\n"
    for text in (token + b"\n", wrapped, spaced):
        assert Fernet(key).decrypt(text) == data
        assert ours_decrypt([key], text, chunk_size) == data


# --- decrypt_file: tampering, truncation, wrong input -------------------------------------------


def assert_rejected(keys, folder: Path, content: bytes) -> DecryptError:
    source = folder / "in.fernet"
    source.write_bytes(content)
    with pytest.raises(DecryptError) as info:
        decrypt_file(keys, source, folder / "out.bin")
    assert sorted(p.name for p in folder.iterdir()) == ["in.fernet"]  # no output, no temp file
    assert info.value.exit_code == EXIT_KEY
    assert "\n" not in str(info.value)
    return info.value


@pytest.mark.parametrize("size", [10, 40])  # a token with "==" padding and one without
def test_any_changed_character_is_rejected(key, tmp_path, size):
    token = Fernet(key).encrypt(payload(size))
    for position in range(len(token)):
        tampered = with_bit_flipped(token, position, significant=True)
        with pytest.raises(InvalidToken):
            Fernet(key).decrypt(tampered)
        assert_rejected([key], tmp_path, tampered)


def assert_judged_like_fernet(key, tmp_path, content: bytes, data: bytes, chunk_size: int) -> None:
    """Ours rejects ``content`` exactly when Fernet does, and otherwise decrypts it to ``data``."""
    try:
        expected = Fernet(key).decrypt(content)
    except InvalidToken:
        assert_rejected([key], tmp_path, content)
    else:
        assert expected == data
        assert ours_decrypt([key], content, chunk_size) == data


def test_changes_in_unused_padding_bits_are_judged_like_fernet(key, tmp_path):
    data = payload(10)
    token = Fernet(key).encrypt(data)
    assert token.endswith(b"==")
    for position in range(len(token)):
        assert_judged_like_fernet(key, tmp_path, with_bit_flipped(token, position, significant=False), data, 5)


def test_truncated_token_is_rejected(key, tmp_path):
    token = Fernet(key).encrypt(payload(200))
    for cut in (1, 4, 10, 33, 40, 76, 100, len(token) - 44, len(token) - 4, len(token) - 1):
        with pytest.raises(InvalidToken):
            Fernet(key).decrypt(token[:cut])
        assert_rejected([key], tmp_path, token[:cut])


def test_wrong_key_is_rejected(key, tmp_path):
    error = assert_rejected([Fernet.generate_key()], tmp_path, Fernet(key).encrypt(b"secret"))
    assert "does not decrypt with the given key(s) or was modified" in str(error)


@pytest.mark.parametrize("content", [
    b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(range(256)) * 4,
    b"",
    b" \n\t\n",
    b"hello, this is just some text\n" * 20,
    base64.urlsafe_b64encode(b"\x81" + bytes(100)),
])
def test_non_fernet_input_is_rejected(key, tmp_path, content):
    with pytest.raises(InvalidToken):
        Fernet(key).decrypt(content)
    error = assert_rejected([key], tmp_path, content)
    assert "in.fernet" in str(error)
    assert "Fernet token" in str(error)


@pytest.mark.parametrize("suffix", [b"A", b"AB", b"ABC", b"ABCD", b"=", b"==", b"AB==", b"ABC=", b"\x00"])
@pytest.mark.parametrize("size", [10, 40])  # a token with "==" padding and one without
def test_text_after_the_token_is_judged_like_fernet(key, tmp_path, size, suffix):
    data = payload(size)
    assert_judged_like_fernet(key, tmp_path, Fernet(key).encrypt(data) + suffix, data, 3)


def signed_token(key: bytes, body: bytes, version: int = 0x80) -> bytes:
    """A token around ``body`` (raw ciphertext) with a valid HMAC, for malformed-but-signed cases."""
    raw_key = base64.urlsafe_b64decode(key)
    signed = bytes([version]) + (1_700_000_000).to_bytes(8, "big") + bytes(16) + body
    mac = hmac.HMAC(raw_key[:16], hashes.SHA256())
    mac.update(signed)
    return base64.urlsafe_b64encode(signed + mac.finalize())


def cbc_encrypt(key: bytes, padded: bytes) -> bytes:
    encryptor = Cipher(algorithms.AES(base64.urlsafe_b64decode(key)[16:]), modes.CBC(bytes(16))).encryptor()
    return encryptor.update(padded) + encryptor.finalize()


def test_signed_but_malformed_tokens_are_rejected(key, tmp_path):
    good = signed_token(key, cbc_encrypt(key, b"abc" + bytes([13]) * 13))
    assert Fernet(key).decrypt(good) == b"abc"
    assert ours_decrypt([key], good) == b"abc"
    for content in (
        signed_token(key, b""),  # no ciphertext
        signed_token(key, bytes(15)),  # not block-aligned
        signed_token(key, bytes(33)),
        signed_token(key, cbc_encrypt(key, b"abc" + bytes(13))),  # bad PKCS7 padding
        signed_token(key, cbc_encrypt(key, b"abc" + bytes([17]) * 13)),
        signed_token(key, cbc_encrypt(key, b"x" * 16), version=0x81),
    ):
        with pytest.raises(InvalidToken):
            Fernet(key).decrypt(content)
        assert_rejected([key], tmp_path, content)
        assert_rejected([Fernet.generate_key(), key], tmp_path, content)


def test_file_changed_between_key_search_and_decryption_is_rejected(key):
    old_key = Fernet.generate_key()
    token = Fernet(old_key).encrypt(payload(1000))

    class Changing(io.BytesIO):
        def seek(self, *args):  # the second pass sees different content
            self.__init__(with_bit_flipped(token, 200, significant=True))
            return super().seek(*args)

    with pytest.raises(DecryptError):
        decrypt_stream([key, old_key], Changing(token), io.BytesIO())


# --- multiple keys -----------------------------------------------------------------------------


def test_old_key_still_decrypts_when_listed(key, tmp_path):
    old_key = Fernet.generate_key()
    source = tmp_path / "old.fernet"
    source.write_bytes(ours_encrypt(old_key, b"from last year"))
    assert decrypt_file([key, old_key], source, tmp_path / "plain") == len(b"from last year")
    assert (tmp_path / "plain").read_bytes() == b"from last year"
    assert ours_decrypt([old_key, key], ours_encrypt(key, b"new"), 7) == b"new"


def test_no_listed_key_matches(key, tmp_path):
    token = Fernet(key).encrypt(b"data")
    assert_rejected([Fernet.generate_key(), Fernet.generate_key()], tmp_path, token)


def test_first_key_in_file_encrypts(key, tmp_path):
    old_key = Fernet.generate_key()
    key_file = tmp_path / "keys"
    key_file.write_bytes(b"# current\n" + key + b"\n# previous\n" + old_key + b"\n")
    key_file.chmod(0o600)
    keys = load_keys(key_file)
    assert keys == [key, old_key]
    Fernet(key).decrypt(ours_encrypt(keys[0], b"x"))


# --- key files ---------------------------------------------------------------------------------


def test_generate_key_file(tmp_path):
    path = tmp_path / "upload.key"
    printed = generate_key_file(path)
    assert path.stat().st_mode & 0o777 == 0o600
    content = path.read_bytes()
    assert content.endswith(b"\n") and content.count(b"\n") == 1
    Fernet(content.strip()).decrypt(Fernet(content.strip()).encrypt(b"ok"))
    assert printed == key_fingerprint(content) == key_fingerprint(content.strip().decode())
    assert len(printed) == 8 and int(printed, 16) >= 0
    assert load_keys(path) == [content.strip()]


def test_generate_key_file_never_overwrites(tmp_path):
    path = tmp_path / "upload.key"
    path.write_bytes(b"precious\n")
    with pytest.raises(KeyFileError, match="already exists; refusing to overwrite a key file"):
        generate_key_file(path)
    assert path.read_bytes() == b"precious\n"


def test_generate_key_file_in_missing_folder(tmp_path):
    with pytest.raises(KeyFileError):
        generate_key_file(tmp_path / "missing" / "upload.key")


def test_load_keys_skips_comments_and_blank_lines(tmp_path):
    keys = [Fernet.generate_key() for _ in range(3)]
    path = tmp_path / "keys"
    path.write_bytes(b"\n# comment\n  " + keys[0] + b"  \n\n" + keys[1] + b"\r\n#x\n" + keys[2])
    path.chmod(0o600)
    assert load_keys(path) == keys


@pytest.mark.parametrize("bad", [b"this is not a key", Fernet.generate_key()[:-2],
                                 base64.urlsafe_b64encode(os.urandom(16)), b"\xff" * 44])
def test_load_keys_names_file_and_line_not_the_text(tmp_path, bad):
    path = tmp_path / "keys"
    path.write_bytes(Fernet.generate_key() + b"\n# c\n\n" + bad + b"\n")
    path.chmod(0o600)
    with pytest.raises(KeyFileError) as info:
        load_keys(path)
    message = str(info.value)
    assert str(path) in message and "line 4" in message
    assert bad.decode("latin-1") not in message
    assert info.value.exit_code == EXIT_KEY


@pytest.mark.parametrize("content", [b"", b"# only a comment\n\n"])
def test_load_keys_without_key(tmp_path, content):
    path = tmp_path / "keys"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="holds no key"):
        load_keys(path)


def test_load_keys_missing_file(tmp_path):
    with pytest.raises(KeyFileError, match="nope.key"):
        load_keys(tmp_path / "nope.key")


def test_load_keys_refuses_a_fifo_without_blocking_and_a_huge_file_without_reading_it(tmp_path):
    """A key path naming a FIFO (nobody writes) or a file far too big (/dev/zero's kind) must neither hang
    the run nor fill its memory."""
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(KeyFileError, match=f"key file {tmp_path / 'pipe'} is not a regular file"):
        load_keys(tmp_path / "pipe")
    huge = tmp_path / "huge.key"
    huge.write_bytes(Fernet.generate_key() + b"\n" + b"#" * crypto.KEY_FILE_LIMIT)
    with pytest.raises(KeyFileError, match="is larger than 64 KiB"):
        load_keys(huge)


@pytest.mark.parametrize(("mode", "warned"), [(0o644, True), (0o640, True), (0o600, False), (0o400, False)])
def test_load_keys_warns_about_loose_permissions(tmp_path, caplog, mode, warned):
    key = Fernet.generate_key()
    path = tmp_path / "keys"
    path.write_bytes(key + b"\n")
    path.chmod(mode)
    with caplog.at_level(logging.WARNING, logger="broker_sftp_uploader"):
        load_keys(path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert bool(warnings) == warned
    for message in warnings:
        assert str(path) in message and "chmod 600" in message and key.decode() not in message


def _grant_read_by_acl(path: Path, uid: int) -> None:
    """Do what systemd does to a LoadCredential= file: mode 0400 plus an ACL entry letting ``uid`` read.

    The ACL's mask then shows in the group bits (0440) although no group may read the file.
    """
    everyone = 0xFFFFFFFF
    entries = [(0x01, 4, everyone), (0x02, 4, uid), (0x04, 0, everyone), (0x10, 4, everyone), (0x20, 0, everyone)]
    acl = (2).to_bytes(4, "little") + b"".join(
        tag.to_bytes(2, "little") + perm.to_bytes(2, "little") + who.to_bytes(4, "little")
        for tag, perm, who in entries)
    path.chmod(0o400)
    try:
        os.setxattr(path, "system.posix_acl_access", acl)
    except OSError as exc:  # pragma: no cover - a file system without POSIX ACLs
        pytest.skip(f"no POSIX ACLs on {path.parent}: {exc}")


def test_key_delivered_as_a_systemd_credential_gives_no_warning(tmp_path, caplog, monkeypatch):
    credentials = tmp_path / "credentials" / "broker-sftp-uploader.service"
    credentials.mkdir(parents=True)
    path = credentials / "rki.key"
    path.write_bytes(Fernet.generate_key() + b"\n")
    _grant_read_by_acl(path, 65534)
    assert path.stat().st_mode & 0o777 == 0o440  # what the service sees
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    with caplog.at_level(logging.WARNING, logger="broker_sftp_uploader"):
        load_keys(path)
    assert [r for r in caplog.records if r.levelno == logging.WARNING] == []
    # the same file outside a service's credentials is judged by its mode as usual
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "elsewhere"))
    with caplog.at_level(logging.WARNING, logger="broker_sftp_uploader"):
        load_keys(path)
    assert any("chmod 600" in r.getMessage() for r in caplog.records)


# --- decrypt_file / decrypt_to_stream targets --------------------------------------------------


def test_decrypt_file_writes_private_target(key, tmp_path):
    source = tmp_path / "in.fernet"
    source.write_bytes(ours_encrypt(key, b"plain"))
    assert decrypt_file([key], source, tmp_path / "out") == 5
    assert (tmp_path / "out").read_bytes() == b"plain"
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.fernet", "out"]


def test_decrypt_file_never_overwrites_its_input(key, tmp_path):
    source = tmp_path / "in.fernet"
    token = ours_encrypt(key, b"plain")
    source.write_bytes(token)
    (tmp_path / "link").symlink_to(source)
    os.link(source, tmp_path / "hard")
    for target in (source, tmp_path / "link", tmp_path / "hard", tmp_path / "." / "in.fernet"):
        with pytest.raises(OutputFileError, match="onto itself") as caught:
            decrypt_file([key], source, target, overwrite=True)
        assert caught.value.exit_code == EXIT_OUTPUT
        assert source.read_bytes() == token


def test_decrypt_file_refuses_existing_target(key, tmp_path):
    source, target = tmp_path / "in.fernet", tmp_path / "out"
    source.write_bytes(ours_encrypt(key, b"new"))
    target.write_bytes(b"old")
    with pytest.raises(OutputFileError, match="already exists") as caught:
        decrypt_file([key], source, target)
    assert caught.value.exit_code == EXIT_OUTPUT != EXIT_KEY
    assert target.read_bytes() == b"old"
    decrypt_file([key], source, target, overwrite=True)
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.fernet", "out"]


def test_decrypt_file_into_a_missing_folder_is_an_output_error(key, tmp_path):
    source = tmp_path / "in.fernet"
    source.write_bytes(ours_encrypt(key, b"plain"))
    with pytest.raises(OutputFileError, match="missing"):
        decrypt_file([key], source, tmp_path / "missing" / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.fernet"]


def test_decrypt_file_with_a_bad_token_does_not_report_the_output(key, tmp_path):
    """A tampered input is the key/input's fault (12), even when the output also exists."""
    source, target = tmp_path / "in.fernet", tmp_path / "out"
    source.write_bytes(with_bit_flipped(ours_encrypt(key, b"plain" * 100), 60, significant=True))
    with pytest.raises(DecryptError):
        decrypt_file([key], source, target)
    assert not target.exists()


# --- where decrypt writes by default -----------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), [
    ("export_0.zip", "export_0.decrypted.zip"),
    ("export_12.zip", "export_12.decrypted.zip"),
    ("token", "token.decrypted"),
    ("archive.tar.gz", "archive.tar.decrypted.gz"),
])
def test_output_beside_the_input_gets_a_decrypted_name(tmp_path, name, expected):
    assert output_path_for(tmp_path / name, None) == tmp_path / expected
    assert output_path_for(Path(name), None) == Path(expected)


def test_output_dir_keeps_the_input_name(tmp_path):
    assert output_path_for(tmp_path / "in" / "export_2.zip", tmp_path / "plain") == tmp_path / "plain" / "export_2.zip"


def test_output_dir_that_is_the_input_folder_gets_the_decrypted_name(tmp_path, monkeypatch):
    (tmp_path / "export_2.zip").write_bytes(b"token")
    monkeypatch.chdir(tmp_path)
    assert output_path_for(Path("export_2.zip"), Path(".")) == Path(".") / "export_2.decrypted.zip"
    assert output_path_for(tmp_path / "export_2.zip", tmp_path / "." ) == tmp_path / "export_2.decrypted.zip"


def test_decrypt_file_missing_source(key, tmp_path):
    with pytest.raises(DecryptError, match="missing.fernet"):
        decrypt_file([key], tmp_path / "missing.fernet", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_decrypt_to_stream(key, tmp_path):
    temp_dir = tmp_path / "tmp"
    temp_dir.mkdir()
    source = tmp_path / "in.fernet"
    data = payload(CHUNK_SIZE * 2 + 3)
    source.write_bytes(ours_encrypt(key, data))
    out = io.BytesIO()
    assert decrypt_to_stream([key], source, out, temp_dir=temp_dir) == len(data)
    assert out.getvalue() == data
    source.write_bytes(with_bit_flipped(source.read_bytes(), 5000, significant=True))
    out = io.BytesIO()
    with pytest.raises(DecryptError):
        decrypt_to_stream([key], source, out, temp_dir=temp_dir)
    assert out.getvalue() == b""  # nothing unverified reaches the output
    assert list(temp_dir.iterdir()) == []


# --- memory ------------------------------------------------------------------------------------


def test_memory_stays_bounded_for_a_64_mib_stream(key):
    total = 64 * MIB
    block = os.urandom(CHUNK_SIZE)
    tracemalloc.start()
    try:
        sink = CountingSink()
        written = encrypt_stream(key, GeneratedSource(total, block), sink)
        _, encrypt_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        plain = CountingSink()
        reader = EncryptingReader(GeneratedSource(total, block), key)
        decrypt_stream([key], reader, plain)
        _, decrypt_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert written == sink.count == encrypted_size(total)
    assert plain.count == total
    assert encrypt_peak < 2 * MIB, encrypt_peak
    assert decrypt_peak < 2 * MIB, decrypt_peak


# --- the output folder -------------------------------------------------------------------------


def test_make_output_dir_creates_parents_and_a_private_folder(tmp_path):
    crypto.make_output_dir(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()
    assert (tmp_path / "a" / "b").stat().st_mode & 0o777 == 0o700
    crypto.make_output_dir(tmp_path / "a" / "b")  # an existing folder is fine


def test_make_output_dir_over_a_file_is_an_output_error(tmp_path):
    (tmp_path / "taken").write_bytes(b"x")
    for folder in (tmp_path / "taken", tmp_path / "taken" / "below"):
        with pytest.raises(OutputFileError, match="taken"):
            crypto.make_output_dir(folder)
    assert (tmp_path / "taken").read_bytes() == b"x"


# --- verify_token: the delivery proof's check, judged like Fernet.decrypt, writing nothing ---------------


def fernet_accepts(keys: list[bytes], token: bytes) -> bool:
    try:
        MultiFernet([Fernet(key) for key in keys]).decrypt(token)
    except InvalidToken:
        return False
    return True


def verify_kind(keys: list[bytes], token: bytes, chunk_size: int = CHUNK_SIZE) -> str:
    """"ok" or the ``InvalidToken`` kind ``verify_token`` gives."""
    try:
        crypto.verify_token(keys, io.BytesIO(token), chunk_size)
    except crypto.InvalidToken as error:
        return error.kind
    return "ok"


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 100, 5000])
@pytest.mark.parametrize("chunk_size", [1, 7, SMALL_CHUNK, CHUNK_SIZE])
def test_verify_token_accepts_exactly_what_fernet_decrypts(key, size, chunk_size):
    """Truncations, changed characters and added text: every time the same verdict as Fernet's."""
    token = Fernet(key).encrypt(payload(size))
    generator = random.Random(size * 31 + chunk_size)
    variants = [token, token + b"\n", token[:-1], token[:len(token) // 2], token[:-4], token + b"A", b"",
                b"x"]
    variants += [with_bit_flipped(token, generator.randrange(len(token)),
                                  significant=generator.random() < 0.8) for _ in range(20)]
    for variant in variants:
        kind = verify_kind([key], variant, chunk_size)
        assert (kind == "ok") == fernet_accepts([key], variant), (variant, kind)


def test_verify_token_says_which_key_and_when():
    first, second = Fernet.generate_key(), Fernet.generate_key()
    token = Fernet(second).encrypt_at_time(b"result", 1_700_000_123)
    proof = crypto.verify_token([first, second], io.BytesIO(token))
    assert (proof.key_position, proof.timestamp) == (1, 1_700_000_123)
    assert crypto.verify_token([second], io.BytesIO(token)).key_position == 0
    assert verify_kind([first], token) == "no_key"


def test_verify_token_finds_bad_padding_behind_a_valid_hmac_in_the_last_block(key):
    """The padding sits in the last block, deciphered with the block before it (or the IV) as its IV."""
    cases = {
        "ok": [cbc_encrypt(key, b"abc" + bytes([13]) * 13), cbc_encrypt(key, b"x" * 20 + bytes([12]) * 12)],
        "bad_padding": [cbc_encrypt(key, b"abc" + bytes(13)), cbc_encrypt(key, b"x" * 20 + bytes([17]) * 12),
                        cbc_encrypt(key, b"y" * 47 + bytes([2]))],
        "malformed": [b"", bytes(15), bytes(33)],
    }
    for expected, bodies in cases.items():
        for body in bodies:
            token = signed_token(key, body)
            assert verify_kind([key], token, chunk_size=5) == expected, body
            assert fernet_accepts([key], token) == (expected == "ok")


def test_verify_token_without_keys_is_refused():
    with pytest.raises(DecryptError, match="no key given"):
        crypto.verify_token([], io.BytesIO(b""))


def test_verify_token_of_a_large_token_holds_a_few_chunks():
    key = Fernet.generate_key()
    reader = EncryptingReader(io.BytesIO(bytes(8 * MIB)), key)
    token = io.BytesIO(reader.read())  # outside the measurement
    tracemalloc.start()
    try:
        crypto.verify_token([key, Fernet.generate_key()], token)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * CHUNK_SIZE
