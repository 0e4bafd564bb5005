"""Tests for the real-sshd test harness in ``test_resources.sshd``."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import paramiko
import pytest

from test_resources.availability import require_server
from test_resources.server_process import alive, children
from test_resources.sshd import STATE_DIR, SshdServer, SshdUnavailable

REPO_ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def _scratch_dir():
    """A 0700 mkdtemp dir outside pytest's tmp_path (see SshdServer docstring), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="bsu-sshd-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def scratch():
    with _scratch_dir() as path:
        yield path


def _host_key(line: str) -> paramiko.PKey:
    key_type, blob = line.split()
    return paramiko.PKey.from_type_string(key_type, base64.b64decode(blob))


def _connect(info: dict, *, user: str, password: str | None = None, key_path: str | None = None):
    """Authenticated transport + SFTP client; the host key must match the advertised one."""
    transport = paramiko.Transport((info["host"], info["port"]))
    pkey = paramiko.Ed25519Key.from_private_key_file(key_path) if key_path else None
    try:
        transport.connect(hostkey=_host_key(info["host_public_key_line"]), username=user,
                          password=password, pkey=pkey)
    except BaseException:
        transport.close()
        raise
    return transport, paramiko.SFTPClient.from_transport(transport)


def test_unavailable_without_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SshdUnavailable, match="run as root.*apt-get install -y openssh-server"):
        SshdServer.check_available()


