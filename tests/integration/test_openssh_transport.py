"""SFTP.TRANSPORT = "openssh": the same job, keys, host keys and exit codes over `ssh -s sftp` children."""

from __future__ import annotations

import io
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from test_resources import broker_actors as actors
from test_resources.broker_actors import NODE2_KEY


@pytest.fixture
def site(workspace):
    workspace.rewrite_config('FOLDERNAME = "', 'TRANSPORT = "openssh"\nFOLDERNAME = "')
    return workspace


def result_of(workspace, request_id: str) -> bytes:
    token = (workspace.remote / f"export_{request_id}.zip").read_bytes()
    bundle = zipfile.ZipFile(io.BytesIO(Fernet(workspace.key_path.read_bytes().strip()).decrypt(token)))
    return bundle.read("0_result.txt")


def use_key(site, sshd, key: Path, passphrase: str | None = None) -> None:
    lines = [f'USERNAME = "{sshd.key_user}"', f'PRIVATE_KEY = "{key}"']
    if passphrase is not None:
        lines.append(f'PRIVATE_KEY_PASSPHRASE = "{passphrase}"')
    site.rewrite_config(f'USERNAME = "{sshd.password_user}"\nPASSWORD = "{sshd.password}"', "\n".join(lines))


def last_error(result) -> str:
    return result.stderr.strip().splitlines()[-1]


def test_upload_reupload_delete_and_noop_with_password_login(broker, site, sshd):
    first, second, third = (actors.publish_completed(broker.url, result=data)
                            for data in (b"one\n", b"two\n", b"three\n"))
    result = site.sync()
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith(f"WARNING: first connection to [127.0.0.1]:{sshd.port}: recorded its host key")
    assert sshd.host_public_key_line in (site.working_dir / "known_hosts").read_text()
    assert [result_of(site, number) for number in (first, second, third)] == [b"one\n", b"two\n", b"three\n"]

    actors.post_status(broker.url, NODE2_KEY, first, "retrieved")
    actors.delete_request(broker.url, second)
    result = site.sync()
    assert (result.returncode, result.stderr) == (0, "")
    assert site.remote_names() == [f"export_{first}.zip", f"export_{third}.zip", "status.xml"]
    assert (site.remote / "status.xml").read_bytes() == site.ledger.read_bytes()

    before = {path.name: path.stat().st_ino for path in site.remote.iterdir()}
    assert site.sync().returncode == 0
    assert {path.name: path.stat().st_ino for path in site.remote.iterdir()} == before
    assert not list(Path("/dev/shm").glob("bsu-askpass-*"))


@pytest.mark.parametrize("key_type", ["ed25519", "ecdsa", "rsa"])
def test_key_login_with_passphrase(broker, site, sshd, key_type):
    request_id = actors.publish_completed(broker.url)
    site.pin_host_key(sshd)
    use_key(site, sshd, sshd.client_key(key_type, "openssh", encrypted=True), sshd.client_key_passphrase)
    result = site.sync()
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert result_of(site, request_id) == b"a;b\n"


def test_changed_host_key_stops_before_anything_is_uploaded(broker, site, sshd):
    actors.publish_completed(broker.url)
    known_hosts = site.working_dir / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{sshd.port} ssh-ed25519 "
                           "AAAAC3NzaC1lZDI1NTE5AAAAIAb3T5kQb6JqJXn0gx7ZP1d7oYQpZ0b8l5n2Zp9Rk1bX\n")
    result = site.sync()
    assert result.returncode == 14, result.stderr
    assert last_error(result) == (
        f"Error: the host key of 127.0.0.1:{sshd.port} ({sshd.host_key_fingerprint}) does not match the one "
        f"recorded in {known_hosts}; if the server's key really changed, confirm the new fingerprint with its "
        "admin and replace its line there")
    assert site.remote_names() == [] and not site.ledger.exists()


def test_wrong_password_exits_14(broker, site, sshd):
    actors.publish_completed(broker.url)
    site.pin_host_key(sshd)
    site.rewrite_config(f'PASSWORD = "{sshd.password}"', 'PASSWORD = "wrong"')
    result = site.sync()
    assert result.returncode == 14, result.stderr
    assert last_error(result) == f"Error: SFTP login as {sshd.password_user}@127.0.0.1:{sshd.port} was refused; " \
                                 "check SFTP.USERNAME and SFTP.PASSWORD"
    assert site.remote_names() == []


def test_corrupt_known_hosts_is_named_like_with_paramiko(broker, site, sshd):
    actors.publish_completed(broker.url)
    site.pin_host_key(sshd)
    known_hosts = site.working_dir / "known_hosts"
    known_hosts.write_bytes(known_hosts.read_bytes() + b"garbage\n")
    result = site.sync()
    assert result.returncode == 14
    assert f"known_hosts file {known_hosts}, line 2: " in last_error(result)


def test_secret_is_on_no_command_line_and_in_no_environment(broker, site, sshd, tmp_path):
    big = actors.write_incompressible_file(tmp_path / "big.bin", 8)
    actors.publish_completed(broker.url, result=big)
    site.pin_host_key(sshd)
    broker.inject_fault("GET", r"/broker/download/", delay=2.0)
    process = subprocess.Popen([sys.executable, "-m", "broker_sftp_uploader", "sync", "-c", str(site.config_path)],
                               stderr=subprocess.PIPE)
    seen: list[str] = []
    deadline = time.monotonic() + 20
    while process.poll() is None and time.monotonic() < deadline:
        for entry in Path("/proc").glob("[0-9]*"):
            try:
                command = (entry / "cmdline").read_bytes()
                if b"ssh" not in command.split(b"\0")[0]:
                    continue
                environment = (entry / "environ").read_bytes()
            except OSError:
                continue
            seen.append(entry.name)
            assert sshd.password.encode() not in command + environment
        time.sleep(0.05)
    assert process.wait(timeout=30) == 0, process.stderr.read()
    assert seen, "no ssh child was seen"
    assert not list(Path("/dev/shm").glob("bsu-askpass-*"))


def test_sigterm_mid_upload_leaves_no_partial_file(broker, site, sshd, tmp_path):
    big = actors.write_incompressible_file(tmp_path / "big.bin", 128)
    actors.publish_completed(broker.url, result=big)
    site.pin_host_key(sshd)
    result = site.sync_terminated_mid_upload()
    assert result.returncode == 130, result.stderr
    assert site.remote_names() == []
    assert not (site.working_dir / "status.xml.partials").exists()
    assert not list(Path("/dev/shm").glob("bsu-askpass-*"))


def test_secrets_of_a_killed_run_are_removed_by_the_next(broker, site, sshd):
    actors.publish_completed(broker.url)
    site.pin_host_key(sshd)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True,
                          text=True)
    orphan = Path("/dev/shm") / f"bsu-askpass-{dead.stdout.strip()}-abc123"
    orphan.mkdir(mode=0o700)
    (orphan / "password").write_text("left behind\n")
    result = site.sync()
    assert result.returncode == 0, result.stderr
    assert not orphan.exists()
