"""SFTP login against the real sshd: keys of every type and format, passphrases, key and password, and
every way it can fail (each: its exit code, one line naming the cause, nothing uploaded, ledger untouched).
Also known_hosts problems and the connect retries."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from broker_sftp_uploader.config import SftpSettings
from broker_sftp_uploader.errors import KeyFileError, SftpError
from broker_sftp_uploader.sftp.connection import SftpConnection, retry_delay
from test_resources.sshd import KEY_FORMATS, KEY_TYPES
from tests.conftest import OUTDATED_LEDGER, assert_failed_cleanly, closed_port

PASSPHRASE_VARIABLE = "BROKER_SFTP_UPLOADER_SFTP_PRIVATE_KEY_PASSPHRASE"


def log_in_as(workspace, sshd, user: str, password: str | None = None, key: Path | None = None,
              *extra: str) -> None:
    """Replace the workspace's password login by the given user, password, key and further SFTP lines."""
    lines = [f'USERNAME = "{user}"']
    lines += [f'PASSWORD = "{password}"'] if password is not None else []
    lines += [f'PRIVATE_KEY = "{key}"'] if key is not None else []
    workspace.rewrite_config(f'USERNAME = "{sshd.password_user}"\nPASSWORD = "{sshd.password}"',
                             "\n".join([*lines, *extra]))


def assert_uploaded(result, workspace) -> None:
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert "export_0.zip" in workspace.remote_names()
    assert workspace.ledger.read_bytes() != OUTDATED_LEDGER


# --- key login ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
@pytest.mark.parametrize("key_format", KEY_FORMATS)
@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_key_login_every_type_and_format(outdated, sshd, key_type, key_format, encrypted):
    passphrase = [f'PRIVATE_KEY_PASSPHRASE = "{sshd.client_key_passphrase}"'] if encrypted else []
    key = sshd.client_key(key_type, key_format, encrypted)
    log_in_as(outdated, sshd, sshd.key_user, None, key, *passphrase)
    assert_uploaded(outdated.sync(), outdated)


def test_passphrase_from_file(outdated, sshd, tmp_path):
    secret = tmp_path / "passphrase"
    secret.write_text(sshd.client_key_passphrase + "\n")
    secret.chmod(0o600)
    log_in_as(outdated, sshd, sshd.key_user, None, sshd.client_key("rsa", "pem", encrypted=True),
              f'PRIVATE_KEY_PASSPHRASE_FILE = "{secret}"')
    assert_uploaded(outdated.sync(), outdated)


def test_passphrase_from_environment(outdated, sshd):
    log_in_as(outdated, sshd, sshd.key_user, None, sshd.client_key("ecdsa", "openssh", encrypted=True))
    assert_uploaded(outdated.sync(env={PASSPHRASE_VARIABLE: sshd.client_key_passphrase}), outdated)


def test_server_demanding_key_and_password(outdated, sshd):
    log_in_as(outdated, sshd, sshd.both_user, sshd.password, sshd.client_key("ed25519"))
    assert_uploaded(outdated.sync(), outdated)


def test_server_demanding_key_and_password_gets_only_the_key(outdated, sshd):
    key = sshd.client_key("ed25519")
    log_in_as(outdated, sshd, sshd.both_user, None, key)
    assert_failed_cleanly(outdated.sync(), 14, f"SFTP login as {sshd.both_user}@127.0.0.1:{sshd.port}: the "
                          f"server accepted the key {key} (SFTP.PRIVATE_KEY) but also demands a password; "
                          "set SFTP.PASSWORD", outdated)


def test_server_demanding_key_and_password_gets_a_wrong_password(outdated, sshd):
    key = sshd.client_key("ed25519")
    log_in_as(outdated, sshd, sshd.both_user, "hunter2-wrong", key)
    line = assert_failed_cleanly(outdated.sync(), 14, f"accepted the key {key} (SFTP.PRIVATE_KEY) but "
                                 "refused the password; check SFTP.PASSWORD", outdated)
    assert "hunter2" not in line


