"""Unit tests for ssh_keys: loading private keys and known_hosts files, each failure with its own message."""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa

from broker_sftp_uploader.errors import KeyFileError, SftpError
from broker_sftp_uploader.sftp.ssh_keys import (
    KnownHosts,
    known_hosts_bytes,
    load_known_hosts,
    load_private_key,
    ssh_fingerprint,
)

PASSPHRASE = "correct horse battery"
NEW_KEYS = {
    "ed25519": ed25519.Ed25519PrivateKey.generate,
    "ecdsa": lambda: ec.generate_private_key(ec.SECP256R1()),
    "rsa": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
}
PARAMIKO_NAMES = {"ed25519": "ssh-ed25519", "ecdsa": "ecdsa-sha2-nistp256", "rsa": "ssh-rsa"}
# PEM as `ssh-keygen -m PEM` writes it (PKCS#1 / SEC1), except ed25519, which only exists as PKCS#8 PEM.
PEM_FORMATS = {"ed25519": serialization.PrivateFormat.PKCS8,
               "ecdsa": serialization.PrivateFormat.TraditionalOpenSSL,
               "rsa": serialization.PrivateFormat.TraditionalOpenSSL}
ENCRYPTED_FORMATS = [serialization.PrivateFormat.OpenSSH, serialization.PrivateFormat.PKCS8,
                     serialization.PrivateFormat.TraditionalOpenSSL]


def write_key(tmp_path: Path, key, key_format, passphrase: str | None = None, name: str = "id") -> Path:
    encryption = (serialization.BestAvailableEncryption(passphrase.encode()) if passphrase
                  else serialization.NoEncryption())
    path = tmp_path / name
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, key_format, encryption))
    path.chmod(0o600)
    return path


def key_error(path: Path, passphrase: str | None = None) -> str:
    with pytest.raises(KeyFileError) as caught:
        load_private_key(path, passphrase)
    assert caught.value.exit_code == 12
    message = str(caught.value)
    assert str(path) in message and "SFTP.PRIVATE_KEY" in message
    assert "SFTP.PASSWORD" not in message
    return message


# --- private keys ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
@pytest.mark.parametrize("key_format", ["openssh", "pem"])
@pytest.mark.parametrize("key_type", sorted(NEW_KEYS))
def test_load_every_type_and_format(tmp_path, key_type, key_format, encrypted):
    key = NEW_KEYS[key_type]()
    private_format = serialization.PrivateFormat.OpenSSH if key_format == "openssh" else PEM_FORMATS[key_type]
    path = write_key(tmp_path, key, private_format, PASSPHRASE if encrypted else None)
    loaded = load_private_key(path, PASSPHRASE if encrypted else None)
    assert loaded.get_name() == PARAMIKO_NAMES[key_type]
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    assert loaded.get_base64() == public.split()[1].decode()


def test_missing_key(tmp_path):
    path = tmp_path / "absent"
    assert key_error(path) == f"SSH private key {path} (SFTP.PRIVATE_KEY) does not exist"


def test_directory_and_fifo_are_not_key_files(tmp_path):
    assert key_error(tmp_path).endswith("is not a regular file")
    os.mkfifo(tmp_path / "pipe")
    assert key_error(tmp_path / "pipe").endswith("is not a regular file")


@pytest.mark.parametrize("content, reason", [
    (b"", "is not a private key in OpenSSH or PEM format"),
    (b"not a key at all, but it says hunter2\n", "is not a private key in OpenSSH or PEM format"),
    (b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAb3 user@host\n",
     "holds a public key; SFTP.PRIVATE_KEY needs the private one (usually the name without .pub)"),
    (b"PuTTY-User-Key-File-3: ssh-ed25519\n", "is a PuTTY key; convert it to OpenSSH format"),
    (b"-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA!!!!\n-----END OPENSSH PRIVATE KEY-----\n",
     "is damaged or not a valid private key"),
    (b"-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n",
     "is damaged or not a valid private key"),
])
def test_not_a_key(tmp_path, content, reason):
    path = tmp_path / "id"
    path.write_bytes(content)
    message = key_error(path)
    assert reason in message
    assert "hunter2" not in message and "AAAA" not in message


def test_oversized_file_is_refused_without_reading_it_all(tmp_path):
    path = tmp_path / "big"
    path.write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----\n" + b"A" * (2 * 1024 * 1024))
    assert key_error(path).endswith("is larger than 1 MiB, so it is not a private key")


