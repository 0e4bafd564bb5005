"""``status`` through the CLI: the ledger as JSON and as a table (also while a run holds the lock), and
``--remote`` against the broker emulator and the real sshd: the next run's plan, and missing, truncated
and stray files on the server. Nothing changes anywhere."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from broker_sftp_uploader.state.ledger import Ledger
from test_resources import broker_actors as actors
from test_resources.broker_actors import NODE1_KEY
from tests.integration.test_check import Unchanged, private_temp_dir  # noqa: F401 - autouse fixture

LEDGER = b"""<?xml version='1.0' encoding='UTF-8'?>
<status version="1">
  <request-status>
    <id>0</id>
    <completion>0.5</completion>
    <uploaded>2021-10-11 09:39:50</uploaded>
    <file>export_0.zip</file>
    <size>120</size>
  </request-status>
  <request-status>
    <id>1</id>
    <completion>1.0</completion>
    <uploaded>2021-10-10 08:00:00</uploaded>
    <deleted>2021-10-13 10:00:00</deleted>
    <file>export_1.zip</file>
  </request-status>
  <request-status>
    <id>2</id>
    <completion>0.33</completion>
    <uploaded>2021-10-09 07:00:00</uploaded>
    <last-update>2021-10-12 09:39:56</last-update>
    <file>export_2.zip</file>
  </request-status>
  <request-status>
    <id>3</id>
    <completion>0.0</completion>
    <uploaded>2021-10-11 09:39:50</uploaded>
  </request-status>
</status>
"""
EXPECTED_REQUESTS = [
    {"id": "1", "completion": "1.0", "file": "export_1.zip", "size": None, "uploaded": "2021-10-10 08:00:00",
     "last_update": None, "deleted": "2021-10-13 10:00:00"},
    {"id": "2", "completion": "0.33", "file": "export_2.zip", "size": None, "uploaded": "2021-10-09 07:00:00",
     "last_update": "2021-10-12 09:39:56", "deleted": None},
    {"id": "3", "completion": "0.0", "file": None, "size": None, "uploaded": "2021-10-11 09:39:50",
     "last_update": None, "deleted": None},
    {"id": "0", "completion": "0.5", "file": "export_0.zip", "size": 120, "uploaded": "2021-10-11 09:39:50",
     "last_update": None, "deleted": None},
]
CHILD_HOLDING_LOCK = """
import sys
from broker_sftp_uploader.state.lock import RunLock
with RunLock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""


def status(workspace, *extra: str) -> subprocess.CompletedProcess:
    return workspace.run("status", "-c", str(workspace.config_path), *extra)


def test_status_json_matches_the_ledger_newest_first(workspace):
    workspace.ledger.write_bytes(LEDGER)
    unchanged = Unchanged(workspace)
    result = status(workspace, "--json")
    assert (result.returncode, result.stderr) == (0, "")
    document = json.loads(result.stdout)
    assert document == {"version": 1, "ledger": str(workspace.ledger), "requests": EXPECTED_REQUESTS,
                        "totals": {"requests": 4, "live": 3, "deleted": 1}}
    unchanged.verify()


def test_status_table_newest_first_with_totals(workspace):
    workspace.ledger.write_bytes(LEDGER)
    result = status(workspace)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines() == [
        "ID  COMPLETION  FILE          UPLOADED             LAST UPDATE          DELETED",
        "1   1.0         export_1.zip  2021-10-10 08:00:00  -                    2021-10-13 10:00:00",
        "2   0.33        export_2.zip  2021-10-09 07:00:00  2021-10-12 09:39:56  -",
        "3   0.0         export_3.zip  2021-10-11 09:39:50  -                    -",
        "0   0.5         export_0.zip  2021-10-11 09:39:50  -                    -",
        f"4 request(s) in {workspace.ledger}: 3 live, 1 deleted",
    ]