# --- key problems: exit 12, naming the key, never the password -------------------------------------------


def test_missing_key(outdated, sshd, tmp_path):
    log_in_as(outdated, sshd, sshd.key_user, None, tmp_path / "absent")
    line = assert_failed_cleanly(outdated.sync(), 12, f"SSH private key {tmp_path / 'absent'} "
                                 "(SFTP.PRIVATE_KEY) does not exist", outdated)
    assert "SFTP.PASSWORD" not in line


def test_key_path_is_a_directory(outdated, sshd, tmp_path):
    log_in_as(outdated, sshd, sshd.key_user, None, tmp_path)
    assert_failed_cleanly(outdated.sync(), 12, f"SSH private key {tmp_path} (SFTP.PRIVATE_KEY) is not a "
                          "regular file", outdated)


def test_key_file_that_is_no_key(outdated, sshd, tmp_path):
    not_a_key = tmp_path / "id_ed25519"
    not_a_key.write_text("this is no key, the password is hunter2\n")
    not_a_key.chmod(0o600)
    log_in_as(outdated, sshd, sshd.key_user, None, not_a_key)
    line = assert_failed_cleanly(outdated.sync(), 12, f"SSH private key {not_a_key} (SFTP.PRIVATE_KEY) is "
                                 "not a private key in OpenSSH or PEM format", outdated)
    assert "hunter2" not in line


def test_public_key_given_as_private_key(outdated, sshd):
    public = sshd.client_key("rsa").with_suffix(".pub")
    log_in_as(outdated, sshd, sshd.key_user, None, public)
    assert_failed_cleanly(outdated.sync(), 12, "holds a public key; SFTP.PRIVATE_KEY needs the private one",
                          outdated)


def test_encrypted_key_without_passphrase(outdated, sshd):
    key = sshd.client_key("ed25519", "pem", encrypted=True)
    log_in_as(outdated, sshd, sshd.key_user, None, key)
    assert_failed_cleanly(outdated.sync(), 12, f"SSH private key {key} (SFTP.PRIVATE_KEY) is encrypted; give "
                          "its passphrase in SFTP.PRIVATE_KEY_PASSPHRASE", outdated)


@pytest.mark.parametrize("key_format", KEY_FORMATS)
def test_wrong_passphrase(outdated, sshd, key_format):
    key = sshd.client_key("rsa", key_format, encrypted=True)
    log_in_as(outdated, sshd, sshd.key_user, None, key, 'PRIVATE_KEY_PASSPHRASE = "hunter2-wrong"')
    line = assert_failed_cleanly(outdated.sync(), 12, "the passphrase (SFTP.PRIVATE_KEY_PASSPHRASE) does not "
                                 f"decrypt SSH private key {key} (SFTP.PRIVATE_KEY)", outdated)
    assert "hunter2" not in line


# --- refused logins: exit 14 -----------------------------------------------------------------------------


def test_wrong_password(outdated, sshd):
    log_in_as(outdated, sshd, sshd.password_user, "hunter2-wrong")
    line = assert_failed_cleanly(outdated.sync(), 14, f"SFTP login as {sshd.password_user}@127.0.0.1:"
                                 f"{sshd.port} was refused; check SFTP.USERNAME and SFTP.PASSWORD", outdated)
    assert "hunter2" not in line


def test_key_not_authorized_names_key_and_user(outdated, sshd, tmp_path):
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(stranger)], check=True)
    log_in_as(outdated, sshd, sshd.key_user, None, stranger)
    line = assert_failed_cleanly(outdated.sync(), 14, f"SFTP login as {sshd.key_user}@127.0.0.1:{sshd.port} "
                                 f"was refused with the key {stranger} (SFTP.PRIVATE_KEY); add its public key "
                                 "to the user's authorized_keys on the server", outdated)
    assert "SFTP.PASSWORD" not in line


def test_password_for_a_key_only_user(outdated, sshd):
    log_in_as(outdated, sshd, sshd.key_user, sshd.password)
    assert_failed_cleanly(outdated.sync(), 14, "the server does not accept password login for this user (it "
                          "offers publickey); set SFTP.PRIVATE_KEY", outdated)


