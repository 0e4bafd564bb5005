"""Unit tests for plan_sync, the pure heart of the sync rules."""

from broker_sftp_uploader.errors import BrokerError, SftpError
from broker_sftp_uploader.job import exit_code_for
from broker_sftp_uploader.ledger import LedgerEntry
from broker_sftp_uploader.sync import Delete, Report, Upload, plan_sync


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
    plan = plan_sync({}, {"0": entry("0", "1.0", remote_name="bundle_0.zip"), "1": entry("1", "1.0")})
    assert plan.deletes == (Delete("0", "bundle_0.zip"), Delete("1", "export_1.zip"))


def test_plan_sync_deleted_and_still_absent_is_left_alone():
    plan = plan_sync({}, {"0": entry("0", "1.0", deleted="2021-10-11 09:39:55")})
    assert plan.actions == ()


def test_plan_sync_relisted_after_deletion_is_uploaded_again():
    plan = plan_sync({"0": "1.0"}, {"0": entry("0", "1.0", deleted="2021-10-11 09:39:55")})
    assert plan.uploads == (Upload("0", "1.0", "relisted", "1.0"),)


def test_plan_sync_deletes_come_before_uploads():
    plan = plan_sync({"6": "0.0"}, {"0": entry("0", "1.0")})
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
