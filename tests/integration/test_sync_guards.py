"""What a wrong tag, a hostile broker or an edited ledger can make `sync` delete or overwrite: nothing."""

from __future__ import annotations

import io
import zipfile

from cryptography.fernet import Fernet
from lxml import etree

from test_resources import broker_actors as actors


def result_in(workspace, name: str) -> bytes:
    key = workspace.key_path.read_bytes().strip()
    bundle = zipfile.ZipFile(io.BytesIO(Fernet(key).decrypt((workspace.remote / name).read_bytes())))
    return bundle.read("0_result.txt")


def deleted_ids(workspace) -> list[str]:
    root = etree.parse(str(workspace.ledger)).getroot()
    return [element.findtext("id") for element in root.iter("request-status") if element.find("deleted") is not None]


def test_wrong_tag_deletes_nothing_and_exits_4(broker, workspace):
    for _ in range(3):
        actors.publish_completed(broker.url)
    assert workspace.sync().returncode == 0
    before = workspace.remote_names()
    workspace.rewrite_config('TAG = "rki"', 'TAG = "rkj"')

    dry = workspace.sync("--dry-run")
    assert dry.returncode == 4, dry.stderr
    assert "would NOT delete export_0.zip" in dry.stdout
    result = workspace.sync()
    assert result.returncode == 4
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("Error: refused to delete 3 of 3 files on the server (export_0.zip, export_1.zip, "
                            "export_2.zip)")
    assert "sync --allow-deletes" in error and "REQUESTS.TAG" in error
    assert workspace.remote_names() == before
    assert deleted_ids(workspace) == []


def test_partial_listing_deletes_nothing_but_uploads_go_ahead(broker, workspace):
    for _ in range(3):
        actors.publish_completed(broker.url)
    assert workspace.sync().returncode == 0
    actors.delete_request(broker.url, 0)
    actors.delete_request(broker.url, 1)
    new = actors.publish_completed(broker.url)

    result = workspace.sync()
    assert result.returncode == 4, result.stderr
    assert workspace.remote_names() == ["export_0.zip", "export_1.zip", "export_2.zip", f"export_{new}.zip",
                                        "status.xml"]
    assert (workspace.remote / "status.xml").read_bytes() == workspace.ledger.read_bytes()

    allowed = workspace.sync("--allow-deletes")
    assert allowed.returncode == 0, allowed.stderr
    assert workspace.remote_names() == ["export_2.zip", f"export_{new}.zip", "status.xml"]
    assert deleted_ids(workspace) == ["0", "1"]


def test_guard_limits_come_from_the_config(broker, workspace):
    for _ in range(2):
        actors.publish_completed(broker.url)
    assert workspace.sync().returncode == 0
    actors.delete_request(broker.url, 0)
    actors.delete_request(broker.url, 1)
    workspace.rewrite_config('TAG = "rki"', 'TAG = "rki"\nMAX_DELETE_PERCENT = 100')
    result = workspace.sync()
    assert result.returncode == 0, result.stderr
    assert workspace.remote_names() == ["status.xml"]


def test_download_name_of_another_request_never_overwrites_its_file(broker, workspace):
    first = actors.publish_completed(broker.url, result=b"result of the first\n")
    second = actors.publish_completed(broker.url, result=b"result of the second\n")
    broker.download_names[int(second)] = f"export_{first}.zip"  # names request 1's bundle export_0.zip
    assert workspace.sync().returncode == 0
    assert workspace.remote_names() == [f"export_{first}.zip", f"export_{second}.zip", "status.xml"]
    assert result_in(workspace, f"export_{first}.zip") == b"result of the first\n"
    assert result_in(workspace, f"export_{second}.zip") == b"result of the second\n"

    actors.delete_request(broker.url, second)
    assert workspace.sync().returncode == 0
    assert workspace.remote_names() == [f"export_{first}.zip", "status.xml"]
    assert result_in(workspace, f"export_{first}.zip") == b"result of the first\n"


def test_ledger_file_name_outside_the_folder_is_refused_before_anything_happens(broker, workspace, sshd):
    victim = workspace.remote.parent / "victim.txt"
    victim.write_text("keep me")
    actors.publish_completed(broker.url)
    workspace.ledger.write_text(
        "<status><request-status><id>5</id><completion>1.0</completion><uploaded>2021-10-11 09:39:50</uploaded>"
        "<file>../victim.txt</file></request-status></status>")
    ledger = workspace.ledger.read_bytes()
    try:
        result = workspace.sync("--allow-deletes")
        assert result.returncode == 15
        assert result.stderr.strip().splitlines()[-1] == (
            f"Error: ledger {workspace.ledger}: request 5 names the file '../victim.txt', which is not a plain "
            "file name in FOLDERNAME; fix or remove that <file> element")
        assert victim.read_text() == "keep me"
        assert workspace.ledger.read_bytes() == ledger
        assert workspace.remote_names() == []
    finally:
        victim.unlink()


def test_legacy_file_name_is_replaced_by_the_conventional_one(broker, workspace):
    request_id = actors.publish_completed(broker.url)
    (workspace.remote / "bundle.zip").write_bytes(b"old upload")
    workspace.ledger.write_text(
        f"<status><request-status><id>{request_id}</id><completion>0.5</completion>"
        "<uploaded>2021-10-11 09:39:50</uploaded><file>bundle.zip</file></request-status></status>")
    result = workspace.sync()
    assert result.returncode == 0, result.stderr
    assert workspace.remote_names() == [f"export_{request_id}.zip", "status.xml"]
    root = etree.parse(str(workspace.ledger)).getroot()
    assert root.findtext("request-status/file") == f"export_{request_id}.zip"


def test_partial_upload_left_by_a_killed_run_is_removed_by_a_run_with_no_work(broker, workspace):
    actors.publish_completed(broker.url)
    assert workspace.sync().returncode == 0
    leftover = workspace.remote / ".export_0.zip.part-00112233aabb"
    leftover.write_bytes(b"half an upload")
    stranger = workspace.remote / ".export_9.zip.part-00112233aabc"  # not in our journal: not ours
    stranger.write_bytes(b"someone else's")
    (workspace.working_dir / "status.xml.partials").write_text(f"+{leftover.name}\n")

    result = workspace.sync()
    assert result.returncode == 0, result.stderr
    assert "removed" in result.stderr and leftover.name in result.stderr
    assert not leftover.exists() and stranger.exists()
    assert not (workspace.working_dir / "status.xml.partials").exists()
