"""``check`` against the broker emulator and the real sshd: every broken part of a set-up has its own
message and exit code, the steps that do not depend on it still run, and nothing changes anywhere
(ledger, known_hosts, working folder, server folder: byte for byte; no lock file)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from broker_sftp_uploader.commands.check import STEPS as check_steps
from broker_sftp_uploader.state.lock import LOCK_FILE_NAME, RunLock
from test_resources import broker_actors as actors
from test_resources.broker_actors import ADMIN_KEY, NODE1_KEY
from tests.conftest import closed_port
from tests.integration.test_secrets_never_shown import WRONG_SECRET, use_every_secret

STEPS = list(check_steps)
OTHER_HOST_KEY = "AAAAC3NzaC1lZDI1NTE5AAAAIAb3T5kQb6JqJXn0gx7ZP1d7oYQpZ0b8l5n2Zp9Rk1bX"


@pytest.fixture
def synced_once(broker, workspace, sshd):
    """A working set-up after one sync: request 0 uploaded, ledger and known_hosts written."""
    actors.publish_completed(broker.url)
    workspace.pin_host_key(sshd)
    first = workspace.sync()
    assert first.returncode == 0, first.stderr
    assert workspace.remote_names() == ["export_0.zip", "status.xml"]
    return workspace


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under ``folder``."""
    return {str(path.relative_to(folder)): None if path.is_dir() else path.read_bytes()
            for path in sorted(folder.rglob("*"))}


@pytest.fixture(autouse=True)
def private_temp_dir(tmp_path, monkeypatch):
    """The checks' throwaway folders go to a folder of this test's (other test runs may share /tmp)."""
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))


def our_temp_folders() -> set[str]:
    folder = os.environ.get("TMPDIR") or tempfile.gettempdir()
    return {name for name in os.listdir(folder) if name.startswith("bsu-check-")}


class Unchanged:
    """Remembers the working folder and server folder(s) and asserts later that nothing changed."""

    def __init__(self, workspace, *remote_folders: Path):
        self.folders = [workspace.working_dir, workspace.remote, *remote_folders]
        self.before = [tree(folder) for folder in self.folders]
        self.lock_path = workspace.working_dir / LOCK_FILE_NAME
        self.lock_existed = self.lock_path.exists()
        self.temp_folders = our_temp_folders()

    def verify(self) -> None:
        assert [tree(folder) for folder in self.folders] == self.before
        assert self.lock_path.exists() == self.lock_existed
        assert our_temp_folders() == self.temp_folders


def run_check(workspace, *extra: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, dict]]:
    """Run ``check --json``; return the exit code and the findings by step name."""
    result = workspace.run("check", "-c", str(workspace.config_path), "--json", *extra, env=env)
    document = json.loads(result.stdout)
    assert document["version"] == 1
    assert document["exit_code"] == result.returncode
    assert [check["name"] for check in document["checks"]] == STEPS
    assert result.stderr == "", result.stderr  # warnings are folded into the steps
    return result.returncode, {check["name"]: check for check in document["checks"]}


def run_check_changing_nothing(workspace, *remote_folders: Path) -> tuple[int, dict[str, dict]]:
    """`run_check`, which must leave the working folder, the server folder and ``remote_folders`` as they
    were (see `Unchanged`)."""
    unchanged = Unchanged(workspace, *remote_folders)
    code, checks = run_check(workspace)
    unchanged.verify()
    return code, checks


def statuses(checks: dict[str, dict]) -> dict[str, str]:
    return {name: check["status"] for name, check in checks.items()}


def assert_all_else_ok(checks: dict[str, dict], *exceptions: str) -> None:
    for name, check in checks.items():
        if name not in exceptions:
            expected = {"ssh key": "skipped", "lock": "info"}.get(name, "ok")
            assert check["status"] == expected, check


