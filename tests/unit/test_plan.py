"""Unit tests for plan_sync, the pure heart of the sync rules; the actions applying and recording
themselves; the ledger copy decision; the status calls' fan-out."""

import hashlib
from datetime import datetime, timezone

import pytest

from broker_sftp_uploader.errors import BrokerError, SftpError
from broker_sftp_uploader.commands.sync import exit_code_for
from broker_sftp_uploader.state.ledger import Ledger, LedgerEntry
from broker_sftp_uploader.engine.report import Report
from broker_sftp_uploader.engine.plan import (
    Delete,
    DeletionGuard,
    Upload,
    fetch_completions,
    ledger_copy_due,
    ledger_digest_path,
    plan_sync,
)

MOMENT = datetime(2021, 10, 11, 9, 39, 50, tzinfo=timezone.utc)

ANY = DeletionGuard(allow=True)


def entry(request_id, completion, deleted=None, remote_name=None):
    return LedgerEntry(request_id, completion, "2021-10-11 09:39:50", None, deleted, remote_name)


def test_plan_sync_new_requests_are_uploaded_in_id_order():
    plan = plan_sync({"10": "1.0", "2": "0.5"}, {})
    assert plan.uploads == (Upload("2", "0.5", "new"), Upload("10", "1.0", "new"))
    assert plan.deletes == ()


def test_plan_sync_unchanged_completion_does_nothing():
    plan = plan_sync({"2": "0.5"}, {"2": entry("2", "0.5")})
    assert plan.actions == ()
    assert plan.unchanged == 1


def test_plan_sync_changed_completion_is_reuploaded():
    plan = plan_sync({"2": "0.5"}, {"2": entry("2", "1.0")})
    assert plan.uploads == (Upload("2", "0.5", "changed", "1.0"),)


def test_plan_sync_vanished_request_is_deleted_by_recorded_name():
    plan = plan_sync({}, {"0": entry("0", "1.0", remote_name="bundle_0.zip"), "1": entry("1", "1.0")}, ANY)
    assert plan.deletes == (Delete("0", "bundle_0.zip"), Delete("1", "export_1.zip"))


def test_plan_sync_deleted_and_still_absent_is_left_alone():
    plan = plan_sync({}, {"0": entry("0", "1.0", deleted="2021-10-11 09:39:55")})
    assert plan.actions == ()


def test_plan_sync_relisted_after_deletion_is_uploaded_again():
    plan = plan_sync({"0": "1.0"}, {"0": entry("0", "1.0", deleted="2021-10-11 09:39:55")})
    assert plan.uploads == (Upload("0", "1.0", "relisted", "1.0"),)


def test_plan_sync_deletes_come_before_uploads():
    plan = plan_sync({"6": "0.0"}, {"0": entry("0", "1.0")}, ANY)
    assert [type(action) for action in plan.actions] == [Delete, Upload]


def test_plan_sync_original_scenario_second_run():
    ledger = {request_id: entry(request_id, "1.0") for request_id in ("0", "2", "4")}
    plan = plan_sync({"2": "0.5", "4": "0.5", "6": "0.0"}, ledger)
    assert plan.deletes == (Delete("0", "export_0.zip"),)
    assert [upload.reason for upload in plan.uploads] == ["changed", "changed", "new"]
    assert [upload.request_id for upload in plan.uploads] == ["2", "4", "6"]


def test_describe_lines_are_readable():
    assert Upload("2", "0.5", "changed", "1.0").describe() == "re-upload request 2 (completion 1.0 -> 0.5)"
    assert Delete("0", "export_0.zip").describe() == "delete export_0.zip (request 0 is no longer listed)"


def test_exit_code_for_clean_run_is_0():
    assert exit_code_for(Report(uploaded=["1"])) == 0
    assert exit_code_for(Report()) == 0


def test_exit_code_for_some_failed_some_done_is_partial():
    report = Report(uploaded=["1"], failures=[("2", BrokerError("broker answered 500"))])
    assert exit_code_for(report) == 3