@pytest.mark.parametrize("new_key", [lambda: dsa.generate_private_key(key_size=2048),
                                     lambda: ec.generate_private_key(ec.SECP256K1())],
                         ids=["dsa", "secp256k1"])
def test_unsupported_key_type(tmp_path, new_key):
    path = write_key(tmp_path, new_key(), serialization.PrivateFormat.TraditionalOpenSSL)
    assert "is of a type this tool does not support; use an ed25519, ECDSA or RSA key" in key_error(path)


@pytest.mark.parametrize("key_format", ENCRYPTED_FORMATS)
def test_encrypted_key_without_passphrase(tmp_path, key_format):
    path = write_key(tmp_path, NEW_KEYS["ecdsa"](), key_format, PASSPHRASE)
    message = key_error(path)
    assert message == (f"SSH private key {path} (SFTP.PRIVATE_KEY) is encrypted; give its passphrase in "
                       "SFTP.PRIVATE_KEY_PASSPHRASE, SFTP.PRIVATE_KEY_PASSPHRASE_FILE or the environment "
                       "variable BROKER_SFTP_UPLOADER_SFTP_PRIVATE_KEY_PASSPHRASE")


@pytest.mark.parametrize("key_format", ENCRYPTED_FORMATS)
def test_wrong_passphrase(tmp_path, key_format):
    path = write_key(tmp_path, NEW_KEYS["rsa"](), key_format, PASSPHRASE)
    message = key_error(path, "hunter2-wrong")
    assert message.startswith("the passphrase (SFTP.PRIVATE_KEY_PASSPHRASE) does not decrypt SSH private key")
    assert "hunter2" not in message and PASSPHRASE not in message


def test_passphrase_for_a_plain_key_is_not_needed(tmp_path, caplog):
    path = write_key(tmp_path, NEW_KEYS["ed25519"](), serialization.PrivateFormat.OpenSSH)
    with caplog.at_level(logging.WARNING):
        assert load_private_key(path, "hunter2-unused").get_name() == "ssh-ed25519"
    assert [record.getMessage() for record in caplog.records] == [
        (f"SSH private key {path} (SFTP.PRIVATE_KEY) is not encrypted, so SFTP.PRIVATE_KEY_PASSPHRASE is not "
        "used")]


def test_key_readable_by_others_warns(tmp_path, caplog):
    path = write_key(tmp_path, NEW_KEYS["ed25519"](), serialization.PrivateFormat.OpenSSH)
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        load_private_key(path, None)
    assert [record.getMessage() for record in caplog.records] == [
        (f"SSH private key {path} (SFTP.PRIVATE_KEY) is accessible by group or others (mode 644); "
        f"run: chmod 600 {path}")]


# --- known_hosts -------------------------------------------------------------------------------------------


@pytest.fixture
def host_key() -> paramiko.PKey:
    return paramiko.Ed25519Key(data=_public_blob(ed25519.Ed25519PrivateKey.generate()))


def _public_blob(private) -> bytes:
    public = private.public_key()
    line = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return base64.b64decode(line.split()[1])


def test_missing_known_hosts_is_empty(tmp_path):
    known = load_known_hosts(tmp_path / "known_hosts")
    assert len(known.host_keys) == 0 and known.revoked == []


def test_known_hosts_entries_comments_hashes_and_foreign_types(tmp_path, host_key):
    other = paramiko.Ed25519Key(data=_public_blob(ed25519.Ed25519PrivateKey.generate()))
    hashed = paramiko.HostKeys.hash_host("[sftp.example.org]:2222")
    path = tmp_path / "known_hosts"
    path.write_text("# pinned by hand\n\n"
                    f"[127.0.0.1]:2222,other.example.org ssh-ed25519 {host_key.get_base64()} comment here\n"
                    f"{hashed} ssh-ed25519 {other.get_base64()}\n"
                    "sftp.example.org sk-ssh-ed25519@openssh.com AAAAGnNrLXNzaC1lZDI1NTE5QG9wZW5zc2guY29t\n"
                    f"@cert-authority *.example.org ssh-ed25519 {other.get_base64()}\n"
                    f"@revoked * ssh-ed25519 {other.get_base64()}\n")
    known = load_known_hosts(path)
    assert known.host_keys.lookup("[127.0.0.1]:2222")["ssh-ed25519"] == host_key
    assert known.host_keys.lookup("other.example.org")["ssh-ed25519"] == host_key
    assert known.host_keys.lookup("[sftp.example.org]:2222")["ssh-ed25519"] == other
    assert known.host_keys.lookup("sftp.example.org") is None
    assert known.revoked == [other]