def test_status_of_a_fresh_working_dir(workspace):
    result = status(workspace, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["requests"] == []
    assert not workspace.ledger.exists()
    assert status(workspace).stdout == f"the ledger {workspace.ledger} holds no request yet\n"


def test_status_works_while_another_process_holds_the_lock(workspace):
    workspace.ledger.write_bytes(LEDGER)
    holder = subprocess.Popen([sys.executable, "-c", CHILD_HOLDING_LOCK, str(workspace.working_dir)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        assert workspace.sync().returncode == 11  # the lock is really held
        result = status(workspace, "--json")
        assert (result.returncode, result.stderr) == (0, "")
        assert json.loads(result.stdout)["requests"] == EXPECTED_REQUESTS
    finally:
        holder.communicate("", timeout=30)
    assert holder.returncode == 0


def test_status_of_a_broken_ledger_exits_15(workspace):
    workspace.ledger.write_bytes(b"<status><request-status>")
    result = status(workspace, "--json")
    assert result.returncode == 15
    assert result.stdout == ""
    assert result.stderr.startswith(f"Error: ledger {workspace.ledger} is not valid XML")


@pytest.fixture
def synced(broker, workspace, sshd):
    """Requests 0, 1 and 2 uploaded by a real sync; the ledger records each file's size."""
    for number in range(3):
        actors.publish_completed(broker.url, result=f"request {number}\n".encode() * 50)
    workspace.pin_host_key(sshd)
    first = workspace.sync()
    assert first.returncode == 0, first.stderr
    assert workspace.remote_names() == ["export_0.zip", "export_1.zip", "export_2.zip", "status.xml"]
    return workspace


def test_remote_finds_deleted_truncated_and_stray_files_and_the_plan(synced, broker):
    remote = synced.remote
    (remote / "export_0.zip").unlink()
    truncated = remote / "export_1.zip"
    size = truncated.stat().st_size
    truncated.write_bytes(truncated.read_bytes()[:100])
    (remote / "stray.txt").write_bytes(b"nobody's\n")
    new_request = actors.create_request(broker.url, "rki")
    actors.post_status(broker.url, NODE1_KEY, new_request, "completed")
    unchanged = Unchanged(synced)

    result = status(synced, "--json", "--remote")
    assert (result.returncode, result.stderr) == (0, "")
    document = json.loads(result.stdout)
    assert document["requests"][0]["size"] is not None
    assert len(document["requests"]) == 3
    assert document["broker"] == {"tag": "rki", "listed": 4, "unchanged": 3}
    assert document["plan"] == [{"request_id": str(new_request), "action": "upload", "reason": "new",
                                 "file": f"export_{new_request}.zip", "completion": "1.0",
                                 "previous_completion": None, "refused": False}]
    assert document["remote"] == {
        "folder": remote.name, "files": 4,
        "missing": [{"request_id": "0", "file": "export_0.zip"}],
        "wrong_size": [{"request_id": "1", "file": "export_1.zip", "size": 100, "expected": size}],
        "unowned": ["stray.txt"],
    }

    table = status(synced, "--remote")
    assert (table.returncode, table.stderr) == (0, "")
    lines = table.stdout.splitlines()
    assert "next run (the broker lists 4 request(s) tagged 'rki'):" in lines
    assert f"  would upload request {new_request} (new, completion 1.0)" in lines
    assert "  missing: export_0.zip (request 0)" in lines
    assert f"  wrong size: export_1.zip (request 1): 100 bytes, {size} recorded" in lines
    assert "  not in the ledger: stray.txt" in lines
    assert "  2 file(s) to upload again: run `sync --repair`" in lines
    unchanged.verify()


def test_remote_of_a_clean_set_up_and_a_vanished_request(synced, broker):
    actors.delete_request(broker.url, 2)
    unchanged = Unchanged(synced)
    result = status(synced, "--remote")
    assert (result.returncode, result.stderr) == (0, "")
    lines = result.stdout.splitlines()
    assert "  would delete export_2.zip (request 2 is no longer listed)" in lines
    assert "  1 change(s), 2 unchanged" in lines
    assert "  every live request's file is there with the right size, and nothing else" in lines
    unchanged.verify()


def test_remote_with_a_new_host_key_warns_and_records_nothing(synced, sshd):
    known_hosts = synced.working_dir / "known_hosts"
    known_hosts.unlink()
    unchanged = Unchanged(synced)
    result = status(synced, "--json", "--remote")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["remote"]["missing"] == []
    assert result.stderr == (f"WARNING: the host key of 127.0.0.1:{sshd.port} (ssh-ed25519 "
                             f"{sshd.host_key_fingerprint}) is not yet recorded in {known_hosts}; status did not "
                             "record it, the next sync will\n")
    assert not known_hosts.exists()
    unchanged.verify()


def test_remote_with_a_wrong_password_exits_14(synced, sshd):
    synced.rewrite_config(f'PASSWORD = "{sshd.password}"', 'PASSWORD = "wrong-password"')
    unchanged = Unchanged(synced)
    result = status(synced, "--remote")
    assert result.returncode == 14
    assert result.stdout == ""
    assert result.stderr.startswith(f"Error: SFTP login as {sshd.password_user}@127.0.0.1:{sshd.port} was refused")
    unchanged.verify()


def test_remote_status_leaves_the_ledger_as_it_was(synced):
    before = Ledger.load(synced.ledger).to_bytes()
    assert status(synced, "--remote").returncode == 0
    assert Ledger.load(synced.ledger).to_bytes() == before
