"""Unit tests for the config's secrets (inline, from a ``…_FILE``, from the environment) and key login."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from broker_sftp_uploader.config import load_config
from broker_sftp_uploader.errors import ConfigError
from test_resources.broker_actors import ADMIN_KEY as API_KEY
PASSWORD = "sftp-pass-word"
PASSPHRASE = "key-pass-phrase"

# The original config without its two inline secrets; each test adds the sources it needs.
BASE = """\
[BROKER]
URL = "http://localhost:8080"
{broker}
[REQUESTS]
TAG = "rki"

[SFTP]
HOST = "127.0.0.1"
USERNAME = "sftpuser"
TIMEOUT = "25"
FOLDERNAME = "rki"
{sftp}
[SECURITY]
PATH_ENCRYPTION_KEY = "rki.key"

[MISC]
WORKING_DIR = "work"
"""

CONTROL_CHARACTER = "holds a line break or another control character; put the secret alone on one line"
ENV_API_KEY = "BROKER_SFTP_UPLOADER_API_KEY"
ENV_PASSWORD = "BROKER_SFTP_UPLOADER_SFTP_PASSWORD"
ENV_PASSPHRASE = "BROKER_SFTP_UPLOADER_SFTP_PRIVATE_KEY_PASSPHRASE"


def write(tmp_path: Path, broker: str = f'API_KEY = "{API_KEY}"', sftp: str = f'PASSWORD = "{PASSWORD}"',
          mode: int = 0o600) -> Path:
    (tmp_path / "work").mkdir(exist_ok=True)
    path = tmp_path / "settings.toml"
    path.write_text(BASE.format(broker=broker + "\n", sftp=sftp + "\n"))
    path.chmod(mode)
    return path


def secret_file(tmp_path: Path, name: str, content: bytes, mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    path.chmod(mode)
    return path


def problems_of(path: Path, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={} if environ is None else environ)
    assert caught.value.exit_code == 10
    return caught.value.problems


def assert_no_secret(text: str) -> None:
    for secret in (API_KEY, PASSWORD, PASSPHRASE, "hunter2-secret"):
        assert secret not in text


# --- sources -------------------------------------------------------------------------------------------


def test_inline_secrets_load_and_are_listed_for_redaction(tmp_path):
    config = load_config(write(tmp_path), environ={})
    assert (config.broker.api_key, config.sftp.password) == (API_KEY, PASSWORD)
    assert set(config.secrets()) == {API_KEY, PASSWORD}


def test_secrets_from_files_lose_one_trailing_newline_only(tmp_path):
    secret_file(tmp_path, "api.key", f"{API_KEY}\n".encode())
    path = write(tmp_path, broker='API_KEY_FILE = "api.key"', sftp='PASSWORD_FILE = "work/pw"')
    secret_file(tmp_path / "work", "pw", f"{PASSWORD}\r\n".encode())
    config = load_config(path, environ={})
    assert (config.broker.api_key, config.sftp.password) == (API_KEY, PASSWORD)
    assert set(config.secrets()) == {API_KEY, PASSWORD}


def test_secret_file_without_trailing_newline(tmp_path):
    secret_file(tmp_path, "api.key", API_KEY.encode())
    config = load_config(write(tmp_path, broker=f'API_KEY_FILE = "{tmp_path / "api.key"}"'), environ={})
    assert config.broker.api_key == API_KEY


def test_secrets_from_environment(tmp_path):
    path = write(tmp_path, broker="", sftp="")
    config = load_config(path, environ={ENV_API_KEY: API_KEY, ENV_PASSWORD: PASSWORD})
    assert (config.broker.api_key, config.sftp.password) == (API_KEY, PASSWORD)


def test_environment_defaults_to_os_environ(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_API_KEY, API_KEY)
    monkeypatch.setenv(ENV_PASSWORD, PASSWORD)
    assert load_config(write(tmp_path, broker="", sftp="")).broker.api_key == API_KEY


def test_injected_environment_replaces_os_environ(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_API_KEY, "from-os-environ")
    assert load_config(write(tmp_path), environ={}).broker.api_key == API_KEY


def test_missing_secret_names_every_source(tmp_path):
    problems = problems_of(write(tmp_path, broker=""))
    assert problems == [(f"BROKER.API_KEY: missing; set it, BROKER.API_KEY_FILE or the environment variable "
                        f"{ENV_API_KEY}")]


@pytest.mark.parametrize("broker, environ, named", [
    (f'API_KEY = "{API_KEY}"\nAPI_KEY_FILE = "api.key"', {}, "BROKER.API_KEY and BROKER.API_KEY_FILE"),
    (f'API_KEY = "{API_KEY}"', {ENV_API_KEY: API_KEY},
     f"BROKER.API_KEY and the environment variable {ENV_API_KEY}"),
    ('API_KEY_FILE = "api.key"', {ENV_API_KEY: API_KEY},
     f"BROKER.API_KEY_FILE and the environment variable {ENV_API_KEY}"),
])
def test_two_sources_for_one_secret_is_an_error_naming_both(tmp_path, broker, environ, named):
    secret_file(tmp_path, "api.key", f"{API_KEY}\n".encode())
    problems = problems_of(write(tmp_path, broker=broker), environ)
    assert problems == [f"BROKER.API_KEY: given twice, by {named}; keep exactly one"]


def test_three_sources_for_one_secret(tmp_path):
    secret_file(tmp_path, "pw", b"x\n")
    path = write(tmp_path, sftp=f'PASSWORD = "{PASSWORD}"\nPASSWORD_FILE = "pw"')
    problems = problems_of(path, {ENV_PASSWORD: PASSWORD})
    assert problems == [(f"SFTP.PASSWORD: given 3 times, by SFTP.PASSWORD, SFTP.PASSWORD_FILE and the "
                        f"environment variable {ENV_PASSWORD}; keep exactly one")]


# --- bad secret files and values ------------------------------------------------------------------------


@pytest.mark.parametrize("content, problem", [
    (b"", "is empty"),
    (b"\n", "is empty"),
    (b"\r\n", "is empty"),
    (b"hunter2-secret\n\n", CONTROL_CHARACTER),
    (b"hunter2\nsecret\n", CONTROL_CHARACTER),
    (b"hunter2-secret\xff\n", "is not UTF-8 text"),
    (b"hunter2-secret" * 5000, "is larger than 64 KiB; it must hold the secret only"),
])
def test_bad_secret_file_content(tmp_path, content, problem):
    file = secret_file(tmp_path, "pw", content)
    problems = problems_of(write(tmp_path, sftp='PASSWORD_FILE = "pw"'))
    assert problems == [f"SFTP.PASSWORD_FILE: file {file} {problem}"]
    assert_no_secret(str(problems))


def test_secret_file_missing_or_a_directory(tmp_path):
    (tmp_path / "folder").mkdir()
    path = write(tmp_path, broker='API_KEY_FILE = "absent"', sftp='PASSWORD_FILE = "folder"')
    assert problems_of(path) == [
        f"BROKER.API_KEY_FILE: file {tmp_path / 'absent'} does not exist",
        f"SFTP.PASSWORD_FILE: file {tmp_path / 'folder'} is not a regular file",
    ]


def test_secret_file_fifo_does_not_hang(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    path = write(tmp_path, sftp='PASSWORD_FILE = "pipe"')
    assert problems_of(path) == [f"SFTP.PASSWORD_FILE: file {tmp_path / 'pipe'} is not a regular file"]


def test_empty_environment_variable_is_an_error(tmp_path):
    problems = problems_of(write(tmp_path, broker=""), {ENV_API_KEY: ""})
    assert problems == [f"BROKER.API_KEY: the environment variable {ENV_API_KEY} is empty"]


@pytest.mark.parametrize("value", [" hunter2-secret", "hunter2-secret ", "hunter2\tsecret"])
def test_api_key_with_surrounding_space_or_control_character(tmp_path, value):
    problems = problems_of(write(tmp_path, broker=""), {ENV_API_KEY: value})
    assert len(problems) == 1
    assert problems[0].startswith(f"BROKER.API_KEY: the environment variable {ENV_API_KEY} ")
    assert_no_secret(str(problems))


def test_password_may_hold_spaces_but_no_control_characters(tmp_path):
    config = load_config(write(tmp_path, sftp='PASSWORD = " with spaces "'), environ={})
    assert config.sftp.password == " with spaces "
    problems = problems_of(write(tmp_path, sftp=""), {ENV_PASSWORD: "hunter2\x00secret"})
    assert problems == [f"SFTP.PASSWORD: the environment variable {ENV_PASSWORD} {CONTROL_CHARACTER}"]


def test_inline_secret_of_wrong_type_is_not_echoed(tmp_path):
    problems = problems_of(write(tmp_path, sftp="PASSWORD = 123456789"))
    assert problems == ["SFTP.PASSWORD: expected a string, got an integer"]


# --- private key login ----------------------------------------------------------------------------------


def test_private_key_makes_the_password_optional(tmp_path):
    path = write(tmp_path, sftp=f'PRIVATE_KEY = "id_ed25519"\nPRIVATE_KEY_PASSPHRASE = "{PASSPHRASE}"')
    config = load_config(path, environ={})
    assert config.sftp.private_key == (tmp_path / "id_ed25519").resolve()
    assert config.sftp.password is None
    assert config.sftp.private_key_passphrase == PASSPHRASE
    assert set(config.secrets()) == {API_KEY, PASSPHRASE}
    assert PASSPHRASE not in repr(config)


def test_private_key_and_password_together(tmp_path):
    path = write(tmp_path, sftp=f'PASSWORD = "{PASSWORD}"\nPRIVATE_KEY = "/etc/aktin/id_rsa"')
    config = load_config(path, environ={})
    assert (config.sftp.password, config.sftp.private_key) == (PASSWORD, Path("/etc/aktin/id_rsa"))


def test_private_key_passphrase_from_file_and_environment(tmp_path):
    secret_file(tmp_path, "phrase", f"{PASSPHRASE}\n".encode())
    path = write(tmp_path, sftp='PRIVATE_KEY = "id"\nPRIVATE_KEY_PASSPHRASE_FILE = "phrase"')
    assert load_config(path, environ={}).sftp.private_key_passphrase == PASSPHRASE
    path = write(tmp_path, sftp='PRIVATE_KEY = "id"')
    assert load_config(path, environ={ENV_PASSPHRASE: PASSPHRASE}).sftp.private_key_passphrase == PASSPHRASE


def test_neither_password_nor_private_key(tmp_path):
    problems = problems_of(write(tmp_path, sftp=""))
    assert problems == [("SFTP.PASSWORD: missing; SFTP needs a password (SFTP.PASSWORD, SFTP.PASSWORD_FILE or "
                        f"the environment variable {ENV_PASSWORD}) or a key (SFTP.PRIVATE_KEY), or both")]


def test_passphrase_without_private_key(tmp_path):
    problems = problems_of(write(tmp_path, sftp=f'PASSWORD = "{PASSWORD}"'), {ENV_PASSPHRASE: PASSPHRASE})
    assert problems == ["SFTP.PRIVATE_KEY_PASSPHRASE: given without SFTP.PRIVATE_KEY"]


# --- warnings about readable secrets (defect 10) ---------------------------------------------------------


def test_readable_config_with_inline_secrets_warns(tmp_path, caplog):
    path = write(tmp_path, mode=0o644)
    with caplog.at_level(logging.WARNING):
        load_config(path, environ={})
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        f"config file {path} holds secrets (BROKER.API_KEY, SFTP.PASSWORD) and is accessible by group or "
        f"others (mode 644); run: chmod 600 {path}, or move them to BROKER.API_KEY_FILE, SFTP.PASSWORD_FILE "
        "or environment variables")
    assert_no_secret(caplog.text)


def test_readable_config_with_smtp_password_warns(tmp_path, caplog):
    path = write(tmp_path, broker="", sftp="", mode=0o640)
    path.write_text(path.read_text() + '\n[SMTP]\nPASSWORD = "hunter2-secret"\n')
    with caplog.at_level(logging.WARNING):
        load_config(path, environ={ENV_API_KEY: API_KEY, ENV_PASSWORD: PASSWORD})
    [record] = caplog.records
    assert "holds secrets (SMTP.PASSWORD)" in record.getMessage()
    assert "(mode 640)" in record.getMessage()


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_private_config_does_not_warn(tmp_path, caplog, mode):
    with caplog.at_level(logging.WARNING):
        load_config(write(tmp_path, mode=mode), environ={})
    assert caplog.records == []


def test_readable_config_without_inline_secrets_does_not_warn(tmp_path, caplog):
    secret_file(tmp_path, "api.key", f"{API_KEY}\n".encode())
    path = write(tmp_path, broker='API_KEY_FILE = "api.key"', sftp="", mode=0o644)
    with caplog.at_level(logging.WARNING):
        load_config(path, environ={ENV_PASSWORD: PASSWORD})
    assert caplog.records == []


def test_readable_secret_file_warns(tmp_path, caplog):
    file = secret_file(tmp_path, "phrase", f"{PASSPHRASE}\n".encode(), mode=0o644)
    path = write(tmp_path, sftp='PRIVATE_KEY = "id"\nPRIVATE_KEY_PASSPHRASE_FILE = "phrase"')
    with caplog.at_level(logging.WARNING):
        load_config(path, environ={})
    [record] = caplog.records
    assert record.getMessage() == (f"secret file {file} (SFTP.PRIVATE_KEY_PASSPHRASE_FILE) is accessible by "
                                   f"group or others (mode 644); run: chmod 600 {file}")
    assert_no_secret(caplog.text)


def test_systemd_credential_secret_file_does_not_warn(tmp_path, caplog, monkeypatch):
    from tests.unit.test_crypto import _grant_read_by_acl

    credentials = tmp_path / "credentials"
    credentials.mkdir()
    api_key = secret_file(credentials, "api-key", f"{API_KEY}\n".encode())
    _grant_read_by_acl(api_key, 65534)  # what systemd's LoadCredential= does: mode shows as 0440
    assert api_key.stat().st_mode & 0o777 == 0o440
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    with caplog.at_level(logging.WARNING):
        config = load_config(write(tmp_path, broker=f'API_KEY_FILE = "{api_key}"'))
    assert config.broker.api_key == API_KEY
    assert [record for record in caplog.records if record.levelno >= logging.WARNING] == []
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "elsewhere"))  # then judged by its mode
    with caplog.at_level(logging.WARNING):
        load_config(write(tmp_path, broker=f'API_KEY_FILE = "{api_key}"'))
    assert any("accessible by group or others" in record.getMessage() for record in caplog.records)
