"""`sync`, `check` and `status --remote --verify` through the CLI against SFTP servers that are not OpenSSH.

Four independent implementations, each as it ships: ProFTPD's mod_sftp (Debian, C; also without
posix-rename), rclone's (``rclone serve sftp``, Debian, Go), asyncssh's (PyPI, Python) and Dropbear
with Green End's gesftpserver (Debian, C; no OpenSSH code on either side). And our own misbehaving
server (``test_resources/odd_sftp_server.py``, on asyncssh's server side), told to close the SFTP
channel on an unknown extension, to copy on RENAME, to refuse or to allow a RENAME onto an existing
name, to truncate the file it renames, to store writes a byte short, or to answer a temp file's first
STAT with 0 bytes. None of the latter offers posix-rename@openssh.com.

The whole story runs on each: a first sync, a changed request replaced, a deleted one removed, an idle
rerun, `check`, which must name the rename method a sync uses there, and `status --remote --verify`,
which must prove every file on the server.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import paramiko
import pytest

from broker_sftp_uploader.config import SftpSettings
from broker_sftp_uploader.errors import SftpError
from broker_sftp_uploader.sftp.connection import SftpConnection
from broker_sftp_uploader.sftp.paramiko_internals import StatusReply
from broker_sftp_uploader.sftp.session import (
    METHOD_DELETE_THEN_RENAME,
    METHOD_POSIX_RENAME,
    METHOD_RENAME_OVERWRITES,
)
from test_resources import broker_actors as actors
from test_resources.availability import require_server
from test_resources.broker_actors import NODE2_KEY
from test_resources.dropbear_sftp import DropbearSftpServer
from test_resources.odd_sftp_server import OddSftpServer
from test_resources.proftpd import ProftpdServer
from test_resources.rclone_sftp import RcloneSftpServer
from tests.conftest import Workspace, make_workspace
from tests.integration.test_other_sftp_servers import assert_delivered, completions, snapshot

COPYING_WARNING = "left the temp name behind after a RENAME (it copies instead of moving)"
# What a sync uses on each behaviour to replace a file, as check names it.
METHODS = {"close-on-unknown-extension": METHOD_DELETE_THEN_RENAME,
           "refusing-rename": METHOD_DELETE_THEN_RENAME,
           "copying-rename": METHOD_RENAME_OVERWRITES,
           "overwriting-rename": METHOD_RENAME_OVERWRITES}


class Independent(NamedTuple):
    """An independent server as it ships, and what the story must find there."""

    launcher: type
    arguments: tuple[object, ...]
    method: str  # how a sync replaces a file, as check names it
    software: str  # the start of its SSH banner
    extension: str  # one its VERSION reply offers: where it has any, one OpenSSH's does not (which server)
    rename_overwrites: bool  # what its plain RENAME (SFTP v3) does onto an existing name


INDEPENDENT_SERVERS = {
    "proftpd": Independent(ProftpdServer, (), METHOD_POSIX_RENAME, "SSH-2.0-mod_sftp", "versions",
                           rename_overwrites=False),
    "proftpd-no-posix-rename": Independent(ProftpdServer, (("rki",), False), METHOD_DELETE_THEN_RENAME,
                                           "SSH-2.0-mod_sftp", "versions", rename_overwrites=False),
    "rclone": Independent(RcloneSftpServer, (), METHOD_POSIX_RENAME, "SSH-2.0-rclone", "statvfs@openssh.com",
                          rename_overwrites=True),
    "asyncssh": Independent(OddSftpServer, ("stock",), METHOD_POSIX_RENAME, "SSH-2.0-AsyncSSH_",
                            "ranges@asyncssh.com", rename_overwrites=False),
    "dropbear-gesftpserver": Independent(DropbearSftpServer, (), METHOD_POSIX_RENAME, "SSH-2.0-dropbear_",
                                         "symlink-order@rjk.greenend.org.uk", rename_overwrites=False),
}


def started(server_class, *arguments: object):
    require_server(server_class)
    base = Path(tempfile.mkdtemp(prefix="bsu-other-sftp-"))
    try:
        with server_class(base, *arguments) as server:
            yield server
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module", params=list(METHODS))
def odd_server(request):
    """Our server with one of the behaviours a sync must cope with."""
    yield from started(OddSftpServer, request.param)


@pytest.fixture(scope="module", params=list(INDEPENDENT_SERVERS))
def independent(request):
    """One of the independent servers as it ships, and what is expected of it: (server, Independent)."""
    expected = INDEPENDENT_SERVERS[request.param]
    for server in started(expected.launcher, *expected.arguments):
        yield server, expected


@pytest.fixture
def odd_workspace(tmp_path, odd_server, broker, request) -> Workspace:
    return make_workspace(tmp_path, broker, odd_server, odd_server.username, odd_server.password,
                          odd_server.folder, request.node.name)


def settings_for(server: OddSftpServer, folder: str, tmp_path: Path) -> SftpSettings:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[{server.host}]:{server.port} {server.host_public_key_line}\n")
    return SftpSettings(host=server.host, port=server.port, username=server.username,
                        password=server.password, timeout=10, folder=folder, known_hosts=known_hosts)


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines()
            if line.startswith("WARNING") and "first connection" not in line]


def test_the_sync_story_and_check_on_each_behaviour(odd_server, broker, odd_workspace):
    behaviour = odd_server.behaviour
    sync_story(odd_workspace, broker, METHODS[behaviour], "SSH-2.0-AsyncSSH_", "statvfs@openssh.com",
               copying=behaviour == "copying-rename")
    # Not offered, so never asked for: on the first server it would have closed the channel.
    assert not [request for request in odd_server.requests("EXTENDED") if "posix-rename" in request]


def test_the_sync_story_check_and_verify_on_each_independent_server(independent, broker, tmp_path, request):
    server, expected = independent
    workspace = make_workspace(tmp_path, broker, server, server.username, server.password, server.folder,
                               request.node.name)
    sync_story(workspace, broker, expected.method, expected.software, expected.extension, copying=False)


def test_each_independent_server_renames_onto_an_existing_name_as_documented(independent):
    """What a plain RENAME (SFTP v3) does there: why posix-rename is used where offered (README table)."""
    server, expected = independent
    folder = server.folder(f"plain-rename-{os.urandom(3).hex()}")
    with paramiko.Transport((server.host, server.port)) as transport:
        transport.connect(username=server.username, password=server.password)
        client = paramiko.SFTPClient.from_transport(transport)
        for name in ("old", "new"):
            client.putfo(io.BytesIO(name.encode()), f"{folder.name}/{name}")
        if expected.rename_overwrites:
            client.rename(f"{folder.name}/new", f"{folder.name}/old")
        else:
            with pytest.raises(OSError):
                client.rename(f"{folder.name}/new", f"{folder.name}/old")
    names = sorted(path.name for path in folder.iterdir())
    assert names == (["old"] if expected.rename_overwrites else ["new", "old"])
    assert (folder / "old").read_bytes() == (b"new" if expected.rename_overwrites else b"old")


def sync_story(workspace: Workspace, broker, method: str, software: str, extension: str, *,
               copying: bool) -> None:
    """First sync, check, a changed request replaced, a deleted one removed, an idle rerun, and
    `status --remote --verify`: each as on OpenSSH; ``method`` is the rename method check must name,
    ``software`` the start of the server's banner, ``extension`` one its VERSION reply offers;
    ``copying``: the server's RENAME copies (one warning per run that uploads)."""
    # Once per run, where the server's RENAME copies: the runs that upload.
    expected_warnings = 1 if copying else 0
    first, second, third = (actors.publish_completed(broker.url) for _ in range(3))

    result = workspace.sync()
    assert (result.returncode, result.stdout) == (0, ""), result.stderr
    assert len(warnings_in(result.stderr)) == expected_warnings, result.stderr
    assert (COPYING_WARNING in result.stderr) is copying
    assert_delivered(workspace, broker, [first, second, third])  # exactly these names: no partial file

    before = snapshot(workspace.remote)
    checked = workspace.run("check", "-c", str(workspace.config_path), "--json")
    document = json.loads(checked.stdout)
    folder = next(check for check in document["checks"] if check["name"] == "sftp folder")
    assert f"files are replaced by {method}" in folder["message"], folder
    warned = copying or method == METHOD_DELETE_THEN_RENAME
    assert (folder["status"], checked.returncode) == ("warning" if warned else "ok", 0), document
    assert (COPYING_WARNING in folder["message"]) is copying
    details = folder["details"]
    assert details["server_software"].startswith(software)
    assert details["sftp_version"] == 3 and details["rename_method"] == method
    assert ("posix-rename@openssh.com" in details["extensions"]) is (method == METHOD_POSIX_RENAME)
    assert extension in details["extensions"]
    assert snapshot(workspace.remote) == before  # check leaves nothing behind

    actors.post_status(broker.url, NODE2_KEY, first, "retrieved")  # completion 1.0 -> 0.5: same name
    replaced = (workspace.remote / f"export_{first}.zip").read_bytes()
    result = workspace.sync()
    assert (result.returncode, result.stdout) == (0, ""), result.stderr
    assert len(warnings_in(result.stderr)) == expected_warnings, result.stderr
    assert completions(workspace) == {first: "0.5", second: "1.0", third: "1.0"}
    assert_delivered(workspace, broker, [first, second, third])
    assert (workspace.remote / f"export_{first}.zip").read_bytes() != replaced

    actors.delete_request(broker.url, second)
    result = workspace.sync()
    assert (result.returncode, result.stdout) == (0, ""), result.stderr
    assert len(warnings_in(result.stderr)) == expected_warnings, result.stderr
    assert_delivered(workspace, broker, [first, third])

    before, ledger = snapshot(workspace.remote), workspace.ledger.read_bytes()
    result = workspace.sync()
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert snapshot(workspace.remote) == before
    assert workspace.ledger.read_bytes() == ledger

    # Delivery proven from what the server holds: every live file read back and its Fernet token checked.
    result = workspace.run("status", "-c", str(workspace.config_path), "--json", "--remote", "--verify")
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert json.loads(result.stdout)["remote"]["verify"] == {"checked": 2, "verified": 2, "failed": []}
    assert snapshot(workspace.remote) == before
    assert workspace.ledger.read_bytes() == ledger


