"""The status view's pure parts: order, totals, JSON and table, the --remote sections; and ``status`` and
``check`` through click's CliRunner on a local set-up (no server needed)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from broker_sftp_uploader.cli import cli
from broker_sftp_uploader.crypto import generate_key_file
from broker_sftp_uploader.state.ledger import LedgerEntry
from broker_sftp_uploader.engine.audit import RemoteComparison, WrongSize
from broker_sftp_uploader.commands.status import RemoteView, StatusView, newest_first
from broker_sftp_uploader.engine.plan import Delete, DeletionGuard, Plan, Upload


def entry(request_id: str, uploaded: str | None = None, last_update: str | None = None,
          deleted: str | None = None, remote_name: str | None = None, size: int | None = None) -> LedgerEntry:
    return LedgerEntry(request_id, "0.5", uploaded, last_update, deleted, remote_name, size)


def test_newest_first_by_the_latest_timestamp_then_by_id():
    entries = {
        "1": entry("1", "2021-10-11 09:00:00"),
        "2": entry("2", "2021-10-01 09:00:00", last_update="2021-10-12 09:00:00"),
        "3": entry("3", "2021-10-02 09:00:00", deleted="2021-10-13 09:00:00"),
        "10": entry("10", "2021-10-11 09:00:00"),
        "4": entry("4"),
        "20": entry("20"),
    }
    assert [item.request_id for item in newest_first(entries)] == ["3", "2", "10", "1", "20", "4"]


def test_document_has_null_for_what_the_ledger_lacks_and_totals():
    view = StatusView(Path("/w/status.xml"), (entry("3", "2021-10-11 09:39:50"),
                                               entry("2", "2021-10-10 00:00:00", deleted="2021-10-11 00:00:00",
                                                     remote_name="export_2.zip", size=88)))
    assert view.document() == {
        "version": 1, "ledger": "/w/status.xml",
        "requests": [
            {"id": "3", "completion": "0.5", "file": None, "size": None, "uploaded": "2021-10-11 09:39:50",
             "last_update": None, "deleted": None},
            {"id": "2", "completion": "0.5", "file": "export_2.zip", "size": 88, "uploaded": "2021-10-10 00:00:00",
             "last_update": None, "deleted": "2021-10-11 00:00:00"},
        ],
        "totals": {"requests": 2, "live": 1, "deleted": 1},
    }


def test_table_shows_the_remote_file_each_entry_owns():
    view = StatusView(Path("/w/status.xml"), (entry("12", "2021-10-11 09:39:50"),))
    assert view.lines() == [
        "ID  COMPLETION  FILE           UPLOADED             LAST UPDATE  DELETED",
        "12  0.5         export_12.zip  2021-10-11 09:39:50  -            -",
        "1 request(s) in /w/status.xml: 1 live, 0 deleted",
    ]


def remote_view() -> RemoteView:
    plan = Plan(deletes=(), uploads=(Upload("5", "1.0", "changed", "0.5"),), unchanged=2,
                refused=(Delete("7", "export_7.zip"),), live=2, guard=DeletionGuard(max_percent=10))
    comparison = RemoteComparison(missing=(("1", "export_1.zip"),),
                                  wrong_size=(WrongSize("2", "export_2.zip", 10, None),),
                                  unowned=("notes.txt",))
    return RemoteView("rki", 3, plan, "rki", 4, comparison)


def test_remote_document_lists_the_plan_and_the_folder():
    document = StatusView(Path("/w/status.xml"), (), remote_view()).document()
    assert document["broker"] == {"tag": "rki", "listed": 3, "unchanged": 2}
    assert document["plan"] == [
        {"request_id": "5", "action": "upload", "reason": "changed", "file": "export_5.zip", "completion": "1.0",
         "previous_completion": "0.5", "refused": False},
        {"request_id": "7", "action": "delete", "reason": "vanished", "file": "export_7.zip", "completion": None,
         "previous_completion": None, "refused": True},
    ]
    assert document["remote"] == {"folder": "rki", "files": 4,
                                  "missing": [{"request_id": "1", "file": "export_1.zip"}],
                                  "wrong_size": [{"request_id": "2", "file": "export_2.zip", "size": 10,
                                                  "expected": None}],
                                  "unowned": ["notes.txt"]}


def test_remote_lines_say_what_is_off_and_what_to_do():
    lines = StatusView(Path("/w/status.xml"), (), remote_view()).lines()
    assert lines == [
        "the ledger /w/status.xml holds no request yet",
        "",
        "next run (the broker lists 3 request(s) tagged 'rki'):",
        "  would re-upload request 5 (completion 0.5 -> 1.0)",
        "  would NOT delete export_7.zip (request 7 is no longer listed): mass-deletion guard",
        "  2 change(s), 2 unchanged",
        "",
        "server folder 'rki' (4 file(s)) against the ledger:",
        "  missing: export_1.zip (request 1)",
        "  wrong size: export_2.zip (request 2): 10 bytes, not a whole Fernet token",
        "  not in the ledger: notes.txt",
        "  2 file(s) to upload again: run `sync --repair`",
    ]


@pytest.fixture
def in_process_cli(signal_handlers):
    """The commands set up logging (and signal handlers) for a process; give pytest its own back."""
    root, paramiko = logging.getLogger(), logging.getLogger("paramiko")
    saved = list(root.handlers), root.level, paramiko.level
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    paramiko.setLevel(saved[2])


def local_config(tmp_path: Path) -> Path:
    """A config whose broker and server do not exist: enough for what needs neither."""
    (tmp_path / "work").mkdir()
    generate_key_file(tmp_path / "rki.key")
    config = tmp_path / "settings.toml"
    config.write_text('[BROKER]\nURL = "http://127.0.0.1:9"\nAPI_KEY = "k"\n[REQUESTS]\nTAG = "rki"\n'
                      '[SFTP]\nHOST = "127.0.0.1"\nPORT = 9\nUSERNAME = "u"\nPASSWORD = "p"\nTIMEOUT = "2"\n'
                      'FOLDERNAME = "rki"\nRETRIES = 0\n[SECURITY]\nPATH_ENCRYPTION_KEY = "rki.key"\n'
                      '[MISC]\nWORKING_DIR = "work"\n')
    config.chmod(0o600)
    return config


def test_status_through_click(tmp_path, in_process_cli):
    config = local_config(tmp_path)
    (tmp_path / "work" / "status.xml").write_bytes(
        b"<status><request-status><id>4</id><completion>1.0</completion>"
        b"<uploaded>2021-10-11 09:39:50</uploaded></request-status></status>")
    result = CliRunner().invoke(cli, ["status", "-c", str(config), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["requests"] == [
        {"id": "4", "completion": "1.0", "file": None, "size": None, "uploaded": "2021-10-11 09:39:50",
         "last_update": None, "deleted": None}]


def test_check_through_click_with_nothing_reachable(tmp_path, in_process_cli):
    config = local_config(tmp_path)
    before = sorted(path.name for path in (tmp_path / "work").iterdir())
    result = CliRunner().invoke(cli, ["check", "-c", str(config), "--json"])
    document = json.loads(result.output)
    assert result.exit_code == document["exit_code"] == 13  # the broker's failure comes first
    statuses = {check["name"]: check["status"] for check in document["checks"]}
    assert statuses == {"config": "ok", "fernet key": "ok", "ssh key": "skipped", "broker": "failed",
                        "api key": "skipped", "requests": "skipped", "sftp server": "failed",
                        "sftp login": "skipped", "sftp folder": "skipped", "ledger": "ok", "lock": "info"}
    assert sorted(path.name for path in (tmp_path / "work").iterdir()) == before