# --- host keys and known_hosts ----------------------------------------------------------------------------


def test_changed_host_key_shows_the_presented_fingerprint(outdated, sshd):
    other_key = "AAAAC3NzaC1lZDI1NTE5AAAAIAb3T5kQb6JqJXn0gx7ZP1d7oYQpZ0b8l5n2Zp9Rk1bX"
    known_hosts = outdated.working_dir / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{sshd.port} ssh-ed25519 {other_key}\n")
    log_in_as(outdated, sshd, sshd.key_user, None, sshd.client_key("ed25519"))
    line = assert_failed_cleanly(outdated.sync(), 14, f"the host key of 127.0.0.1:{sshd.port} (ssh-ed25519 "
                                 f"{sshd.host_key_fingerprint}) does not match the one recorded in "
                                 f"{known_hosts}", outdated)
    assert "SFTP.HOST" not in line


@pytest.mark.parametrize("bad_line", [b"[127.0.0.1]:2222 ssh-ed25519 AAAA!!!!", b"\xff\xfe\n", b"garbage"],
                         ids=["bad-base64", "not-utf8", "garbage"])
def test_corrupt_known_hosts_names_file_and_line(outdated, sshd, bad_line):
    known_hosts = outdated.working_dir / "known_hosts"
    known_hosts.write_bytes(known_hosts.read_bytes() + bad_line + b"\n")
    line = assert_failed_cleanly(outdated.sync(), 14, f"known_hosts file {known_hosts}, line 2: ", outdated)
    assert "fix or delete that line" in line


def test_known_hosts_that_is_a_directory(outdated):
    known_hosts = outdated.working_dir / "known_hosts"
    known_hosts.unlink()
    known_hosts.mkdir()
    line = assert_failed_cleanly(outdated.sync(), 14, f"known_hosts file {known_hosts} is a directory",
                                 outdated)
    assert "SFTP.HOST" not in line


def test_first_contact_keeps_other_lines_of_known_hosts(outdated, sshd):
    known_hosts = outdated.working_dir / "known_hosts"
    foreign = ("# pinned by the admin\n"
               "sftp.example.org sk-ssh-ed25519@openssh.com AAAAGnNrLXNzaC1lZDI1NTE5QG9wZW5zc2guY29t\n")
    known_hosts.write_text(foreign)
    result = outdated.sync()
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith(f"WARNING: first connection to [127.0.0.1]:{sshd.port}: recorded its "
                                    f"ssh-ed25519 host key ({sshd.host_key_fingerprint})")
    assert known_hosts.read_text() == f"{foreign}[127.0.0.1]:{sshd.port} {sshd.host_public_key_line}\n"


def test_revoked_host_key_is_refused_before_any_login(outdated, sshd):
    known_hosts = outdated.working_dir / "known_hosts"
    known_hosts.write_text(f"@revoked * {sshd.host_public_key_line}\n")
    assert_failed_cleanly(outdated.sync(), 14, "is marked @revoked in", outdated)
    assert known_hosts.read_text() == f"@revoked * {sshd.host_public_key_line}\n"


# --- connect retries (in process, with a recording sleep) --------------------------------------------------


class FlakyProxy:
    """A TCP front of the sshd that hangs up on the first ``failures`` connections, then forwards."""

    def __init__(self, target_port: int, failures: int):
        self.target_port, self.failures, self.accepted = target_port, failures, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            if self.accepted <= self.failures:
                client.close()  # before the SSH banner: what a restarting server does
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


def settings(sshd, tmp_path, **changes) -> SftpSettings:
    folder = f"retry-{tmp_path.name}"[:60]
    sshd.folder(folder)
    values = {"host": sshd.host, "port": sshd.port, "username": sshd.password_user, "password": sshd.password,
              "timeout": 5, "folder": folder, "known_hosts": tmp_path / "known_hosts", "retries": 3}
    values.update(changes)
    return SftpSettings(**values)


