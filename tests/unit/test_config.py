"""Unit tests for config loading and validation."""

import time
from pathlib import Path

import pytest

from broker_sftp_uploader.config import NUMBER_KEYS, SFTP_TIMEOUT, load_config
from broker_sftp_uploader.errors import ConfigError
from test_resources.broker_actors import ADMIN_KEY

API_KEY_LINE = f'API_KEY = "{ADMIN_KEY}"'
ORIGINAL = f"""\
[BROKER]
URL = "http://localhost:8080"
{API_KEY_LINE}

[REQUESTS]
TAG = "rki"

[SFTP]
HOST = "127.0.0.1"
USERNAME = "sftpuser"
PASSWORD = "sftppassword"
TIMEOUT = "25"
FOLDERNAME = "rki"

[SECURITY]
PATH_ENCRYPTION_KEY = "rki.key"

[MISC]
WORKING_DIR = "work"
"""


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "work").mkdir(exist_ok=True)
    path = tmp_path / "settings.toml"
    path.write_text(text)
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.exit_code == 10
    return caught.value.problems


def test_load_config_original_file_loads_unchanged(tmp_path):
    config = load_config(write(tmp_path, ORIGINAL))
    assert config.broker.url == "http://localhost:8080"
    assert config.broker.tag == "rki"
    assert config.sftp.timeout == 25.0
    assert config.sftp.port == 22
    assert config.sftp.folder == "rki"
    assert config.sftp.upload_ledger is True
    assert config.key_path == (tmp_path / "rki.key").resolve()
    assert config.working_dir == (tmp_path / "work").resolve()
    assert config.ledger_path == (tmp_path / "work" / "status.xml").resolve()
    assert config.sftp.known_hosts == (tmp_path / "work" / "known_hosts").resolve()


def test_load_config_secrets_not_in_repr(tmp_path):
    config = load_config(write(tmp_path, ORIGINAL))
    assert ADMIN_KEY not in repr(config)
    assert "sftppassword" not in repr(config)


def test_load_config_timeout_as_number_and_port(tmp_path):
    text = ORIGINAL.replace('TIMEOUT = "25"', "TIMEOUT = 7\nPORT = 2222")
    config = load_config(write(tmp_path, text))
    assert config.sftp.timeout == 7.0
    assert config.sftp.port == 2222


def test_load_config_smtp_section_of_original_accepted(tmp_path):
    text = ORIGINAL + '\n[SMTP]\nHOST = "smtp.example.org"\nUSERNAME = "u"\nPASSWORD = "p"\n'
    assert load_config(write(tmp_path, text)).broker.tag == "rki"


def test_load_config_reports_every_problem_at_once(tmp_path):
    text = (ORIGINAL.replace(API_KEY_LINE + "\n", "")
            .replace('TIMEOUT = "25"', 'TIMEOUT = "soon"\nPORT = 70000\nPASWORD = "x"')
            .replace('TAG = "rki"', "TAG = 5"))
    problems = problems_of(write(tmp_path, text))
    assert any(problem.startswith("BROKER.API_KEY: missing") for problem in problems)
    assert "SFTP.TIMEOUT: expected a number, got a string" in problems
    assert "SFTP.PORT: must be between 1 and 65535, got 70000" in problems
    assert "SFTP.PASWORD: unknown key (a typo?)" in problems
    assert "REQUESTS.TAG: expected a string, got an integer" in problems
    assert len(problems) == 5


def test_load_config_problem_never_echoes_a_secret(tmp_path):
    text = ORIGINAL.replace('PASSWORD = "sftppassword"', "PASSWORD = 123456789")
    problems = problems_of(write(tmp_path, text))
    assert problems == ["SFTP.PASSWORD: expected a string, got an integer"]


def test_load_config_missing_working_dir_is_reported(tmp_path):
    text = ORIGINAL.replace('WORKING_DIR = "work"', 'WORKING_DIR = "nowhere"')
    problems = problems_of(write(tmp_path, text))
    assert problems == [f"MISC.WORKING_DIR: folder {(tmp_path / 'nowhere').resolve()} does not exist; create it first"]


def test_load_config_bad_url_and_quote_in_tag(tmp_path):
    text = ORIGINAL.replace('"http://localhost:8080"', '"localhost:8080"').replace('"rki"\n\n[SFTP]', "\"r'ki\"\n\n[SFTP]")
    problems = problems_of(write(tmp_path, text))
    assert problems[0] == "BROKER.URL: must start with http:// or https://"
    assert problems[1].startswith("REQUESTS.TAG: must not contain a single quote")


def test_load_config_section_that_is_not_a_table(tmp_path):
    problems = problems_of(write(tmp_path, 'MISC = "x"\n' + ORIGINAL.split("[MISC]")[0]))
    assert "MISC: expected a table [MISC], got a string" in problems


