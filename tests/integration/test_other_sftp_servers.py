"""`sync` through the CLI against a second SFTP implementation: ProFTPD's mod_sftp (Debian package).

Two set-ups: ProFTPD as shipped, and ProFTPD without the ``posix-rename@openssh.com`` extension,
where only SFTP v3's plain rename is left and it refuses to replace an existing file.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import paramiko
import pytest
from cryptography.fernet import Fernet
from lxml import etree

from broker_sftp_uploader.config import SftpSettings
from broker_sftp_uploader.errors import SftpError
from broker_sftp_uploader.sftp.connection import SftpConnection
from test_resources import broker_actors as actors
from test_resources.availability import require_server
from test_resources.broker_actors import NODE2_KEY
from test_resources.proftpd import NO_RENAME_FOLDER, ProftpdServer
from test_resources.server_process import alive, children
from tests.conftest import Workspace, make_workspace

# What ProFTPD logs for each posix-rename request it refuses because the extension is off.
REJECTED_POSIX_RENAME = "client requested 'posix-rename@openssh.com' extension, rejecting"
# The CLI, killed by SIGKILL the moment an SFTP remove of a final (not a temp) file was answered.
KILL_AFTER_DELETING_A_FILE = """
import os, runpy, signal, sys
import paramiko

remove = paramiko.SFTPClient.remove

def remove_then_die(self, path):
    remove(self, path)
    if ".part-" not in path:
        os.kill(os.getpid(), signal.SIGKILL)

paramiko.SFTPClient.remove = remove_then_die
sys.argv[0] = "broker_sftp_uploader"
runpy.run_module("broker_sftp_uploader", run_name="__main__")
"""


@pytest.fixture(scope="module", params=["posix-rename", "no-posix-rename"])
def proftpd(request):
    """ProFTPD with mod_sftp, as shipped or without posix-rename."""
    require_server(ProftpdServer)
    base = Path(tempfile.mkdtemp(prefix="bsu-proftpd-"))  # not tmp_path: pytest may make it 0700
    try:
        with ProftpdServer(base, posix_rename=request.param == "posix-rename") as server:
            yield server
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def proftpd_workspace(tmp_path, proftpd, broker, request) -> Workspace:
    """An uploader config in the original format pointing at this test's broker and ProFTPD folder."""
    return make_workspace(tmp_path, broker, proftpd, proftpd.username, proftpd.password, proftpd.folder,
                          request.node.name)


class LogWatch:
    """Counts what ProFTPD logged since the last look."""

    def __init__(self, server: ProftpdServer):
        self.server = server
        self.offset = len(server.log_text())

    def new_count(self, text: str) -> int:
        log = self.server.log_text()
        count = log[self.offset:].count(text)
        self.offset = len(log)
        return count


def newest_bundle(broker, request_id: str) -> bytes:
    """The bytes of the broker's most recent export bundle of ``request_id``."""
    bundles = []
    for path in (broker.data_dir / "downloads").glob("*.zip"):
        with zipfile.ZipFile(path) as bundle:
            if bundle.comment == f"Bundle for request {request_id}".encode():
                bundles.append((path.stat().st_mtime_ns, path.read_bytes()))
    assert bundles, f"the broker exported no bundle of request {request_id}"
    return max(bundles)[1]


def assert_delivered(workspace: Workspace, broker, request_ids: list[str]) -> None:
    """Exactly these requests' files and the ledger are on the server, each the broker's bundle, encrypted."""
    assert workspace.remote_names() == sorted([*(f"export_{i}.zip" for i in request_ids), "status.xml"])
    key = Fernet(workspace.key_path.read_bytes().strip())
    for request_id in request_ids:
        token = (workspace.remote / f"export_{request_id}.zip").read_bytes()
        assert key.decrypt(token) == newest_bundle(broker, request_id), f"export_{request_id}.zip"
    assert (workspace.remote / "status.xml").read_bytes() == workspace.ledger.read_bytes()


