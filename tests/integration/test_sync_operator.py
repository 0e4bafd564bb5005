"""`sync` for the admin at the keyboard and for monitoring: reports, metrics, log file, progress,
one-off re-sends and repair. Against the broker emulator and the real sshd."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
from lxml import etree
from prometheus_client.parser import text_string_to_metric_families

from test_resources import broker_actors as actors

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "docs" / "last-run.schema.json").read_text())


def entry(workspace, request_id: str) -> dict[str, str]:
    for element in etree.parse(str(workspace.ledger)).getroot():
        if element.findtext("id") == request_id:
            return {child.tag: child.text for child in element}
    raise AssertionError(f"request {request_id} is not in the ledger")


def last_run(workspace) -> dict:
    return json.loads((workspace.working_dir / "last-run.json").read_text())


def test_json_report_on_stdout_validates_and_equals_last_run(broker, workspace):
    first = actors.publish_completed(broker.url, result=b"x" * 5000)
    second = actors.publish_completed(broker.url)
    result = workspace.sync("--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    jsonschema.validate(document, SCHEMA)
    assert document == last_run(workspace)
    assert document["counts"] == {"uploaded": 2, "deleted": 0, "unchanged": 0, "failed": 0, "refused": 0}
    uploads = [action for action in document["actions"] if action["action"] == "upload"]
    assert [(action["request_id"], action["reason"], action["outcome"]) for action in uploads] == [
        (first, "new", "done"), (second, "new", "done")]
    sizes = {name: (workspace.remote / name).stat().st_size for name in workspace.remote_names()}
    assert [action["bytes"] for action in uploads] == [sizes[f"export_{first}.zip"], sizes[f"export_{second}.zip"]]
    assert document["bytes_uploaded"] == sum(action["bytes"] for action in uploads)
    assert [action["action"] for action in document["actions"]][-1] == "ledger"


def test_failed_run_leaves_its_report_and_metrics(broker, workspace, tmp_path):
    metrics = tmp_path / "textfile" / "uploader.prom"
    metrics.parent.mkdir()
    workspace.rewrite_config('WORKING_DIR = "work"', f'WORKING_DIR = "work"\nMETRICS_FILE = "{metrics}"')
    actors.publish_completed(broker.url)
    assert workspace.sync().returncode == 0
    first = {family.name: family for family in text_string_to_metric_families(metrics.read_text())}
    success = first["broker_sftp_uploader_last_success_timestamp_seconds"].samples[0].value
    assert first["broker_sftp_uploader_last_run_exit_code"].samples[0].value == 0
    actions = {sample.labels["outcome"]: sample.value for sample in first["broker_sftp_uploader_last_run_actions"].samples}
    assert actions == {"uploaded": 1, "deleted": 0, "unchanged": 0, "failed": 0, "refused": 0}

    broker.inject_fault("HEAD", r"/broker/status", status=500, times=10)
    result = workspace.sync("--json")
    assert result.returncode == 13
    document = json.loads(result.stdout)
    jsonschema.validate(document, SCHEMA)
    assert document["exit_code"] == 13 and document["error"].startswith("broker answered 500")
    assert last_run(workspace) == document
    second = {family.name: family for family in text_string_to_metric_families(metrics.read_text())}
    assert second["broker_sftp_uploader_last_run_exit_code"].samples[0].value == 13
    assert second["broker_sftp_uploader_last_success_timestamp_seconds"].samples[0].value == success


def test_log_file_gets_info_while_stderr_stays_quiet(broker, workspace, sshd, tmp_path):
    log = tmp_path / "uploader.log"
    actors.publish_completed(broker.url)
    workspace.pin_host_key(sshd)
    result = workspace.sync("--log-file", str(log))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert "INFO broker_sftp_uploader.commands.sync: 1 uploaded" in log.read_text()
    workspace.rewrite_config('WORKING_DIR = "work"', f'WORKING_DIR = "work"\nLOG_FILE = "{log}"')
    assert workspace.sync().returncode == 0
    assert log.read_text().count("broker lists 1 request(s)") == 2  # appended, not replaced


def test_a_log_file_that_cannot_be_opened_is_a_config_error_and_nothing_runs(broker, workspace, tmp_path):
    actors.publish_completed(broker.url)
    result = workspace.sync("--log-file", str(tmp_path / "no-such-folder" / "uploader.log"))
    assert result.returncode == 10
    assert result.stderr == (f"Error: cannot open the log file {tmp_path}/no-such-folder/uploader.log: No such file "
                             "or directory; check --log-file / MISC.LOG_FILE\n")
    assert workspace.remote_names() == [] and not workspace.ledger.exists()


def test_request_is_sent_again_and_nothing_else_is_touched(broker, workspace):
    first, second = (actors.publish_completed(broker.url, result=data) for data in (b"first\n", b"second\n"))
    assert workspace.sync().returncode == 0
    inode_second = (workspace.remote / f"export_{second}.zip").stat().st_ino
    inode_first = (workspace.remote / f"export_{first}.zip").stat().st_ino

    dry = workspace.sync("--request", first, "--dry-run")
    assert dry.returncode == 0
    assert f"would re-send request {first} (asked for, completion 1.0)" in dry.stdout
    result = workspace.sync("--request", first)
    assert result.returncode == 0, result.stderr
    assert (workspace.remote / f"export_{first}.zip").stat().st_ino != inode_first
    assert (workspace.remote / f"export_{second}.zip").stat().st_ino == inode_second
    assert "last-update" in entry(workspace, first) and "last-update" not in entry(workspace, second)
    assert (workspace.remote / "status.xml").read_bytes() == workspace.ledger.read_bytes()


def test_request_that_is_not_listed_is_a_usage_error(broker, workspace):
    actors.publish_completed(broker.url)
    result = workspace.sync("--request", "77")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: the broker lists no request 77 tagged 'rki'; check the id (see `status`) and REQUESTS.TAG")
    assert workspace.remote_names() == []


def test_repair_restores_missing_and_damaged_files(broker, workspace):
    first, second, third = (actors.publish_completed(broker.url, result=data)
                            for data in (b"1\n", b"2\n", b"3\n"))
    assert workspace.sync().returncode == 0
    (workspace.remote / f"export_{first}.zip").unlink()
    damaged = workspace.remote / f"export_{second}.zip"
    damaged.write_bytes(damaged.read_bytes()[:-7])
    untouched = (workspace.remote / f"export_{third}.zip").stat().st_ino

    plain = workspace.sync()
    assert (plain.returncode, plain.stderr) == (0, "")
    assert not (workspace.remote / f"export_{first}.zip").exists()  # a normal run does not look

    dry = workspace.sync("--repair", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would re-upload request {first} (its file on the server is missing or damaged)" in dry.stdout
    assert f"would re-upload request {second} (its file on the server is missing or damaged)" in dry.stdout
    assert not (workspace.remote / f"export_{first}.zip").exists()

    result = workspace.sync("--repair")
    assert result.returncode == 0, result.stderr
    assert f"export_{first}.zip (request {first}) is missing on the server" in result.stderr
    assert (workspace.remote / f"export_{third}.zip").stat().st_ino == untouched
    document = last_run(workspace)
    repaired = [action["request_id"] for action in document["actions"] if action["reason"] == "repair"]
    assert sorted(repaired) == [first, second]
    from broker_sftp_uploader.state.ledger import Ledger
    from broker_sftp_uploader.engine.audit import compare_remote
    sizes = {path.name: path.stat().st_size for path in workspace.remote.iterdir()}
    assert compare_remote(Ledger.load(workspace.ledger).entries(), sizes).clean


def run_on_terminal(workspace, *extra: str) -> tuple[int, str]:
    """Run `sync` with a pseudo-terminal as stdout and stderr; return (exit code, all it wrote)."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "broker_sftp_uploader", "sync", "-c",
                                str(workspace.config_path), *extra], stdin=subprocess.DEVNULL, stdout=terminal,
                               stderr=terminal, cwd=workspace.root)
    os.close(terminal)
    output = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([controller], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the terminal was closed: the child is done
                break
            if not chunk:
                break
            output += chunk
        elif process.poll() is not None:
            break
    os.close(controller)
    return process.wait(timeout=30), output.decode("utf-8", "replace")


@pytest.mark.parametrize("forced", [False, True], ids=["terminal", "forced-off"])
def test_terminal_shows_progress_and_summary_unless_switched_off(broker, workspace, sshd, tmp_path, forced):
    big = actors.write_incompressible_file(tmp_path / "big.bin", 24)
    request_id = actors.publish_completed(broker.url, result=big)
    workspace.pin_host_key(sshd)
    code, output = run_on_terminal(workspace, *(["--no-progress"] if forced else []))
    assert code == 0, output
    if forced:
        assert output == ""
    else:
        assert f"↑ export_{request_id}.zip " in output and " MiB/s" in output
        assert output.rstrip().splitlines()[-1].lstrip("\r ").startswith("1 uploaded (")


def test_without_a_terminal_a_successful_run_prints_nothing_unless_forced(broker, workspace, sshd):
    actors.publish_completed(broker.url)
    workspace.pin_host_key(sshd)
    assert workspace.sync().stderr == ""
    actors.publish_completed(broker.url)
    result = workspace.sync("--progress")
    assert result.returncode == 0
    assert result.stderr.strip().splitlines()[-1].startswith("1 uploaded (")