def test_exit_code_for_everything_failed_is_the_first_failures_code():
    report = Report(failures=[("2", SftpError("upload failed")), ("3", BrokerError("x"))])
    assert exit_code_for(report) == 14


def test_exit_code_for_only_the_ledger_upload_failed_after_actions_is_partial():
    report = Report(deleted=["0"], failures=[("status.xml", SftpError("upload failed"))])
    assert exit_code_for(report) == 3


def test_plan_sync_reupload_of_a_legacy_name_goes_to_the_conventional_name():
    plan = plan_sync({"7": "1.0"}, {"7": entry("7", "0.5", remote_name="bundle.zip")})
    assert plan.uploads == (Upload("7", "1.0", "changed", "0.5", legacy_file="bundle.zip"),)
    assert plan.uploads[0].file_name == "export_7.zip"


def test_plan_sync_ignores_a_name_the_ledger_already_uses_conventionally():
    plan = plan_sync({"7": "1.0"}, {"7": entry("7", "0.5", remote_name="export_7.zip")})
    assert plan.uploads[0].legacy_file is None


def live(*ids: str) -> dict:
    return {request_id: entry(request_id, "1.0") for request_id in ids}


def test_guard_refuses_an_empty_listing_against_a_full_ledger():
    plan = plan_sync({}, live("0", "1", "2"))
    assert plan.deletes == ()
    assert [action.request_id for action in plan.refused] == ["0", "1", "2"]
    assert plan.refusal().startswith("refused to delete 3 of 3 files on the server (export_0.zip, export_1.zip, "
                                     "export_2.zip): more than REQUESTS.MAX_DELETE_PERCENT = 50 allows")
    assert "sync --allow-deletes" in plan.refusal()


def test_guard_refuses_a_listing_that_dropped_two_of_three_but_still_uploads():
    plan = plan_sync({"2": "1.0", "9": "0.0"}, live("0", "1", "2"))
    assert len(plan.refused) == 2 and plan.deletes == ()
    assert plan.uploads == (Upload("9", "0.0", "new"),)


def test_guard_lets_the_original_scenario_delete_one_of_three():
    plan = plan_sync({"2": "1.0", "4": "1.0"}, live("0", "2", "4"))
    assert plan.deletes == (Delete("0", "export_0.zip"),) and plan.refused == ()
    assert plan.refusal() is None


def test_guard_counts_only_live_files():
    ledger = {**live("5"), "0": entry("0", "1.0", deleted="2021-10-11 09:39:55"),
              "1": entry("1", "1.0", deleted="2021-10-11 09:39:55")}
    assert plan_sync({}, ledger).refused == (Delete("5", "export_5.zip"),)


def test_guard_count_limit_and_allow():
    ledger = live(*map(str, range(10)))
    listed = {str(number): "1.0" for number in range(7)}
    assert len(plan_sync(listed, ledger, DeletionGuard(max_percent=100, max_count=2)).refused) == 3
    assert len(plan_sync(listed, ledger, DeletionGuard(max_percent=100, max_count=3)).deletes) == 3
    assert len(plan_sync({}, ledger, DeletionGuard(allow=True)).deletes) == 10


def test_exit_code_for_refused_deletions_is_4_unless_something_failed():
    assert exit_code_for(Report(uploaded=["1"], refusal="refused")) == 4
    assert exit_code_for(Report(refusal="refused", uploaded=["1"], failures=[("2", BrokerError("x"))])) == 3


# -- each action applies and records itself (a recording fake site; the real one: test_apply_memory) -----


class RecordingSite:
    """Notes what actions ask of the server; ``refuse`` names files whose removal fails."""

    def __init__(self, refuse=()):
        self.calls = []
        self.refuse = set(refuse)

    def remove(self, name, quiet=False):
        self.calls.append(("remove", name))
        if name in self.refuse:
            raise SftpError(f"cannot delete {name}")
        return True

    def send_result(self, request_id, file_name):
        self.calls.append(("send", request_id, file_name))
        return 123


