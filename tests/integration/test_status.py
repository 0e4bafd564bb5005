"""``status`` through the CLI: the ledger as JSON and as a table (also while a run holds the lock), and
``--remote`` against the broker emulator and the real sshd: the next run's plan, and missing, truncated
and stray files on the server. Nothing changes anywhere."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cryptography.fernet import Fernet

from broker_sftp_uploader.crypto import key_fingerprint
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


# --- status --remote --verify: the files read back and their Fernet tokens checked ---------------------

def _flip_middle(path) -> None:
    """Change one base64 character in the middle of a token: same size, still base64, HMAC broken."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle] = ord("B") if data[middle] != ord("B") else ord("C")
    path.write_bytes(bytes(data))


@pytest.fixture
def five_synced(broker, workspace, sshd):
    """Requests 0 to 4 uploaded by a real sync, then three of the five damaged on the server in place:
    0 tampered (one character, same size), 1 truncated, 2 encrypted with a key not in the key file (same
    size); 3 and 4 stay good."""
    for number in range(5):
        actors.publish_completed(broker.url, result=f"request {number}\n".encode() * 50)
    workspace.pin_host_key(sshd)
    first = workspace.sync()
    assert first.returncode == 0, first.stderr
    remote = workspace.remote
    _flip_middle(remote / "export_0.zip")
    truncated = remote / "export_1.zip"
    truncated.write_bytes(truncated.read_bytes()[:-40])
    stranger = Fernet.generate_key()
    wrong_key = remote / "export_2.zip"
    plain = Fernet(workspace.key_path.read_bytes().strip()).decrypt(wrong_key.read_bytes())
    wrong_key.write_bytes(Fernet(stranger).encrypt(plain))
    workspace.stranger = stranger
    return workspace


@pytest.mark.parametrize("transport", ["paramiko", "openssh"])
def test_verify_finds_tampered_truncated_and_wrong_key_files_among_good_ones(five_synced, transport):
    site = five_synced
    if transport == "openssh":
        site.rewrite_config('FOLDERNAME = "', 'TRANSPORT = "openssh"\nFOLDERNAME = "')
    unchanged = Unchanged(site)
    result = status(site, "--json", "--remote", "--verify")
    assert result.returncode == 17, result.stderr
    assert result.stderr == ""
    remote = json.loads(result.stdout)["remote"]
    assert [wrong["request_id"] for wrong in remote["wrong_size"]] == ["1"]
    verify = remote["verify"]
    assert (verify["checked"], verify["verified"]) == (5, 2)
    assert [(failed["request_id"], failed["problem"], failed["key"]) for failed in verify["failed"]] == [
        ("0", "no_key", None), ("1", "malformed", None), ("2", "no_key", None)]
    assert "truncated" in verify["failed"][1]["detail"]
    unchanged.verify()


def test_verify_names_the_older_key_that_verifies_and_the_table_says_what_to_do(five_synced):
    site = five_synced
    current = site.key_path.read_bytes().strip()
    site.key_path.write_bytes(current + b"\n# the old key\n" + site.stranger + b"\n")
    result = status(site, "--remote", "--verify")
    assert result.returncode == 17, result.stderr
    lines = result.stdout.splitlines()
    assert "Fernet check of the 5 live file(s) on the server:" in lines
    fingerprint, current_fingerprint = key_fingerprint(site.stranger), key_fingerprint(current)
    assert (f"  FAILED (other_key): export_2.zip is encrypted with key {fingerprint} (key 2 of the key "
            f"file), not with the current key {current_fingerprint} (request 2)") in lines
    assert "  3 file(s) fail: run `sync --repair --verify` to upload them again" in lines
    assert not any("export_3.zip" in line or "export_4.zip" in line for line in lines if "FAILED" in line)


def test_verify_of_good_files_exits_0_and_without_remote_is_a_usage_error(synced):
    result = status(synced, "--json", "--remote", "--verify")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["remote"]["verify"] == {"checked": 3, "verified": 3, "failed": []}
    plain = status(synced, "--json", "--remote")
    assert "verify" not in json.loads(plain.stdout)["remote"]
    alone = status(synced, "--verify")
    assert alone.returncode == 2
    assert "--verify checks the server's files: use it with --remote" in alone.stderr


def test_verify_counts_a_missing_file_as_not_proven(synced):
    (synced.remote / "export_1.zip").unlink()
    result = status(synced, "--json", "--remote", "--verify")
    assert result.returncode == 17, result.stderr
    remote = json.loads(result.stdout)["remote"]
    assert remote["missing"] == [{"request_id": "1", "file": "export_1.zip"}]
    assert remote["verify"] == {"checked": 2, "verified": 2, "failed": []}
    assert status(synced, "--remote").returncode == 0  # without --verify status only reports, as before


def test_sync_repair_verify_uploads_again_what_fails_the_check_and_status_then_proves_all(five_synced):
    site = five_synced
    current = site.key_path.read_bytes().strip()
    site.key_path.write_bytes(current + b"\n" + site.stranger + b"\n")  # 2 now verifies with the older key
    good = {name: (site.remote / name).read_bytes() for name in ("export_3.zip", "export_4.zip")}
    sizes_only = site.sync("--repair")
    assert sizes_only.returncode == 0, sizes_only.stderr
    assert status(site, "--remote", "--verify").returncode == 17  # the same-size damage is still there

    repaired = site.sync("--repair", "--verify", "--json")
    assert repaired.returncode == 0, repaired.stderr
    assert "export_0.zip (request 0) fails the Fernet check" in repaired.stderr
    assert f"export_2.zip (request 2) fails the Fernet check: export_2.zip is encrypted with key " \
           f"{key_fingerprint(site.stranger)}" in repaired.stderr
    uploads = [action["request_id"] for action in json.loads(repaired.stdout)["actions"]
               if action.get("action") == "upload"]
    assert sorted(uploads) == ["0", "2"], repaired.stdout
    result = status(site, "--json", "--remote", "--verify")
    assert result.returncode == 0, result.stdout
    assert json.loads(result.stdout)["remote"]["verify"] == {"checked": 5, "verified": 5, "failed": []}
    assert {name: (site.remote / name).read_bytes() for name in good} == good  # the good ones were left alone
    assert site.sync("--verify").returncode == 2