def test_load_config_missing_file(tmp_path):
    problems = problems_of(tmp_path / "absent.toml")
    assert problems == ["file not found; check the path given with --config (or in BROKER_SFTP_UPLOADER_CONFIG)"]


def test_load_config_not_toml(tmp_path):
    problems = problems_of(write(tmp_path, "[BROKER\nURL=1"))
    assert problems[0].startswith("not valid TOML")


def test_load_config_ca_bundle_must_exist(tmp_path):
    problems = problems_of(write(tmp_path, 'REQUESTS_CA_BUNDLE = "ca.pem"\n' + ORIGINAL))
    assert problems == [f"REQUESTS_CA_BUNDLE: file {(tmp_path / 'ca.pem').resolve()} does not exist"]


def test_load_config_upload_ledger_switch(tmp_path):
    text = ORIGINAL.replace('FOLDERNAME = "rki"', 'FOLDERNAME = "rki/"\nUPLOAD_LEDGER = false')
    config = load_config(write(tmp_path, text))
    assert config.sftp.upload_ledger is False
    assert config.sftp.folder == "rki"


def test_load_config_new_keys_default(tmp_path):
    config = load_config(write(tmp_path, ORIGINAL))
    broker, sftp = config.broker, config.sftp
    assert (broker.call_timeout, broker.export_timeout, broker.retries) == (60.0, 1800.0, 3)
    assert (sftp.retries, sftp.private_key, sftp.private_key_passphrase) == (3, None, None)
    assert (config.max_delete_percent, config.max_delete_count, config.run_timeout) == (50.0, None, 14400.0)


def test_load_config_new_keys_set(tmp_path):
    text = (ORIGINAL.replace(API_KEY_LINE, f'{API_KEY_LINE}\nCALL_TIMEOUT = 30\n'
                             'EXPORT_TIMEOUT = "7200"\nRETRIES = 0')
            .replace('TAG = "rki"', 'TAG = "rki"\nMAX_DELETE_PERCENT = 12.5\nMAX_DELETE_COUNT = "0"')
            .replace('FOLDERNAME = "rki"', 'FOLDERNAME = "rki"\nRETRIES = 10')
            .replace('WORKING_DIR = "work"', 'WORKING_DIR = "work"\nRUN_TIMEOUT = 3600'))
    config = load_config(write(tmp_path, text))
    broker = config.broker
    assert (broker.call_timeout, broker.export_timeout, broker.retries) == (30.0, 7200.0, 0)
    assert config.sftp.retries == 10
    assert (config.max_delete_percent, config.max_delete_count, config.run_timeout) == (12.5, 0, 3600.0)
    assert isinstance(config.broker.retries, int) and isinstance(config.max_delete_count, int)
    assert isinstance(config.run_timeout, float)


def test_load_config_new_keys_out_of_range_all_reported(tmp_path):
    text = (ORIGINAL.replace(API_KEY_LINE, f'{API_KEY_LINE}\nCALL_TIMEOUT = 0.5\n'
                             'EXPORT_TIMEOUT = 86401\nRETRIES = 11')
            .replace('TAG = "rki"', 'TAG = "rki"\nMAX_DELETE_PERCENT = 100.5\nMAX_DELETE_COUNT = -1')
            .replace('FOLDERNAME = "rki"', 'FOLDERNAME = "rki"\nRETRIES = 2.5')
            .replace('WORKING_DIR = "work"', 'WORKING_DIR = "work"\nRUN_TIMEOUT = 59'))
    assert problems_of(write(tmp_path, text)) == [
        "BROKER.CALL_TIMEOUT: must be between 1 and 3600, got 0.5",
        "BROKER.EXPORT_TIMEOUT: must be between 1 and 86400, got 86401",
        "BROKER.RETRIES: must be between 0 and 10, got 11",
        "REQUESTS.MAX_DELETE_PERCENT: must be between 0 and 100, got 100.5",
        "REQUESTS.MAX_DELETE_COUNT: must be at least 0, got -1",
        "SFTP.RETRIES: expected a whole number, got a number",
        "MISC.RUN_TIMEOUT: must be between 60 and 604800, got 59",
    ]


def test_load_config_new_keys_wrong_types(tmp_path):
    text = (ORIGINAL.replace('TAG = "rki"', 'TAG = "rki"\nMAX_DELETE_COUNT = "many"\n'
                                            'MAX_DELETE_PERCENT = true')
            .replace('WORKING_DIR = "work"', 'WORKING_DIR = "work"\nRUN_TIMEOUT = [1]'))
    assert problems_of(write(tmp_path, text)) == [
        "REQUESTS.MAX_DELETE_PERCENT: expected a number, got a boolean",
        "REQUESTS.MAX_DELETE_COUNT: expected a whole number, got a string",
        "MISC.RUN_TIMEOUT: expected a number, got an array",
    ]