@pytest.mark.parametrize("odd_server", ["close-on-unknown-extension"], indirect=True)
def test_a_channel_the_server_closes_is_opened_again_and_the_work_goes_on(odd_server, tmp_path):
    folder = odd_server.folder("reopen")
    settings = settings_for(odd_server, "reopen", tmp_path)
    with SftpConnection(settings) as connection:
        reply = StatusReply.request(connection.main.client, 200, "no-such-extension@example.com")
        assert reply.status == 5  # SSH_FX_BAD_MESSAGE, and the server closes the channel
        with pytest.raises(SftpError, match="^upload of export_1.zip to .* failed: "):
            connection.upload(io.BytesIO(b"first try"), "export_1.zip")
        assert connection.traits.reopened_channels == 1
        connection.upload(io.BytesIO(b"on the new channel"), "export_1.zip")
        connection.upload(io.BytesIO(b"replaced"), "export_1.zip")
    assert sorted(path.name for path in folder.iterdir()) == ["export_1.zip"]
    assert (folder / "export_1.zip").read_bytes() == b"replaced"
    assert "REQUEST EXTENDED unknown: answered Bad message, channel closed" in odd_server.log_text()


@pytest.mark.parametrize("odd_server", ["truncating-rename"], indirect=True)
def test_a_rename_that_loses_bytes_fails_the_upload(odd_server, tmp_path):
    """The final name must hold the bytes written: what a broken server stored is not a delivery."""
    odd_server.folder("short")
    settings = settings_for(odd_server, "short", tmp_path)
    with SftpConnection(settings) as connection:
        refusal = (r"^upload of export_1\.zip to .* failed: after the rename the server holds 9 bytes under "
                   r"export_1\.zip, not the 10 bytes written")
        with pytest.raises(SftpError, match=refusal):
            connection.upload(io.BytesIO(b"0123456789"), "export_1.zip")