@pytest.mark.parametrize("line, problem", [
    ("[127.0.0.1]:2222 ssh-ed25519 AAAA!not-base64!hunter2", "the key is not valid base64"),
    ("[127.0.0.1]:2222 ssh-ed25519", "not an entry of the form 'HOSTS KEY-TYPE BASE64-KEY'"),
    ("garbage", "not an entry of the form 'HOSTS KEY-TYPE BASE64-KEY'"),
    ("[127.0.0.1]:2222 ssh-ed25519 aHVudGVyMgo=", "the key is not a valid ssh-ed25519 key"),
    ("[127.0.0.1]:2222 ssh-rsa aHVudGVyMgo=", "the key is not a valid ssh-rsa key"),
    ("@trusted host ssh-ed25519 aHVudGVyMgo=", "unknown marker (only @revoked and @cert-authority exist)"),
])
def test_bad_known_hosts_line_names_file_and_line(tmp_path, host_key, line, problem):
    path = tmp_path / "known_hosts"
    path.write_text(f"# ok\nhost ssh-ed25519 {host_key.get_base64()}\n{line}\n")
    with pytest.raises(SftpError) as caught:
        load_known_hosts(path)
    assert caught.value.exit_code == 14
    assert str(caught.value) == (f"known_hosts file {path}, line 3: {problem}; fix or delete that line "
                                 "(`ssh-keyscan -p PORT HOST` prints the server's keys)")


def test_known_hosts_not_utf8(tmp_path, host_key):
    path = tmp_path / "known_hosts"
    path.write_bytes(f"host ssh-ed25519 {host_key.get_base64()}\n".encode() + b"\xff\xfe host\n")
    with pytest.raises(SftpError, match=f"^known_hosts file {path}, line 2: not UTF-8 text; "):
        load_known_hosts(path)


def test_known_hosts_directory(tmp_path):
    with pytest.raises(SftpError) as caught:
        load_known_hosts(tmp_path)
    assert str(caught.value) == (f"known_hosts file {tmp_path} is a directory; remove it or point "
                                 "SFTP.KNOWN_HOSTS at a file (a missing file is created at the first "
                                 "connection)")


def test_record_appends_and_keeps_every_other_line(tmp_path, host_key):
    path = tmp_path / "known_hosts"
    kept = "# mine\nsftp.example.org sk-ssh-ed25519@openssh.com AAAAGnNrLXNzaC1lZDI1NTE5QG9wZW5zc2guY29t"
    path.write_text(kept)  # no newline at the end
    path.chmod(0o600)
    load_known_hosts(path).record("[127.0.0.1]:2222", host_key)
    assert path.read_text() == f"{kept}\n[127.0.0.1]:2222 ssh-ed25519 {host_key.get_base64()}\n"
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_known_hosts(path).host_keys.lookup("[127.0.0.1]:2222")["ssh-ed25519"] == host_key


def test_record_creates_the_file(tmp_path, host_key):
    path = tmp_path / "known_hosts"
    load_known_hosts(path).record("host", host_key)
    assert path.read_text() == f"host ssh-ed25519 {host_key.get_base64()}\n"
    assert path.stat().st_mode & 0o777 == 0o644


def test_record_failure_names_the_file(tmp_path, host_key):
    (tmp_path / "file").write_text("")
    path = tmp_path / "file" / "known_hosts"  # its folder is a file: cannot be written, even by root
    with pytest.raises(SftpError, match=f"^cannot record the host key of host in {path}: "):
        KnownHosts(path).record("host", host_key)


def test_revoked_key_is_refused(tmp_path, host_key):
    path = tmp_path / "known_hosts"
    path.write_text(f"@revoked * ssh-ed25519 {host_key.get_base64()}\n")
    with pytest.raises(SftpError, match=r"is marked @revoked in"):
        load_known_hosts(path).check_not_revoked("host:22", host_key)


def test_ssh_fingerprint_is_openssh_style(host_key):
    digest = __import__("hashlib").sha256(base64.b64decode(host_key.get_base64())).digest()
    assert ssh_fingerprint(host_key) == "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def test_known_hosts_snapshot_is_the_content_or_none_when_unreadable(tmp_path):
    path = tmp_path / "known_hosts"
    assert known_hosts_bytes(path) is None  # missing
    path.write_bytes(b"host ssh-ed25519 AAAA\n")
    assert known_hosts_bytes(path) == b"host ssh-ed25519 AAAA\n"
    assert known_hosts_bytes(tmp_path) is None  # a directory
