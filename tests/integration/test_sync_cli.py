"""`sync` through the CLI, as cron runs it, against the broker emulator and a real OpenSSH sshd."""

from __future__ import annotations

import io
import zipfile

import pytest
from cryptography.fernet import Fernet, InvalidToken
from lxml import etree

from broker_sftp_uploader.state.lock import RunLock
from test_resources import broker_actors as actors
from test_resources.broker_actors import ADMIN_KEY, NODE1_KEY, NODE2_KEY

ORIGINAL_BUNDLE = ["status.xml", "request.xml", "definition.xml", "0_result.txt"]


def ledger_entries(workspace) -> dict[str, dict[str, str]]:
    root = etree.parse(str(workspace.ledger)).getroot()
    return {element.findtext("id"): {child.tag: child.text for child in element}
            for element in root.iter("request-status")}


def decrypt_remote(workspace, name: str) -> bytes:
    key = workspace.key_path.read_bytes().strip()
    return Fernet(key).decrypt((workspace.remote / name).read_bytes())


def test_sync_original_scenario_end_to_end(broker, workspace):
    for _ in range(3):
        actors.create_request(broker.url, "rki")
        actors.create_request(broker.url, "default")
    for request_id in range(6):
        actors.put_result(broker.url, NODE1_KEY, request_id, b"a;b\\n1;2\\n3;4\\n")
        actors.post_status(broker.url, NODE1_KEY, request_id, "completed")

    first = workspace.sync()
    assert (first.returncode, first.stdout) == (0, "")
    # The only output of a first run: the host key it recorded (once, as OpenSSH's accept-new does).
    assert first.stderr.startswith("WARNING: first connection to [127.0.0.1]:")
    assert len(first.stderr.splitlines()) == 1
    assert workspace.remote_names() == ["export_0.zip", "export_2.zip", "export_4.zip", "status.xml"]
    entries = ledger_entries(workspace)
    assert sorted(entries) == ["0", "2", "4"]
    assert {entry["completion"] for entry in entries.values()} == {"1.0"}

    actors.create_request(broker.url, "rki")
    actors.create_request(broker.url, "default")
    actors.delete_request(broker.url, 0)
    for request_id in range(1, 6):
        actors.post_status(broker.url, NODE2_KEY, request_id, "retrieved")

    second = workspace.sync()
    assert (second.returncode, second.stdout, second.stderr) == (0, "", "")
    assert workspace.remote_names() == ["export_2.zip", "export_4.zip", "export_6.zip", "status.xml"]
    entries = ledger_entries(workspace)
    assert {request_id: entry["completion"] for request_id, entry in entries.items()} == {
        "0": "1.0", "2": "0.5", "4": "0.5", "6": "0.0"}
    assert "deleted" in entries["0"]
    assert sum("last-update" in entry for entry in entries.values()) == 2
    assert (workspace.remote / "status.xml").read_bytes() == workspace.ledger.read_bytes()

    bundle = zipfile.ZipFile(io.BytesIO(decrypt_remote(workspace, "export_2.zip")))
    assert bundle.namelist() == ORIGINAL_BUNDLE
    assert bundle.read("0_result.txt") == b"a;b\\n1;2\\n3;4\\n"


def test_sync_without_broker_changes_uploads_nothing(broker, workspace):
    actors.publish_completed(broker.url)
    assert workspace.sync().returncode == 0
    before = {path.name: path.stat().st_ino for path in workspace.remote.iterdir()}
    ledger_before = workspace.ledger.read_bytes()
    broker.requests_log.clear()

    again = workspace.sync("-v")
    assert again.returncode == 0
    assert {path.name: path.stat().st_ino for path in workspace.remote.iterdir()} == before
    assert workspace.ledger.read_bytes() == ledger_before
    assert "nothing to do: 1 request(s) unchanged" in again.stderr
    assert not [entry for entry in broker.requests_log if "export" in entry[1] or "download" in entry[1]]