def completions(workspace: Workspace) -> dict[str, str]:
    root = etree.parse(str(workspace.ledger)).getroot()
    return {element.findtext("id"): element.findtext("completion") for element in root.iter("request-status")}


def snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns, path.read_bytes())
            for path in folder.iterdir()}


def test_posix_rename_is_offered_or_refused_as_configured(proftpd):
    folder = proftpd.folder(f"probe-{os.urandom(3).hex()}").name
    with paramiko.Transport((proftpd.host, proftpd.port)) as transport:
        transport.connect(username=proftpd.username, password=proftpd.password)
        assert f"ssh-ed25519 {transport.get_remote_server_key().get_base64()}" == proftpd.host_public_key_line
        sftp = paramiko.SFTPClient.from_transport(transport)
        for name, data in (("old", b"old"), ("new", b"new")):
            sftp.putfo(io.BytesIO(data), f"{folder}/{name}")
        with pytest.raises(OSError, match="File already exists"):  # SFTP v3 rename never replaces here
            sftp.rename(f"{folder}/new", f"{folder}/old")
        if proftpd.posix_rename:
            sftp.posix_rename(f"{folder}/new", f"{folder}/old")
            assert sftp.listdir(folder) == ["old"]
            assert sftp.open(f"{folder}/old").read() == b"new"
        else:
            with pytest.raises(OSError, match="^Unsupported operation$") as refusal:
                sftp.posix_rename(f"{folder}/new", f"{folder}/old")
            # paramiko keeps only the server's text: no errno, nothing telling it from any other failure
            assert type(refusal.value) is OSError and refusal.value.errno is None
            assert sorted(sftp.listdir(folder)) == ["new", "old"]


def test_standalone_launcher_serves_until_sigterm_and_leaves_no_process():
    require_server(ProftpdServer)
    base = Path(tempfile.mkdtemp(prefix="bsu-proftpd-main-"))
    command = [sys.executable, "-m", "test_resources.proftpd", "--base-dir", str(base / "srv"),
               "--no-posix-rename"]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        info = json.loads(launcher.stdout.readline())
        assert json.loads((base / "srv" / "proftpd.json").read_text()) == info
        assert info["posix_rename"] is False
        with paramiko.Transport((info["host"], info["port"])) as transport:
            transport.connect(username=info["username"], password=info["password"])
            assert paramiko.SFTPClient.from_transport(transport).listdir(".") == ["rki"]
            listener = int((base / "srv" / "proftpd.pid").read_text())
            server_processes = [listener, *children(listener)]  # the listener and this session
            assert len(server_processes) == 2 and all(map(alive, server_processes))
            launcher.send_signal(signal.SIGTERM)
            assert launcher.wait(timeout=15) == 0, launcher.stderr.read()
        assert not any(map(alive, server_processes))
    finally:
        if launcher.poll() is None:
            launcher.terminate()  # lets the launcher stop ProFTPD
            launcher.wait(timeout=15)
        shutil.rmtree(base, ignore_errors=True)


def test_upload_reupload_delete_and_noop_through_the_cli(proftpd, broker, proftpd_workspace):
    workspace, log = proftpd_workspace, LogWatch(proftpd)
    # Three requests, so that deleting one stays within the default mass-deletion limit (50 %).
    first, second, third = (actors.publish_completed(broker.url) for _ in range(3))

    result = workspace.sync()
    assert (result.returncode, result.stdout) == (0, ""), result.stderr
    assert result.stderr.startswith(f"WARNING: first connection to [{proftpd.host}]:{proftpd.port}")
    assert proftpd.host_public_key_line in (workspace.working_dir / "known_hosts").read_text()
    assert_delivered(workspace, broker, [first, second, third])
    # Without the extension ProFTPD leaves it out of its VERSION reply: it is never asked for.
    assert log.new_count(REJECTED_POSIX_RENAME) == 0

    actors.post_status(broker.url, NODE2_KEY, first, "retrieved")  # completion 1.0 -> 0.5: same name
    replaced = (workspace.remote / f"export_{first}.zip").read_bytes()
    result = workspace.sync()
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert completions(workspace) == {first: "0.5", second: "1.0", third: "1.0"}
    assert_delivered(workspace, broker, [first, second, third])
    assert (workspace.remote / f"export_{first}.zip").read_bytes() != replaced
    assert log.new_count(REJECTED_POSIX_RENAME) == 0

    actors.delete_request(broker.url, second)
    result = workspace.sync()
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert_delivered(workspace, broker, [first, third])
    assert log.new_count(REJECTED_POSIX_RENAME) == 0

    before, ledger = snapshot(workspace.remote), workspace.ledger.read_bytes()
    result = workspace.sync()
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert snapshot(workspace.remote) == before
    assert workspace.ledger.read_bytes() == ledger
    assert log.new_count(REJECTED_POSIX_RENAME) == 0