def test_an_upload_sends_its_result_under_the_conventional_name_and_records_it(tmp_path):
    site = RecordingSite()
    upload = Upload("7", "1.0", "changed", "0.5", legacy_file="bundle.zip")
    assert upload.apply(site) == 123
    assert site.calls == [("send", "7", "export_7.zip")]
    ledger = Ledger.load(tmp_path / "status.xml")
    upload.record(ledger, MOMENT, 123)
    entry = ledger.entries()["7"]
    assert (entry.completion, entry.file_name, entry.size) == ("1.0", "export_7.zip", 123)
    upload.tidy_up(site)
    assert site.calls[-1] == ("remove", "bundle.zip")
    assert (upload.kind, upload.reason) == ("upload", "changed")


def test_an_upload_without_an_old_name_tidies_nothing_and_a_failed_removal_only_warns(caplog):
    site = RecordingSite(refuse={"bundle.zip"})
    Upload("7", "1.0", "new").tidy_up(site)
    assert site.calls == []
    Upload("7", "1.0", "changed", "0.5", legacy_file="bundle.zip").tidy_up(site)
    assert "could not remove bundle.zip, the old file of request 7" in caplog.text


def test_a_deletion_removes_its_file_and_is_recorded_deleted(tmp_path):
    site = RecordingSite()
    delete = Delete("3", "bundle_3.zip")
    assert delete.apply(site) == 0 and site.calls == [("remove", "bundle_3.zip")]
    ledger = Ledger.load(tmp_path / "status.xml")
    ledger.record_upload("3", "1.0", "bundle_3.zip", MOMENT, 5)
    delete.record(ledger, MOMENT, 0)
    assert ledger.entries()["3"].is_deleted
    delete.tidy_up(site)
    assert (delete.kind, delete.reason) == ("delete", "vanished") and len(site.calls) == 1


def test_a_refused_deletion_raises_for_the_caller_to_report():
    with pytest.raises(SftpError, match="cannot delete export_3.zip"):
        Delete("3", "export_3.zip").apply(RecordingSite(refuse={"export_3.zip"}))


# -- the ledger copy: whether a run uploads it is decided in one place -----------------------------------


def test_ledger_copy_due(tmp_path):
    path = tmp_path / "status.xml"
    assert not ledger_copy_due(True, path)  # no ledger yet
    assert ledger_copy_due(True, path, changes_planned=True)
    assert not ledger_copy_due(False, path, changes_planned=True)  # SFTP.UPLOAD_LEDGER = false
    path.write_bytes(b"<status/>\n")
    assert ledger_copy_due(True, path)  # never uploaded
    ledger_digest_path(path).write_text(hashlib.sha256(b"<status/>\n").hexdigest() + "\n")
    assert not ledger_copy_due(True, path)  # the copy on the server is this ledger
    path.write_bytes(b"<status></status>\n")
    assert ledger_copy_due(True, path)
    assert not ledger_copy_due(False, path)


# -- the status calls ----------------------------------------------------------------------------------


class CompletionsBroker:
    """Answers status calls from a dict; a missing id fails like a broker error."""

    def __init__(self, completions):
        self.completions = completions

    def get_completion(self, request_id):
        if request_id not in self.completions:
            raise BrokerError(f"broker answered 500 to GET /broker/request/{request_id}/status")
        return self.completions[request_id]


def test_fetch_completions_keeps_the_listing_order():
    ids = [str(number) for number in range(200, 0, -1)]
    completions = {request_id: f"0.{request_id}" for request_id in ids}
    fetched = fetch_completions(CompletionsBroker(completions), ids, 32)
    assert list(fetched.items()) == list(completions.items())
    assert fetch_completions(CompletionsBroker({}), [], 32) == {}


def test_fetch_completions_raises_a_failed_status_call():
    with pytest.raises(BrokerError, match="answered 500 to GET /broker/request/13/status"):
        fetch_completions(CompletionsBroker({str(number): "1.0" for number in range(40) if number != 13}),
                          [str(number) for number in range(40)], 8)