def test_sync_relisted_request_marked_deleted_is_uploaded_again(broker, workspace):
    request_id = actors.publish_completed(broker.url)
    # A ledger as the original script leaves it: the request marked deleted although it is listed.
    workspace.ledger.write_text(
        "<?xml version='1.0' encoding='UTF-8'?>\n<status>\n  <request-status>\n"
        f"    <id>{request_id}</id>\n    <completion>1.0</completion>\n"
        "    <uploaded>2021-10-11 09:39:50</uploaded>\n    <deleted>2021-10-12 09:39:55</deleted>\n"
        "  </request-status>\n</status>\n")

    result = workspace.sync()
    assert result.returncode == 0, result.stderr
    assert f"export_{request_id}.zip" in workspace.remote_names()
    entry = ledger_entries(workspace)[request_id]
    assert "deleted" not in entry
    assert "last-update" in entry
    assert zipfile.is_zipfile(io.BytesIO(decrypt_remote(workspace, f"export_{request_id}.zip")))


def test_sync_continues_an_original_ledger_without_reuploading(broker, workspace):
    unchanged = actors.publish_completed(broker.url)
    changed = actors.publish_completed(broker.url)
    workspace.ledger.write_text(
        "<?xml version='1.0' encoding='UTF-8'?>\n<status>\n"
        f"  <request-status>\n    <id>{unchanged}</id>\n    <completion>1.0</completion>\n"
        "    <uploaded>2021-10-11 09:39:50</uploaded>\n  </request-status>\n"
        f"  <request-status>\n    <id>{changed}</id>\n    <completion>0.5</completion>\n"
        "    <uploaded>2021-10-11 09:39:50</uploaded>\n  </request-status>\n</status>\n")

    result = workspace.sync()
    assert result.returncode == 0, result.stderr
    assert workspace.remote_names() == [f"export_{changed}.zip", "status.xml"]
    assert "last-update" not in ledger_entries(workspace)[unchanged]


def test_sync_dry_run_prints_plan_and_changes_nothing(broker, workspace):
    actors.publish_completed(broker.url)
    broker.requests_log.clear()
    result = workspace.sync("--dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ("would upload request 0 (new, completion 1.0)\n"
                             "would upload the ledger as status.xml\n"
                             "plan: 1 to upload, 0 to delete, 0 unchanged\n")
    assert workspace.remote_names() == []
    assert list(workspace.working_dir.iterdir()) == []
    assert [entry.method for entry in broker.requests_log] == ["HEAD", "GET", "GET"]


def test_sync_partial_failure_exits_3_and_records_the_rest(broker, workspace):
    first = actors.publish_completed(broker.url)
    second = actors.publish_completed(broker.url)
    broker.inject_fault("POST", rf"/broker/export/request-bundle/{first}$", status=500)

    result = workspace.sync()
    assert result.returncode == 3
    assert f"request {first}: broker answered 500 to POST /broker/export/request-bundle/{first}" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"Error: 1 of 2 actions failed ({first}: see above); "
                                                             "1 uploaded (")
    assert sorted(ledger_entries(workspace)) == [second]
    assert workspace.remote_names() == [f"export_{second}.zip", "status.xml"]

    retry = workspace.sync()
    assert retry.returncode == 0, retry.stderr
    assert sorted(ledger_entries(workspace)) == [first, second]


def test_sync_truncated_download_uploads_nothing_and_leaves_no_temp_files(broker, workspace):
    request_id = actors.publish_completed(broker.url, result=b"x" * 200_000)
    broker.inject_fault("GET", r"/broker/download/", truncate_after=1000)

    result = workspace.sync()
    assert result.returncode == 13
    assert f"request {request_id}: download of request {request_id}" in result.stderr
    assert workspace.remote_names() == []
    assert sorted(path.name for path in workspace.working_dir.iterdir()) == ["known_hosts", "last-run.json",
                                                                            "status.xml.lock"]


def test_sync_sftp_transfer_refused_exits_14_with_ledger_untouched(broker, workspace, sshd):
    actors.publish_completed(broker.url)
    sshd.read_only_folder("readonly")
    workspace.rewrite_config(f'FOLDERNAME = "{workspace.remote.name}"', 'FOLDERNAME = "readonly"')

    result = workspace.sync()
    assert result.returncode == 14
    assert "upload of export_0.zip" in result.stderr
    assert not workspace.ledger.exists()


def test_sync_upload_ledger_can_be_switched_off(broker, workspace):
    actors.publish_completed(broker.url)
    workspace.rewrite_config('FOLDERNAME = ', 'UPLOAD_LEDGER = false\nFOLDERNAME = ')
    assert workspace.sync().returncode == 0
    assert workspace.remote_names() == ["export_0.zip"]