def test_ledger_is_uploaded_and_overwritten(proftpd, broker, proftpd_workspace):
    workspace = proftpd_workspace
    request_id = actors.publish_completed(broker.url)
    assert workspace.sync().returncode == 0
    first_ledger = (workspace.remote / "status.xml").read_bytes()
    assert first_ledger == workspace.ledger.read_bytes()

    actors.post_status(broker.url, NODE2_KEY, request_id, "retrieved")
    result = workspace.sync()
    assert (result.returncode, result.stderr) == (0, "")
    assert workspace.remote_names() == [f"export_{request_id}.zip", "status.xml"]
    assert (workspace.remote / "status.xml").read_bytes() == workspace.ledger.read_bytes() != first_ledger
    assert b"<last-update>" in workspace.ledger.read_bytes()


def test_refused_rename_keeps_the_previous_file(proftpd, tmp_path):
    """A server refusing the rename (here: <Limit RNTO>) must not cost the receiver the file it has."""
    folder = proftpd.folder(NO_RENAME_FOLDER)
    previous = folder / f"export_{os.urandom(3).hex()}.zip"
    previous.write_bytes(b"previous version")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[{proftpd.host}]:{proftpd.port} {proftpd.host_public_key_line}\n")
    settings = SftpSettings(host=proftpd.host, port=proftpd.port, username=proftpd.username,
                            password=proftpd.password, timeout=10, folder=NO_RENAME_FOLDER,
                            known_hosts=known_hosts)

    with SftpConnection(settings) as connection, pytest.raises(SftpError, match="Permission denied"):
        connection.upload(io.BytesIO(b"new version"), previous.name)
    assert sorted(path.name for path in folder.iterdir()) == [previous.name]
    assert previous.read_bytes() == b"previous version"


@pytest.mark.parametrize("proftpd", ["no-posix-rename"], indirect=True)
def test_run_killed_between_delete_and_rename_loses_nothing(proftpd, broker, proftpd_workspace):
    """SIGKILL right after the old file was deleted, before the new one was renamed into place: the
    new file waits under its temp name, the ledger still has the old state, and the next run repairs."""
    workspace = proftpd_workspace
    request_id = actors.publish_completed(broker.url)
    assert workspace.sync().returncode == 0
    actors.post_status(broker.url, NODE2_KEY, request_id, "retrieved")

    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_DELETING_A_FILE, "sync", "--config",
                             str(workspace.config_path)], check=False, capture_output=True, text=True,
                            timeout=120, cwd=workspace.root)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    waiting = [name for name in workspace.remote_names()
               if name.startswith(f".export_{request_id}.zip.part-")]
    assert f"export_{request_id}.zip" not in workspace.remote_names() and len(waiting) == 1
    key = Fernet(workspace.key_path.read_bytes().strip())
    assert key.decrypt((workspace.remote / waiting[0]).read_bytes()) == newest_bundle(broker, request_id)
    assert completions(workspace) == {request_id: "1.0"}

    result = workspace.sync()
    assert (result.returncode, result.stdout) == (0, ""), result.stderr
    assert completions(workspace) == {request_id: "0.5"}
    assert_delivered(workspace, broker, [request_id])