def test_load_config_concurrency_defaults(tmp_path):
    config = load_config(write(tmp_path, ORIGINAL))
    assert (config.broker.concurrency, config.sftp.parallel_uploads, config.sftp.transport) == (32, 8, "paramiko")


def test_load_config_concurrency_and_transport_set(tmp_path):
    text = ORIGINAL.replace(API_KEY_LINE, f'{API_KEY_LINE}\nCONCURRENCY = 4').replace(
        'FOLDERNAME = "rki"', 'FOLDERNAME = "rki"\nPARALLEL_UPLOADS = 1\nTRANSPORT = "openssh"')
    config = load_config(write(tmp_path, text))
    assert (config.broker.concurrency, config.sftp.parallel_uploads, config.sftp.transport) == (4, 1, "openssh")


def test_load_config_keepalive_defaults_to_30_seconds_and_0_turns_it_off(tmp_path):
    assert load_config(write(tmp_path, ORIGINAL)).sftp.keepalive == 30
    for given, expected in (("0", 0), ("45", 45), ('"15"', 15)):
        text = ORIGINAL.replace('FOLDERNAME = "rki"', f'FOLDERNAME = "rki"\nKEEPALIVE = {given}')
        assert load_config(write(tmp_path, text)).sftp.keepalive == expected
    text = ORIGINAL.replace('FOLDERNAME = "rki"', 'FOLDERNAME = "rki"\nKEEPALIVE = 2.5')
    assert problems_of(write(tmp_path, text)) == ["SFTP.KEEPALIVE: expected a whole number, got a number"]


def test_load_config_concurrency_and_transport_problems_all_reported(tmp_path):
    text = ORIGINAL.replace(API_KEY_LINE, f'{API_KEY_LINE}\nCONCURRENCY = 0').replace(
        'FOLDERNAME = "rki"', 'FOLDERNAME = "rki"\nPARALLEL_UPLOADS = 10\nTRANSPORT = "scp"')
    assert problems_of(write(tmp_path, text)) == [
        "BROKER.CONCURRENCY: must be between 1 and 64, got 0",
        "SFTP.PARALLEL_UPLOADS: must be between 1 and 9, got 10",
        "SFTP.TRANSPORT: expected one of 'paramiko', 'openssh', got 'scp'",
    ]


def with_number(section: str, key: str, value: float) -> str:
    """ORIGINAL with ``section.key = value`` (replacing the key if ORIGINAL sets it)."""
    lines = [line for line in ORIGINAL.splitlines() if not line.startswith(f"{key} = ")]
    at = lines.index(f"[{section}]") + 1
    return "\n".join([*lines[:at], f"{key} = {value:g}", *lines[at:]]) + "\n"


@pytest.mark.parametrize("spec", NUMBER_KEYS, ids=lambda spec: spec.name)
def test_every_number_key_defaults_and_limits_come_from_its_spec(tmp_path, spec):
    """The spec is the one place: writing its default changes nothing, its limits are accepted, and one
    step beyond either is refused naming the key."""
    if spec.default is not None:
        assert spec.minimum <= spec.default <= (spec.maximum if spec.maximum is not None else spec.default)
        assert (load_config(write(tmp_path, with_number(spec.section, spec.key, spec.default)))
                == load_config(write(tmp_path, ORIGINAL)))
    for accepted in (spec.minimum, spec.maximum):
        if accepted is not None:
            load_config(write(tmp_path, with_number(spec.section, spec.key, accepted)))
    below = problems_of(write(tmp_path, with_number(spec.section, spec.key, spec.minimum - 1)))
    assert [problem.split(":")[0] for problem in below] == [spec.name]
    if spec.maximum is not None:
        above = problems_of(write(tmp_path, with_number(spec.section, spec.key, spec.maximum + 1)))
        assert above == [f"{spec.name}: must be between {spec.minimum:g} and {spec.maximum:g}, "
                         f"got {spec.maximum + 1:g}"]


def test_required_number_without_a_default_is_reported_missing(tmp_path):
    text = "\n".join(line for line in ORIGINAL.splitlines() if not line.startswith("TIMEOUT = "))
    assert problems_of(write(tmp_path, text)) == [f"{SFTP_TIMEOUT.name}: missing"]


def test_run_deadline_is_the_run_timeout_from_now(tmp_path):
    config = load_config(write(tmp_path, ORIGINAL))
    before = time.monotonic()
    deadline = config.run_deadline()
    after = time.monotonic()
    assert before + config.run_timeout <= deadline <= after + config.run_timeout
