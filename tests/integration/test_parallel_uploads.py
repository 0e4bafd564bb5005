"""Several uploads at once (SFTP.PARALLEL_UPLOADS), against the emulator and the real sshd."""

from __future__ import annotations

import io
import zipfile

from cryptography.fernet import Fernet
from lxml import etree

from test_resources import broker_actors as actors


def ledger_ids(workspace) -> list[str]:
    return [element.findtext("id") for element in etree.parse(str(workspace.ledger)).getroot()]


def result_of(workspace, request_id: str) -> bytes:
    token = (workspace.remote / f"export_{request_id}.zip").read_bytes()
    bundle = zipfile.ZipFile(io.BytesIO(Fernet(workspace.key_path.read_bytes().strip()).decrypt(token)))
    return bundle.read("0_result.txt")


def test_many_uploads_at_once_are_all_delivered_and_recorded_in_id_order(broker, workspace):
    ids = [actors.publish_completed(broker.url, result=f"result {number}\n".encode() * (1 + number * 5000))
           for number in range(14)]
    broker.latency = 0.02  # a broker across a network: the uploads overlap
    result = workspace.sync("-v")
    assert result.returncode == 0, result.stderr
    assert workspace.remote_names() == sorted([f"export_{each}.zip" for each in ids] + ["status.xml"])
    for number, request_id in enumerate(ids):
        assert result_of(workspace, request_id) == f"result {number}\n".encode() * (1 + number * 5000)
    assert ledger_ids(workspace) == ids
    assert (workspace.remote / "status.xml").read_bytes() == workspace.ledger.read_bytes()
    assert not (workspace.working_dir / "status.xml.partials").exists()


def test_one_upload_at_a_time_when_configured(broker, workspace):
    for number in range(3):
        actors.publish_completed(broker.url, result=f"result {number}\n".encode())
    workspace.rewrite_config('FOLDERNAME = "', 'PARALLEL_UPLOADS = 1\nFOLDERNAME = "')
    result = workspace.sync()
    assert result.returncode == 0, result.stderr
    assert ledger_ids(workspace) == ["0", "1", "2"]


def test_wrong_password_stops_parallel_uploads_before_anything_is_uploaded(broker, workspace, sshd):
    for number in range(5):
        actors.publish_completed(broker.url, result=f"result {number}\n".encode())
    workspace.pin_host_key(sshd)
    workspace.rewrite_config(f'PASSWORD = "{sshd.password}"', 'PASSWORD = "not-the-password"')
    result = workspace.sync()
    assert result.returncode == 14, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error: SFTP login")
    assert workspace.remote_names() == []
    assert not workspace.ledger.exists()


def test_sigterm_stops_every_worker_and_leaves_no_partial_file(broker, workspace, sshd, tmp_path):
    big = actors.write_incompressible_file(tmp_path / "big.bin", 48)
    for _ in range(4):
        actors.publish_completed(broker.url, result=big)
    small = actors.publish_completed(broker.url, result=b"small\n")
    workspace.pin_host_key(sshd)
    result = workspace.sync_terminated_mid_upload(uploads=2)
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error: interrupted")
    assert not [name for name in workspace.remote_names() if ".part-" in name]
    assert not (workspace.working_dir / "status.xml.partials").exists()
    # Whatever completed before the signal is recorded, and only that.
    recorded = set(ledger_ids(workspace)) if workspace.ledger.exists() else set()
    assert {f"export_{number}.zip" for number in recorded} == set(workspace.remote_names()) - {"status.xml"}

    rerun = workspace.sync()
    assert rerun.returncode == 0, rerun.stderr
    assert len(ledger_ids(workspace)) == 5
    assert result_of(workspace, small) == b"small\n"