def test_good_setup_passes_one_line_per_step_and_changes_nothing(synced_once, sshd):
    unchanged = Unchanged(synced_once)
    result = synced_once.run("check", "-c", str(synced_once.config_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert [line.split("  ")[0] for line in lines[:-1]] == STEPS
    assert lines[-1] == "all checks passed"
    text = result.stdout
    assert "requests     ok       1 request(s) tagged 'rki'" in text
    assert f"answers with the host key recorded in {synced_once.working_dir / 'known_hosts'}" in text
    assert sshd.host_key_fingerprint in text
    assert "allows write, rename and delete" in text
    assert "holds 1 request(s): 1 live, 0 deleted" in text
    assert "lock         info     no run holds the lock now" in text
    unchanged.verify()


def test_good_setup_as_json(synced_once):
    code, checks = run_check_changing_nothing(synced_once)
    assert code == 0
    assert_all_else_ok(checks)
    assert checks["api key"]["message"] == "BROKER.API_KEY is an admin key"


def test_bad_fernet_key_exits_12_and_the_rest_still_runs(synced_once):
    synced_once.key_path.write_text("not a fernet key\n")
    code, checks = run_check_changing_nothing(synced_once)
    assert code == 12
    assert checks["fernet key"]["status"] == "failed"
    assert checks["fernet key"]["message"] == (f"key file {synced_once.key_path}, line 1: not a valid Fernet "
                                               "key (expected 44 characters of url-safe base64)")
    assert_all_else_ok(checks, "fernet key")


def test_bad_ssh_key_exits_12_and_skips_the_sftp_steps(synced_once, sshd):
    public = synced_once.root / "id.pub"
    public.write_text(sshd.host_public_key_line + "\n")
    public.chmod(0o600)
    synced_once.rewrite_config(f'USERNAME = "{sshd.password_user}"\nPASSWORD = "{sshd.password}"',
                               f'USERNAME = "{sshd.key_user}"\nPRIVATE_KEY = "{public}"')
    code, checks = run_check_changing_nothing(synced_once)
    assert code == 12
    assert checks["ssh key"]["status"] == "failed"
    assert checks["ssh key"]["message"] == (f"SSH private key {public} (SFTP.PRIVATE_KEY) holds a public key; "
                                            "SFTP.PRIVATE_KEY needs the private one (usually the name without .pub)")
    for name in ("sftp server", "sftp login", "sftp folder"):
        assert checks[name]["status"] == "skipped"
    for name in ("broker", "api key", "requests", "ledger"):
        assert checks[name]["status"] == "ok"


def test_good_key_login_names_the_key(synced_once, sshd):
    key = sshd.client_key("ed25519")
    synced_once.rewrite_config(f'USERNAME = "{sshd.password_user}"\nPASSWORD = "{sshd.password}"',
                               f'USERNAME = "{sshd.key_user}"\nPRIVATE_KEY = "{key}"')
    synced_once.rewrite_config(f'FOLDERNAME = "{synced_once.remote.name}"', 'FOLDERNAME = "rki"')
    code, checks = run_check_changing_nothing(synced_once, sshd.folder("rki"))
    assert code == 0, checks
    assert checks["ssh key"]["status"] == "ok"
    assert checks["ssh key"]["message"].startswith(f"{key}: ssh-ed25519 SHA256:")
    assert checks["sftp login"]["message"] == f"logged in as {sshd.key_user} with the key"


def test_wrong_api_key_exits_13(synced_once):
    synced_once.rewrite_config(f'API_KEY = "{ADMIN_KEY}"', 'API_KEY = "not-a-known-key"')
    code, checks = run_check_changing_nothing(synced_once)
    assert code == 13
    assert checks["api key"]["status"] == "failed"
    assert checks["api key"]["message"] == ("the broker does not know BROKER.API_KEY (401: unknown or inactive "
                                            "key); check it against the broker's api-keys.properties")
    assert checks["requests"]["status"] == "skipped"
    assert_all_else_ok(checks, "api key", "requests")


def test_node_key_instead_of_admin_key_exits_13_saying_so(synced_once):
    synced_once.rewrite_config(f'API_KEY = "{ADMIN_KEY}"', f'API_KEY = "{NODE1_KEY}"')
    code, checks = run_check_changing_nothing(synced_once)
    assert code == 13
    assert checks["api key"]["status"] == "failed"
    assert "a node (hospital) key, not an admin key" in checks["api key"]["message"]
    assert checks["requests"]["status"] == "skipped"
    assert_all_else_ok(checks, "api key", "requests")


def test_tag_selecting_nothing_is_a_warning_naming_the_tag(synced_once):
    synced_once.rewrite_config('TAG = "rki"', 'TAG = "no-such-tag"')
    code, checks = run_check_changing_nothing(synced_once)
    assert code == 0
    assert checks["requests"]["status"] == "warning"
    assert "no request on the broker is tagged 'no-such-tag' (REQUESTS.TAG)" in checks["requests"]["message"]
    assert_all_else_ok(checks, "requests")


def test_unreachable_broker_exits_13_and_sftp_is_still_checked(synced_once, broker):
    synced_once.rewrite_config(f'URL = "{broker.url}"',
                               f'URL = "http://127.0.0.1:{closed_port()}"\nRETRIES = 0')
    code, checks = run_check_changing_nothing(synced_once)
    assert code == 13
    assert checks["broker"]["status"] == "failed"
    assert "connection refused" in checks["broker"]["message"]
    assert "check BROKER.URL" in checks["broker"]["message"]
    assert checks["api key"]["status"] == checks["requests"]["status"] == "skipped"
    assert_all_else_ok(checks, "broker", "api key", "requests")


def test_wrong_sftp_password_exits_14(synced_once, sshd):
    synced_once.rewrite_config(f'PASSWORD = "{sshd.password}"', 'PASSWORD = "wrong-password"')
    code, checks = run_check_changing_nothing(synced_once)
    assert code == 14
    assert checks["sftp server"]["status"] == "ok"
    assert checks["sftp login"]["status"] == "failed"
    assert checks["sftp login"]["message"] == (f"SFTP login as {sshd.password_user}@127.0.0.1:{sshd.port} was "
                                               "refused; check SFTP.USERNAME and SFTP.PASSWORD")
    assert checks["sftp folder"]["status"] == "skipped"
    assert_all_else_ok(checks, "sftp login", "sftp folder")


def test_changed_host_key_exits_14_and_known_hosts_stays(synced_once, sshd):
    known_hosts = synced_once.working_dir / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{sshd.port} ssh-ed25519 {OTHER_HOST_KEY}\n")
    code, checks = run_check_changing_nothing(synced_once)
    assert code == 14
    assert checks["sftp server"]["status"] == "failed"
    message = checks["sftp server"]["message"]
    assert f"does not match the one recorded in {known_hosts}" in message
    assert sshd.host_key_fingerprint in message  # the key the server presented
    assert checks["sftp login"]["status"] == checks["sftp folder"]["status"] == "skipped"
    assert_all_else_ok(checks, "sftp server", "sftp login", "sftp folder")


def test_broken_known_hosts_line_names_the_real_file(synced_once, sshd):
    known_hosts = synced_once.working_dir / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {sshd.host_public_key_line}\nnot an entry\n")
    code, checks = run_check_changing_nothing(synced_once)
    assert code == 14
    assert checks["sftp server"]["status"] == "failed"
    assert checks["sftp server"]["message"].startswith(f"known_hosts file {known_hosts}, line 2: ")

def test_new_host_key_is_shown_and_not_recorded(synced_once, sshd):
    known_hosts = synced_once.working_dir / "known_hosts"
    known_hosts.unlink()
    code, checks = run_check_changing_nothing(synced_once)
    assert code == 0
    assert checks["sftp server"]["status"] == "warning"
    message = checks["sftp server"]["message"]
    assert f"presented the host key ssh-ed25519 {sshd.host_key_fingerprint}, which is not yet recorded" in message
    assert f"ssh-keyscan -p {sshd.port} 127.0.0.1 >> {known_hosts}" in message
    assert "first connection" not in message  # the throwaway copy's recording is not reported
    assert_all_else_ok(checks, "sftp server")
    assert not known_hosts.exists()


def test_missing_foldername_exits_14(synced_once, sshd):
    synced_once.rewrite_config(f'FOLDERNAME = "{synced_once.remote.name}"', 'FOLDERNAME = "no-such-folder"')
    code, checks = run_check_changing_nothing(synced_once)
    assert code == 14
    assert checks["sftp folder"]["status"] == "failed"
    assert checks["sftp folder"]["message"] == (f"remote folder 'no-such-folder' does not exist on "
                                                f"{sshd.password_user}@127.0.0.1:{sshd.port}; create it or fix "
                                                "SFTP.FOLDERNAME")
    assert_all_else_ok(checks, "sftp folder")
    assert not (sshd.sftp_root / "no-such-folder").exists()


def test_read_only_foldername_exits_14(synced_once, sshd):
    read_only = sshd.read_only_folder(f"ro-{os.urandom(3).hex()}")
    (read_only / "existing.txt").write_bytes(b"left alone\n")
    synced_once.rewrite_config(f'FOLDERNAME = "{synced_once.remote.name}"',
                               f'FOLDERNAME = "{read_only.name}"')
    code, checks = run_check_changing_nothing(synced_once, read_only)
    assert code == 14
    assert checks["sftp folder"]["status"] == "failed"
    message = checks["sftp folder"]["message"]
    assert message.startswith(f"cannot create a file in '{read_only.name}' on {sshd.password_user}@127.0.0.1:"
                              f"{sshd.port} (Permission denied)")
    assert f"give {sshd.password_user} these permissions or fix SFTP.FOLDERNAME" in message
    assert_all_else_ok(checks, "sftp folder")


@pytest.mark.parametrize("case", ["good", "changed host key", "wrong password"])
def test_openssh_transport_reports_the_same(synced_once, sshd, case):
    synced_once.rewrite_config('FOLDERNAME = ', 'TRANSPORT = "openssh"\nFOLDERNAME = ')
    known_hosts = synced_once.working_dir / "known_hosts"
    if case == "changed host key":
        known_hosts.write_text(f"[127.0.0.1]:{sshd.port} ssh-ed25519 {OTHER_HOST_KEY}\n")
    if case == "wrong password":
        synced_once.rewrite_config(f'PASSWORD = "{sshd.password}"', 'PASSWORD = "wrong-password"')
    code, checks = run_check_changing_nothing(synced_once)
    if case == "good":
        assert code == 0, checks
        assert_all_else_ok(checks)
    elif case == "changed host key":
        assert code == 14
        assert checks["sftp server"]["status"] == "failed"
        assert "does not match the one recorded" in checks["sftp server"]["message"]
    else:
        assert code == 14
        assert (checks["sftp server"]["status"], checks["sftp login"]["status"]) == ("ok", "failed")
        assert checks["sftp login"]["message"].startswith("SFTP login as")


def test_openssh_transport_new_host_key_is_not_recorded(synced_once, sshd):
    synced_once.rewrite_config('FOLDERNAME = ', 'TRANSPORT = "openssh"\nFOLDERNAME = ')
    known_hosts = synced_once.working_dir / "known_hosts"
    known_hosts.unlink()
    code, checks = run_check_changing_nothing(synced_once)
    assert code == 0
    assert checks["sftp server"]["status"] == "warning"
    assert sshd.host_key_fingerprint in checks["sftp server"]["message"]
    assert not known_hosts.exists()


def test_broken_ledger_exits_15(synced_once):
    synced_once.ledger.write_bytes(b"<status><request-status>")
    code, checks = run_check_changing_nothing(synced_once)
    assert code == 15
    assert checks["ledger"]["status"] == "failed"
    assert checks["ledger"]["message"].startswith(f"ledger {synced_once.ledger} is not valid XML")
    assert_all_else_ok(checks, "ledger")


def test_invalid_config_exits_10_and_skips_the_rest(synced_once):
    synced_once.rewrite_config('TIMEOUT = "10"', 'TIMEOUT = "soon"')
    code, checks = run_check_changing_nothing(synced_once)
    assert code == 10
    assert checks["config"]["status"] == "failed"
    assert "SFTP.TIMEOUT" in checks["config"]["message"]
    assert {check["status"] for name, check in checks.items() if name != "config"} == {"skipped"}


def test_first_failure_decides_the_exit_code(synced_once, sshd):
    synced_once.key_path.write_text("not a fernet key\n")
    synced_once.rewrite_config(f'PASSWORD = "{sshd.password}"', 'PASSWORD = "wrong-password"')
    code, checks = run_check(synced_once)
    assert code == 12
    assert (checks["fernet key"]["status"], checks["sftp login"]["status"]) == ("failed", "failed")
    result = synced_once.run("check", "-c", str(synced_once.config_path))
    assert result.returncode == 12
    assert result.stdout.splitlines()[-1] == "2 check(s) failed (fernet key, sftp login); exit code 12"


def test_a_run_holding_the_lock_is_named_and_the_lock_left_alone(synced_once):
    with RunLock(synced_once.working_dir):
        unchanged = Unchanged(synced_once)
        code, checks = run_check(synced_once)
        assert code == 0
        assert checks["lock"] == {"name": "lock", "status": "info",
                                  "message": f"a run holds the lock now (pid {os.getpid()}); a sync started "
                                             "meanwhile exits 11"}
        unchanged.verify()
    code, checks = run_check(synced_once)
    assert checks["lock"]["message"] == "no run holds the lock now"


def test_readable_fernet_key_is_a_warning_not_a_line_on_stderr(synced_once):
    synced_once.key_path.chmod(0o644)
    code, checks = run_check(synced_once)
    assert code == 0
    assert checks["fernet key"]["status"] == "warning"
    assert "chmod 600" in checks["fernet key"]["message"]


def test_help_shows_examples(workspace):
    for command in ("check", "status"):
        result = workspace.run(command, "--help")
        assert result.returncode == 0
        assert f"broker-sftp-uploader {command} -c /etc/aktin/sftp-upload.toml\n" in result.stdout


SECRET_SCENARIOS = ["check ok", "check wrong password", "check wrong api key", "check bad key passphrase",
                    "status remote"]


@pytest.mark.parametrize("source", ["inline", "file", "env"])
@pytest.mark.parametrize("scenario", SECRET_SCENARIOS)
def test_no_secret_in_the_output_of_check_and_status(synced_once, sshd, scenario, source):
    wrong = WRONG_SECRET.get(scenario.removeprefix("check "))
    shown, env = use_every_secret(synced_once, sshd, source, wrong)
    command = ["status", "--remote"] if scenario == "status remote" else ["check"]
    outputs = []
    for form in ([], ["--json"]):
        result = synced_once.run(*command, "-c", str(synced_once.config_path), *form, env=env)
        expected = {"check wrong password": 14, "check wrong api key": 13, "check bad key passphrase": 12}
        assert result.returncode == expected.get(scenario, 0), result.stdout + result.stderr
        outputs.append(result.stdout + result.stderr)
    if scenario == "check ok":
        assert f"logged in as {sshd.both_user} with the key and the password" in outputs[0]
    shown["Fernet key"] = synced_once.key_path.read_text().strip()
    leaked = [name for name, value in shown.items() if any(value in output for output in outputs)]
    assert leaked == [], f"{leaked} shown ({source}, {scenario})"