def test_refused_connection_is_retried_with_growing_jittered_delays(sshd, tmp_path):
    delays: list[float] = []
    with pytest.raises(SftpError) as caught:
        SftpConnection(settings(sshd, tmp_path, port=closed_port(), retries=3)).connect(sleep=delays.append)
    assert len(delays) == 3
    for attempt, delay in enumerate(delays):
        assert 0.5 * 2 ** attempt <= delay <= 2 ** attempt
    assert "Connection refused (4 attempts); check SFTP.HOST and SFTP.PORT" in str(caught.value)


def test_backoff_doubles_from_one_second_up_to_thirty_each_jittered_to_half_or_more():
    for attempt in range(1, 10):
        ceiling = min(30.0, 2.0 ** (attempt - 1))
        assert all(ceiling / 2 <= retry_delay(attempt) <= ceiling for _ in range(50)), attempt


def test_no_retries_when_configured_so(sshd, tmp_path):
    delays: list[float] = []
    with pytest.raises(SftpError, match=r"Connection refused; check SFTP.HOST"):
        SftpConnection(settings(sshd, tmp_path, port=closed_port(), retries=0)).connect(sleep=delays.append)
    assert delays == []


def test_hang_up_before_the_banner_is_retried_until_it_works(sshd, tmp_path):
    proxy = FlakyProxy(sshd.port, failures=2)
    delays: list[float] = []
    try:
        connection = SftpConnection(settings(sshd, tmp_path, port=proxy.port)).connect(sleep=delays.append)
        connection.close()
    finally:
        proxy.close()
    assert (proxy.accepted, len(delays)) == (3, 2)


def test_retries_stay_within_the_deadline(sshd, tmp_path):
    delays: list[float] = []

    def sleep(seconds: float) -> None:  # really waits: the deadline is checked against the clock
        delays.append(seconds)
        time.sleep(seconds)

    start = time.monotonic()
    with pytest.raises(SftpError, match="Connection refused"):
        SftpConnection(settings(sshd, tmp_path, port=closed_port(), retries=10)).connect(
            deadline=start + 2.5, sleep=sleep)
    assert 1 <= len(delays) < 10
    assert time.monotonic() - start <= 2.5 + 0.5  # the last attempt is a refused connect: quick


def test_past_deadline_does_not_connect(sshd, tmp_path):
    proxy = FlakyProxy(sshd.port, failures=0)
    try:
        with pytest.raises(SftpError, match=r"^no time left to connect to .* \(MISC.RUN_TIMEOUT\)$"):
            SftpConnection(settings(sshd, tmp_path, port=proxy.port)).connect(deadline=time.monotonic() - 1)
    finally:
        proxy.close()
    assert proxy.accepted == 0


@pytest.mark.parametrize("problem", ["wrong password", "changed host key", "corrupt known_hosts",
                                     "missing key"])
def test_no_retry_for_anything_but_the_connection(sshd, tmp_path, problem):
    known_hosts = tmp_path / "known_hosts"
    proxy = FlakyProxy(sshd.port, failures=0)
    changes: dict[str, object] = {}
    if problem == "wrong password":
        changes["password"] = "hunter2-wrong"
    elif problem == "changed host key":
        known_hosts.write_text(f"[127.0.0.1]:{proxy.port} ssh-ed25519 "
                               "AAAAC3NzaC1lZDI1NTE5AAAAIAb3T5kQb6JqJXn0gx7ZP1d7oYQpZ0b8l5n2Zp9Rk1bX\n")
    elif problem == "corrupt known_hosts":
        known_hosts.write_text("garbage\n")
    else:
        changes["private_key"] = tmp_path / "absent"
    delays: list[float] = []
    try:
        with pytest.raises((SftpError, KeyFileError)):
            SftpConnection(settings(sshd, tmp_path, port=proxy.port, **changes)).connect(sleep=delays.append)
    finally:
        proxy.close()
    assert delays == []
    assert proxy.accepted <= 1