def test_stop_kills_listener_and_sessions(scratch):
    require_server(SshdServer)
    with SshdServer(scratch) as srv:
        transport, sftp = _connect(srv.info(), user=srv.key_user, key_path=str(srv.client_key_path))
        with transport:  # the connection stays open while the server stops
            sftp.listdir(".")
            pids = [srv.pid, *children(srv.pid)]
            assert len(pids) > 1, "expected an sshd session process for the open connection"
            srv.stop()
            srv.stop()  # idempotent
            assert srv.pid is None
            assert not [p for p in pids if alive(p)]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_standalone_mode(scratch, signum):
    require_server(SshdServer)
    base = scratch / "standalone"
    proc = subprocess.Popen([sys.executable, "-m", "test_resources.sshd", "--base-dir", str(base),
                             "--folder", "rki", "--folder", "other"],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        info_file = base / "sshd.json"
        deadline = time.monotonic() + 15
        while not info_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert info_file.exists(), proc.stderr.read() if proc.poll() is not None else "timeout"
        info = json.loads(info_file.read_text())
        assert set(info) == {"host", "port", "password_user", "password", "key_user", "client_key_path",
                             "sftp_root", "host_key_fingerprint", "host_public_key_line"}
        assert base.stat().st_mode & 0o777 == 0o755
        transport, sftp = _connect(info, user=info["password_user"], password=info["password"])
        with transport:
            sftp.putfo(io.BytesIO(b"standalone"), "other/s.bin")
        assert (Path(info["sftp_root"]) / "other" / "s.bin").read_bytes() == b"standalone"
        sshd_pids = children(proc.pid)
        assert sshd_pids
    finally:
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0, stderr
    assert [json.loads(line) for line in stdout.splitlines()] == [info]
    assert not [p for p in sshd_pids if alive(p)]


def test_retries_when_port_is_taken(scratch, monkeypatch):
    require_server(SshdServer)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        ports = iter([busy.getsockname()[1]])
        real_free_port = SshdServer._free_port
        monkeypatch.setattr(SshdServer, "_free_port", lambda self: next(ports, None) or real_free_port(self))
        with SshdServer(scratch) as srv:
            assert srv.port != busy.getsockname()[1]
            _connect(srv.info(), user=srv.key_user, key_path=str(srv.client_key_path))[0].close()
    assert "Address already in use" in srv.log_path.read_text()


@pytest.fixture(scope="module")
def server():
    require_server(SshdServer)
    with _scratch_dir() as base, SshdServer(base) as srv:
        yield srv


def test_overlapping_servers_share_the_password(server, scratch):
    with SshdServer(scratch, folders=()) as other:
        assert other.password == server.password
        for srv in (server, other):
            _connect(srv.info(), user=srv.password_user, password=srv.password)[0].close()
    assert not list(STATE_DIR.glob(f"holder-{os.getpid()}-{id(other)}"))


@pytest.fixture
def password_sftp(server):
    transport, sftp = _connect(server.info(), user=server.password_user, password=server.password)
    with transport:
        yield sftp


def test_password_upload_lands_in_folder(server, password_sftp):
    payload = os.urandom(100_000)
    password_sftp.putfo(io.BytesIO(payload), "rki/export_1.zip")
    uploaded = server.folder("rki") / "export_1.zip"
    assert uploaded.read_bytes() == payload
    assert uploaded.stat().st_gid == server.folder("rki").stat().st_gid  # setgid shared group


def test_relative_paths_resolve_under_sftp_root(server, password_sftp):
    assert password_sftp.normalize(".") == str(server.sftp_root)
    password_sftp.putfo(io.BytesIO(b"x"), "rki/x")
    assert (server.sftp_root / "rki" / "x").read_bytes() == b"x"


def test_key_login(server):
    transport, sftp = _connect(server.info(), user=server.key_user, key_path=str(server.client_key_path))
    with transport:
        sftp.putfo(io.BytesIO(b"by key"), "rki/by_key.bin")
    assert (server.folder("rki") / "by_key.bin").read_bytes() == b"by key"
    with paramiko.Transport((server.host, server.port)) as transport, \
            pytest.raises(paramiko.BadAuthenticationType) as refused:
        transport.start_client(timeout=5)
        transport.auth_password(server.key_user, server.password)
    assert refused.value.allowed_types == ["publickey"]


def test_wrong_password_rejected(server):
    with pytest.raises(paramiko.AuthenticationException):
        _connect(server.info(), user=server.password_user, password=server.password + "-wrong")


def test_host_key_matches(server):
    with paramiko.Transport((server.host, server.port)) as transport:
        transport.start_client(timeout=5)
        key = transport.get_remote_server_key()
    assert f"{key.get_name()} {key.get_base64()}" == server.host_public_key_line
    assert key.fingerprint == server.host_key_fingerprint
    keygen = subprocess.run(["ssh-keygen", "-lf", str(server.base_dir / "ssh_host_ed25519_key.pub")],
                            check=True, capture_output=True, text=True).stdout
    assert keygen.split()[1] == server.host_key_fingerprint


def test_read_only_folder_denies_writes(server, password_sftp):
    server.read_only_folder("locked")
    with pytest.raises(PermissionError):
        password_sftp.putfo(io.BytesIO(b"nope"), "locked/x.zip")
    with pytest.raises(PermissionError):
        password_sftp.putfo(io.BytesIO(b"nope"), "top_level.zip")
    assert not (server.sftp_root / "locked" / "x.zip").exists()


def test_posix_rename_replaces_target(server, password_sftp):
    password_sftp.putfo(io.BytesIO(b"old"), "rki/final.zip")
    password_sftp.putfo(io.BytesIO(b"new"), "rki/final.zip.part")
    password_sftp.posix_rename("rki/final.zip.part", "rki/final.zip")
    assert (server.folder("rki") / "final.zip").read_bytes() == b"new"
    assert not (server.folder("rki") / "final.zip.part").exists()


def test_users_share_folders(server, password_sftp):
    password_sftp.putfo(io.BytesIO(b"shared"), "rki/shared.part")
    transport, key_sftp = _connect(server.info(), user=server.key_user,
                                   key_path=str(server.client_key_path))
    with transport:
        key_sftp.posix_rename("rki/shared.part", "rki/shared.zip")
        key_sftp.putfo(io.BytesIO(b"overwritten"), "rki/shared.zip")
    assert (server.folder("rki") / "shared.zip").read_bytes() == b"overwritten"
