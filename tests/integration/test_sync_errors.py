"""Each failure of `sync` gives its documented exit code, one line on stderr, and an untouched ledger."""

from __future__ import annotations

from test_resources.broker_actors import ADMIN_KEY, NODE1_KEY
from tests.conftest import assert_failed_cleanly, closed_port


def test_sync_bad_config_exits_10(outdated):
    outdated.rewrite_config('TIMEOUT = "10"', 'TIMEOUT = "ten"\nPROT = 22')
    result = outdated.sync()
    assert_failed_cleanly(result, 10, f"invalid config {outdated.config_path}: SFTP.PROT: unknown key (a typo?); "
                                      "SFTP.TIMEOUT: expected a number, got a string", outdated)


def test_sync_config_from_environment_variable(outdated, tmp_path):
    result = outdated.run("sync", "--dry-run", env={"BROKER_SFTP_UPLOADER_CONFIG": str(outdated.config_path)})
    assert result.returncode == 0, result.stderr
    assert "would re-upload request 0 (completion 0.5 -> 1.0)" in result.stdout


def test_sync_without_config_is_a_usage_error(outdated):
    result = outdated.run("sync")
    assert result.returncode == 2
    assert "Missing option '-c' / '--config'" in result.stderr


def test_sync_unreachable_broker_exits_13(outdated):
    outdated.rewrite_config(outdated.config_text.split('URL = "')[1].split('"')[0],
                            f"http://127.0.0.1:{closed_port()}")
    result = outdated.sync()
    assert_failed_cleanly(result, 13, "cannot reach the broker at http://127.0.0.1:", outdated)


def test_sync_rejected_api_key_exits_13(outdated):
    outdated.rewrite_config(f'API_KEY = "{ADMIN_KEY}"', f'API_KEY = "{NODE1_KEY}"')
    result = outdated.sync()
    assert_failed_cleanly(result, 13, "broker rejected the API key (401)", outdated)
    assert NODE1_KEY not in result.stderr


def test_sync_broker_error_on_listing_exits_13(outdated, broker):
    broker.inject_fault("GET", r"/broker/request/filtered$", status=500)
    result = outdated.sync()
    assert_failed_cleanly(result, 13, "broker answered 500 to GET /broker/request/filtered", outdated)


def test_sync_wrong_sftp_password_exits_14(outdated, sshd):
    outdated.rewrite_config(f'PASSWORD = "{sshd.password}"', 'PASSWORD = "wrong-password"')
    result = outdated.sync()
    assert_failed_cleanly(result, 14, "SFTP login as bsu-sftp@127.0.0.1", outdated)
    assert "wrong-password" not in result.stderr


def test_sync_unreachable_sftp_exits_14(outdated, sshd):
    outdated.rewrite_config(f"PORT = {sshd.port}", f"PORT = {closed_port()}")
    result = outdated.sync()
    assert_failed_cleanly(result, 14, "cannot connect to SFTP server 127.0.0.1:", outdated)


def test_sync_missing_remote_folder_exits_14(outdated):
    outdated.rewrite_config(f'FOLDERNAME = "{outdated.remote.name}"', 'FOLDERNAME = "no-such-folder"')
    result = outdated.sync()
    assert_failed_cleanly(result, 14, "remote folder 'no-such-folder' is not usable", outdated)


def test_sync_changed_host_key_exits_14(outdated, sshd):
    other_key = "AAAAC3NzaC1lZDI1NTE5AAAAIAb3T5kQb6JqJXn0gx7ZP1d7oYQpZ0b8l5n2Zp9Rk1bX"
    (outdated.working_dir / "known_hosts").write_text(f"[127.0.0.1]:{sshd.port} ssh-ed25519 {other_key}\n")
    result = outdated.sync()
    assert_failed_cleanly(result, 14, "does not match the one recorded", outdated)


def test_sync_first_contact_records_host_key(outdated, sshd):
    (outdated.working_dir / "known_hosts").unlink()
    assert outdated.sync().returncode == 0
    known = (outdated.working_dir / "known_hosts").read_text()
    assert known == f"[127.0.0.1]:{sshd.port} {sshd.host_public_key_line.split()[0]} " \
                    f"{sshd.host_public_key_line.split()[1]}\n"


def test_sync_missing_key_file_exits_12(outdated):
    outdated.key_path.unlink()
    result = outdated.sync()
    assert_failed_cleanly(result, 12, str(outdated.key_path), outdated)


def test_sync_invalid_key_file_exits_12(outdated):
    outdated.key_path.write_text("not-a-fernet-key\n")
    result = outdated.sync()
    assert_failed_cleanly(result, 12, str(outdated.key_path), outdated)
    assert "not-a-fernet-key" not in result.stderr


def test_sync_unreadable_ledger_exits_15(outdated):
    broken = b"<status><request-status><id>0</id>"
    outdated.ledger.write_bytes(broken)
    result = outdated.sync()
    assert result.returncode == 15
    assert len(result.stderr.strip().splitlines()) == 1
    assert "is not valid XML" in result.stderr
    assert outdated.ledger.read_bytes() == broken
    assert outdated.remote_names() == []