@pytest.mark.parametrize("odd_server", ["truncating-rename"], indirect=True)
def test_a_sync_on_a_server_that_loses_bytes_fails_and_records_nothing(odd_server, broker, odd_workspace):
    workspace = odd_workspace
    actors.publish_completed(broker.url)
    result = workspace.sync()
    assert result.returncode == 14, result.stderr
    assert "after the rename the server holds" in result.stderr
    assert not workspace.ledger.exists() or completions(workspace) == {}  # nothing recorded

    checked = workspace.run("check", "-c", str(workspace.config_path), "--json")
    folder = next(check for check in json.loads(checked.stdout)["checks"] if check["name"] == "sftp folder")
    assert (checked.returncode, folder["status"]) == (14, "failed"), folder
    assert "after the rename the server holds" in folder["message"]



@pytest.mark.parametrize("odd_server", ["short-write"], indirect=True)
def test_an_upload_the_server_stored_short_fails_before_the_rename(odd_server, tmp_path):
    """Writes acknowledged but not all stored: the previous file stays, the temp file goes, no RENAME."""
    folder = odd_server.folder("short-write")
    (folder / "export_1.zip").write_bytes(b"the previous version")
    settings = settings_for(odd_server, "short-write", tmp_path)
    with SftpConnection(settings) as connection:
        with pytest.raises(SftpError, match=r"^upload of export_1\.zip to .* stored 9 of 10 bytes$"):
            connection.upload(io.BytesIO(b"0123456789"), "export_1.zip")
    assert sorted(path.name for path in folder.iterdir()) == ["export_1.zip"]
    assert (folder / "export_1.zip").read_bytes() == b"the previous version"
    assert odd_server.requests("RENAME") == []


@pytest.mark.parametrize("odd_server", ["lagging-stat"], indirect=True)
def test_a_stat_answered_before_the_close_was_done_is_asked_again(odd_server, tmp_path):
    """The stat sent right behind the close may be handled before it: a wrong size is asked once more."""
    folder = odd_server.folder("lagging")
    settings = settings_for(odd_server, "lagging", tmp_path)
    with SftpConnection(settings) as connection:
        connection.upload(io.BytesIO(b"0123456789"), "export_1.zip")
        connection.upload(io.BytesIO(b"replaced"), "export_1.zip")
    assert sorted(path.name for path in folder.iterdir()) == ["export_1.zip"]
    assert (folder / "export_1.zip").read_bytes() == b"replaced"
    temp_stats = [request for request in odd_server.requests("STAT") if ".part-" in request]
    assert len(temp_stats) == 4 and len(set(temp_stats)) == 2  # each temp name: the lagging answer, then again