def test_sync_failed_ledger_upload_is_retried_by_next_run(broker, workspace):
    actors.publish_completed(broker.url)
    assert workspace.sync().returncode == 0
    (workspace.remote / "status.xml").unlink()
    (workspace.working_dir / "status.xml.uploaded-sha256").write_text("stale\n")
    assert workspace.sync().returncode == 0
    assert (workspace.remote / "status.xml").read_bytes() == workspace.ledger.read_bytes()


def test_sync_another_run_holding_the_lock_exits_11(broker, workspace):
    actors.publish_completed(broker.url)
    with RunLock(workspace.working_dir):
        result = workspace.sync()
    assert result.returncode == 11
    assert result.stderr.startswith("Error: another run holds the lock")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not workspace.ledger.exists()
    assert workspace.remote_names() == []


def test_sync_secrets_never_appear_in_output(broker, workspace, sshd):
    actors.publish_completed(broker.url)
    result = workspace.sync("-vv")
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "upload request 0" in output
    for secret in (ADMIN_KEY, sshd.password, workspace.key_path.read_text().strip()):
        assert secret not in output


def test_sync_interrupted_by_sigterm_leaves_nothing_behind_and_keeps_ledger(broker, workspace, sshd):
    actors.publish_completed(broker.url)
    workspace.pin_host_key(sshd)
    broker.inject_fault("GET", r"/broker/download/", delay=3.0)

    def downloading() -> bool:
        return any(entry.path.startswith("/broker/download/") for entry in list(broker.requests_log))

    result = workspace.sync_terminated_when(downloading, "the download of the result", timeout=20)
    assert result.returncode == 130
    assert result.stderr.startswith("Error: interrupted")
    assert sorted(path.name for path in workspace.working_dir.iterdir()) == ["known_hosts", "status.xml.lock"]
    assert workspace.remote_names() == []


def test_sync_removes_temp_files_a_killed_run_left(broker, workspace):
    actors.publish_completed(broker.url)
    (workspace.working_dir / ".status.xml.x1y2.tmp").write_bytes(b"<status>")
    (workspace.working_dir / ".status.xml.uploaded-sha256.a1b2.tmp").write_bytes(b"12")
    (workspace.working_dir / ".last-run.json.k9z8.tmp").write_bytes(b"{")  # killed while saving the report
    result = workspace.sync()
    assert result.returncode == 0
    assert "left behind by an interrupted run" in result.stderr
    assert not list(workspace.working_dir.glob(".*"))


def test_sync_encrypts_with_the_first_key_of_a_rotated_key_file(broker, workspace):
    actors.publish_completed(broker.url)
    old_key = workspace.key_path.read_bytes().strip()
    new_key = Fernet.generate_key()
    workspace.key_path.write_bytes(new_key + b"\n" + old_key + b"\n")
    assert workspace.sync().returncode == 0
    token = (workspace.remote / "export_0.zip").read_bytes()
    assert zipfile.is_zipfile(io.BytesIO(Fernet(new_key).decrypt(token)))
    with pytest.raises(InvalidToken):
        Fernet(old_key).decrypt(token)


def test_keygen_key_works_for_sync_and_decrypt(broker, workspace):
    actors.publish_completed(broker.url, result=b"x;y\n" * 50_000)
    workspace.key_path.unlink()
    assert workspace.run("keygen", str(workspace.key_path)).returncode == 0
    assert workspace.sync().returncode == 0
    restored = workspace.root / "restored.zip"
    result = workspace.run("decrypt", "--key", str(workspace.key_path), "--output", str(restored),
                           str(workspace.remote / "export_0.zip"))
    assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(restored) as bundle:
        assert bundle.read("0_result.txt") == b"x;y\n" * 50_000


def test_sync_interrupted_mid_upload_removes_the_partial_remote_file(broker, workspace, sshd, tmp_path):
    result_file = actors.write_incompressible_file(tmp_path / "big.bin", 96)
    actors.publish_completed(broker.url, result=result_file)
    workspace.pin_host_key(sshd)
    result = workspace.sync_terminated_mid_upload()
    assert result.returncode == 130, result.stderr
    assert workspace.remote_names() == []
    assert not workspace.ledger.exists()
