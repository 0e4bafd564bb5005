"""Unit tests for the ledger (real files, real XML) and the run lock."""

import os
import subprocess
import sys
from datetime import datetime, timezone

import pytest

from broker_sftp_uploader.errors import LedgerError, LockedError
from broker_sftp_uploader.state.ledger import Ledger
from broker_sftp_uploader.state.lock import RunLock

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


@pytest.mark.parametrize("doctype", [
    '<!DOCTYPE s [<!ENTITY e SYSTEM "file:///etc/passwd">]>',
    '<!DOCTYPE status [<!ENTITY e "x">]>',
    "<!DOCTYPE status>",
])
def test_load_ledger_with_a_doctype_is_refused(tmp_path, doctype):
    path = tmp_path / "status.xml"
    original = (doctype + "<status><request-status><id>1</id><completion>&e;</completion>"
                "</request-status></status>").replace("&e;", "&e;" if "ENTITY" in doctype else "1.0").encode()
    path.write_bytes(original)
    with pytest.raises(LedgerError, match="contains a DOCTYPE"):
        Ledger.load(path)
    assert path.read_bytes() == original


def ledger_with_files(*entries: tuple[str, str | None, bool]) -> bytes:
    """A ledger whose entries are (id, <file> or None, deleted)."""
    body = "".join(
        f"<request-status><id>{request_id}</id><completion>1.0</completion><uploaded>2021-10-11 09:39:50</uploaded>"
        + ("<deleted>2021-10-12 09:39:50</deleted>" if deleted else "")
        + (f"<file>{name}</file>" if name is not None else "") + "</request-status>"
        for request_id, name, deleted in entries)
    return f"<status>{body}</status>".encode()


@pytest.mark.parametrize("name", ["../victim.txt", "/etc/passwd", ".hidden", "a/b.zip", "status.xml", "..",
                                  "x\\y.zip", "", "a b.zip", "a" * 300])
def test_load_ledger_refuses_a_file_name_outside_the_folder(tmp_path, name):
    path = tmp_path / "status.xml"
    path.write_bytes(ledger_with_files(("0", "export_0.zip", False), ("3", name, False)))
    with pytest.raises(LedgerError, match="request 3 names the file"):
        Ledger.load(path)


def test_load_ledger_refuses_a_name_claimed_by_two_live_entries(tmp_path):
    path = tmp_path / "status.xml"
    path.write_bytes(ledger_with_files(("0", "bundle.zip", False), ("1", "bundle.zip", False)))
    with pytest.raises(LedgerError, match="requests 0 and 1 both claim the remote file bundle.zip"):
        Ledger.load(path)


def test_load_ledger_refuses_another_requests_conventional_name(tmp_path):
    # The collision of the earlier version: request 1's download was called export_0.zip.
    path = tmp_path / "status.xml"
    path.write_bytes(ledger_with_files(("0", None, True), ("1", "export_0.zip", False)))
    with pytest.raises(LedgerError, match="request 1 names the file export_0.zip, which is request 0's"):
        Ledger.load(path)


def test_load_ledger_accepts_a_legacy_name_owned_once(tmp_path):
    path = tmp_path / "status.xml"
    path.write_bytes(ledger_with_files(("0", "bundle.zip", False), ("1", "bundle.zip", True), ("2", None, False)))
    entries = Ledger.load(path).entries()
    assert [entries[key].file_name for key in ("0", "1", "2")] == ["bundle.zip", "bundle.zip", "export_2.zip"]


def test_lock_refuses_a_symlink_and_leaves_its_target_alone(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious\n")
    (tmp_path / "status.xml.lock").symlink_to(victim)
    with pytest.raises(LedgerError, match="is a symbolic link"):
        RunLock(tmp_path).acquire()
    assert victim.read_bytes() == b"precious\n"


def test_lock_refuses_a_hard_link_and_leaves_it_alone(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"12\n")
    os.link(victim, tmp_path / "status.xml.lock")
    with pytest.raises(LedgerError, match="not a plain file"):
        RunLock(tmp_path).acquire()
    assert victim.read_bytes() == b"12\n"


def test_lock_refuses_a_file_that_is_not_a_pid_and_keeps_it(tmp_path):
    planted = tmp_path / "status.xml.lock"
    planted.write_bytes(b"important notes\n")
    with pytest.raises(LedgerError, match="something other than a process id"):
        RunLock(tmp_path).acquire()
    assert planted.read_bytes() == b"important notes\n"


def test_lock_reuses_its_own_file(tmp_path):
    (tmp_path / "status.xml.lock").write_bytes(b"4242\n")
    with RunLock(tmp_path):
        assert (tmp_path / "status.xml.lock").read_bytes() == f"{os.getpid()}\n".encode()


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
from broker_sftp_uploader.state.lock import RunLock
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


def test_run_lock_names_no_pid_that_is_not_alive(tmp_path):
    # A holder that has the flock but has not written its pid yet: the file still names the last run.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True).stdout.strip()
    path = tmp_path / "status.xml.lock"
    path.write_text(f"{dead}\n")
    with open(path, "rb") as holder:
        import fcntl
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(LockedError) as caught:
            RunLock(tmp_path).acquire()
    assert str(caught.value) == f"another run holds the lock {path}; wait for it to finish"
