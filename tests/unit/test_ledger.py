"""Unit tests for the ledger (real files, real XML) and the run lock."""

import os
import subprocess
import sys
from datetime import datetime, timezone

import pytest

from broker_sftp_uploader.errors import LedgerError, LockedError
from broker_sftp_uploader.ledger import Ledger
from broker_sftp_uploader.lock import RunLock

WHEN = datetime(2021, 10, 11, 9, 39, 50, tzinfo=timezone.utc)
LATER = datetime(2021, 10, 12, 8, 0, 0, tzinfo=timezone.utc)

# Exactly what the original script writes (lxml pretty_print, utf-8 declaration).
ORIGINAL_LEDGER = b"""<?xml version='1.0' encoding='UTF-8'?>
<status>
  <request-status>
    <id>0</id>
    <completion>1.0</completion>
    <uploaded>2021-10-11 09:39:50</uploaded>
    <deleted>2021-10-12 09:39:55</deleted>
  </request-status>
  <request-status>
    <id>2</id>
    <completion>0.5</completion>
    <uploaded>2021-10-11 09:39:50</uploaded>
    <last-update>2021-10-12 09:39:56</last-update>
  </request-status>
</status>
"""


def test_load_missing_ledger_is_empty_and_not_written(tmp_path):
    ledger = Ledger.load(tmp_path / "status.xml")
    assert ledger.entries() == {}
    assert not (tmp_path / "status.xml").exists()


def test_load_original_ledger_reads_every_field(tmp_path):
    path = tmp_path / "status.xml"
    path.write_bytes(ORIGINAL_LEDGER)
    entries = Ledger.load(path).entries()
    assert entries["0"].completion == "1.0"
    assert entries["0"].is_deleted
    assert entries["2"].last_update == "2021-10-12 09:39:56"
    assert not entries["2"].is_deleted
    assert entries["2"].remote_name is None


def test_record_upload_new_entry_in_original_format(tmp_path):
    ledger = Ledger.load(tmp_path / "status.xml")
    ledger.record_upload("6", "0.0", "export_6.zip", WHEN)
    ledger.save()
    text = (tmp_path / "status.xml").read_text()
    assert "<id>6</id>" in text
    assert "<completion>0.0</completion>" in text
    assert "<uploaded>2021-10-11 09:39:50</uploaded>" in text
    assert "<file>export_6.zip</file>" in text
    assert text.startswith("<?xml version='1.0' encoding='UTF-8'?>\n<status")


def test_record_upload_existing_sets_last_update_and_clears_deleted(tmp_path):
    path = tmp_path / "status.xml"
    path.write_bytes(ORIGINAL_LEDGER)
    ledger = Ledger.load(path)
    ledger.record_upload("0", "0.5", "export_0.zip", LATER)
    ledger.save()
    entry = Ledger.load(path).entries()["0"]
    assert entry.completion == "0.5"
    assert entry.uploaded == "2021-10-11 09:39:50"
    assert entry.last_update == "2021-10-12 08:00:00"
    assert entry.deleted is None


def test_record_deletion_sets_deleted(tmp_path):
    path = tmp_path / "status.xml"
    path.write_bytes(ORIGINAL_LEDGER)
    ledger = Ledger.load(path)
    ledger.record_deletion("2", LATER)
    ledger.save()
    assert Ledger.load(path).entries()["2"].deleted == "2021-10-12 08:00:00"


def test_saved_ledger_keeps_unknown_elements_and_mode(tmp_path):
    path = tmp_path / "status.xml"
    path.write_bytes(ORIGINAL_LEDGER.replace(b"<id>2</id>", b"<id>2</id><note>keep me</note>"))
    os.chmod(path, 0o640)
    ledger = Ledger.load(path)
    ledger.record_deletion("2", LATER)
    ledger.save()
    assert b"<note>keep me</note>" in path.read_bytes()
    assert os.stat(path).st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.xml"]


def test_saved_ledger_is_readable_the_way_the_original_reads_it(tmp_path):
    from lxml import etree
    ledger = Ledger.load(tmp_path / "status.xml")
    ledger.record_upload("2", "0.5", "export_2.zip", WHEN)
    ledger.record_upload("4", "1.0", "export_4.zip", WHEN)
    ledger.save()
    root = etree.parse(str(tmp_path / "status.xml")).getroot()
    ids = [element.text for element in root.findall(".//id")]
    completions = [element.text for element in root.findall(".//completion")]
    assert dict(zip(ids, completions)) == {"2": "0.5", "4": "1.0"}


@pytest.mark.parametrize("content,message", [
    (b"<status><request-status>", "not valid XML"),
    (b"<other/>", "expected <status>"),
    (b"<status><request-status><id>1</id></request-status><request-status><id>1</id></request-status></status>",
     "lists request 1 twice"),
    (b"<status><request-status><id>x</id></request-status></status>", "invalid id"),
])
def test_load_broken_ledger_raises_ledger_error(tmp_path, content, message):
    path = tmp_path / "status.xml"
    path.write_bytes(content)
    with pytest.raises(LedgerError, match=message) as caught:
        Ledger.load(path)
    assert caught.value.exit_code == 15


def test_load_ledger_does_not_resolve_external_entities(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    path = tmp_path / "status.xml"
    path.write_bytes(f'<!DOCTYPE s [<!ENTITY e SYSTEM "{secret.as_uri()}">]><status><request-status>'
                     "<id>1</id><completion>&e;</completion></request-status></status>".encode())
    ledger = Ledger.load(path)
    assert "TOPSECRET" not in (ledger.entries()["1"].completion or "")
    assert b"TOPSECRET" not in ledger.to_bytes()


def test_save_failure_when_target_is_a_folder(tmp_path):
    path = tmp_path / "status.xml"
    ledger = Ledger.load(path)
    ledger.record_upload("1", "1.0", "export_1.zip", WHEN)
    path.mkdir()
    (path / "keep").write_text("x")
    with pytest.raises(LedgerError, match="cannot save ledger"):
        ledger.save()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.xml"]


CHILD_TAKING_LOCK = """
import sys
from broker_sftp_uploader.errors import LockedError
from broker_sftp_uploader.lock import RunLock
try:
    RunLock(sys.argv[1]).acquire()
except LockedError as error:
    print(error)
    sys.exit(11)
"""


def test_run_lock_second_holder_fails_at_once(tmp_path):
    with RunLock(tmp_path):
        child = subprocess.run(
            [sys.executable, "-c", CHILD_TAKING_LOCK, str(tmp_path)], check=False, capture_output=True, text=True, timeout=30)
        assert child.returncode == 11
        assert f"(pid {os.getpid()})" in child.stdout
    RunLock(tmp_path).acquire()  # released on exit


def test_run_lock_same_process_second_lock_is_refused(tmp_path):
    with RunLock(tmp_path), pytest.raises(LockedError, match="another run holds the lock"):
        RunLock(tmp_path).acquire()
