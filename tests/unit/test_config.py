"""Unit tests for config loading and validation."""

from pathlib import Path

import pytest

from broker_sftp_uploader.config import load_config
from broker_sftp_uploader.errors import ConfigError

ORIGINAL = """\
[BROKER]
URL = "http://localhost:8080"
API_KEY = "xxxAdmin1234"

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
    assert "xxxAdmin1234" not in repr(config)
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
    text = (ORIGINAL.replace('API_KEY = "xxxAdmin1234"\n', "")
            .replace('TIMEOUT = "25"', 'TIMEOUT = "soon"\nPORT = 70000\nPASWORD = "x"')
            .replace('TAG = "rki"', "TAG = 5"))
    problems = problems_of(write(tmp_path, text))
    assert "BROKER.API_KEY: missing" in problems
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
    assert problems == ["file not found; pass --config or set BROKER_SFTP_UPLOADER_CONFIG"]


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
