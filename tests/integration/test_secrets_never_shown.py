"""No secret ever reaches the output: succeeding and failing runs, at every verbosity, with the secrets
given inline, by ``…_FILE`` keys and by environment variables.

The login is the harness's key-and-password user with an encrypted key, so the API key, the password
and the key passphrase are all in use in one run; the Fernet key is read by every run but dry ones.
Scenario x verbosity are all run; the secret source rotates over them so that every pair of scenario,
verbosity and source occurs.
"""

from __future__ import annotations

import pytest

from test_resources import broker_actors as actors
from test_resources.broker_actors import ADMIN_KEY
from tests.conftest import closed_port

SCENARIOS = ["sync ok", "wrong password", "wrong api key", "broker down", "bad key passphrase", "dry run"]
VERBOSITIES = ["", "-v", "-vv"]
SOURCES = ["inline", "file", "env"]
EXPECTED_EXIT = {"sync ok": 0, "wrong password": 14, "wrong api key": 13, "broker down": 13,
                 "bad key passphrase": 12, "dry run": 0}
VARIABLES = {"API_KEY": "BROKER_SFTP_UPLOADER_API_KEY", "PASSWORD": "BROKER_SFTP_UPLOADER_SFTP_PASSWORD",
             "PRIVATE_KEY_PASSPHRASE": "BROKER_SFTP_UPLOADER_SFTP_PRIVATE_KEY_PASSPHRASE"}
# A wrong value for each secret, as distinct as the real ones, so that a leak of it is found too.
WRONG_VALUES = {"API_KEY": "wrong-ApiKey-5b2d8e4f", "PASSWORD": "wrong-Pass-7f3c9a1e",
                "PRIVATE_KEY_PASSPHRASE": "wrong-Phrase-9c1a7d3b"}
# The secret each scenario gets wrong.
WRONG_SECRET = {"wrong password": "PASSWORD", "wrong api key": "API_KEY",
                "bad key passphrase": "PRIVATE_KEY_PASSPHRASE"}


def secret_lines(workspace, source: str, secrets: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Config lines per secret key and the environment that give ``secrets`` from ``source``."""
    lines, env = {}, {}
    for key, value in secrets.items():
        if source == "inline":
            lines[key] = f'{key} = "{value}"'
        elif source == "file":
            path = workspace.root / f"{key.lower()}.secret"
            path.write_text(value + "\n")
            path.chmod(0o600)
            lines[key] = f'{key}_FILE = "{path}"'
        else:
            lines[key], env[VARIABLES[key]] = "", value
    return lines, env


def use_every_secret(workspace, sshd, source: str,
                     wrong: str | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """Rewrite the config so that a run uses every secret: the API key, and the harness's key-and-password
    user with an encrypted key; each given from ``source`` (see `secret_lines`), the one named ``wrong``
    (API_KEY, PASSWORD or PRIVATE_KEY_PASSPHRASE) replaced by its `WRONG_VALUES` value. Returns the values
    that must never be shown (by name, the wrong one included) and the environment the run needs."""
    secrets = {"API_KEY": ADMIN_KEY, "PASSWORD": sshd.password,
               "PRIVATE_KEY_PASSPHRASE": sshd.client_key_passphrase}
    shown = dict(secrets)
    if wrong is not None:
        secrets[wrong] = shown[f"wrong {wrong}"] = WRONG_VALUES[wrong]
    lines, env = secret_lines(workspace, source, secrets)
    workspace.rewrite_config(f'API_KEY = "{ADMIN_KEY}"', lines["API_KEY"])
    workspace.rewrite_config(f'USERNAME = "{sshd.password_user}"\nPASSWORD = "{sshd.password}"',
                             f'USERNAME = "{sshd.both_user}"\n{lines["PASSWORD"]}\n'
                             f'PRIVATE_KEY = "{sshd.client_key("ecdsa", "pem", encrypted=True)}"\n'
                             f'{lines["PRIVATE_KEY_PASSPHRASE"]}')
    return shown, env


@pytest.mark.parametrize("verbosity", VERBOSITIES, ids=["quiet", "v", "vv"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_no_secret_in_any_output(broker, workspace, sshd, scenario, verbosity):
    source = SOURCES[(SCENARIOS.index(scenario) + VERBOSITIES.index(verbosity)) % len(SOURCES)]
    actors.publish_completed(broker.url)
    workspace.pin_host_key(sshd)

    shown, env = use_every_secret(workspace, sshd, source, WRONG_SECRET.get(scenario))
    if scenario == "broker down":
        workspace.rewrite_config(f'URL = "{broker.url}"', f'URL = "http://127.0.0.1:{closed_port()}"')

    options = [option for option in (verbosity, "--dry-run" if scenario == "dry run" else "") if option]
    result = workspace.run("sync", "--config", str(workspace.config_path), *options, env=env)

    assert result.returncode == EXPECTED_EXIT[scenario], result.stderr
    if scenario == "sync ok":
        assert "export_0.zip" in workspace.remote_names()
    if verbosity == "-vv" and scenario in ("sync ok", "wrong password"):
        assert "DEBUG paramiko" in result.stderr  # the most talkative output was really examined
    shown["Fernet key"] = workspace.key_path.read_text().strip()
    output = result.stdout + result.stderr
    leaked = [name for name, value in shown.items() if value in output]
    assert leaked == [], f"{leaked} shown ({source}, {scenario}, {verbosity or 'quiet'})"


def test_readable_config_with_secrets_warns_through_the_cli(workspace):
    workspace.config_path.chmod(0o644)
    result = workspace.sync("--dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stderr == (f"WARNING: config file {workspace.config_path} holds secrets (BROKER.API_KEY, "
                             "SFTP.PASSWORD) and is accessible by group or others (mode 644); run: chmod 600 "
                             f"{workspace.config_path}, or move them to BROKER.API_KEY_FILE, "
                             "SFTP.PASSWORD_FILE or environment variables\n")
    assert ADMIN_KEY not in result.stderr


def test_readable_secret_file_warns_through_the_cli(workspace):
    secret = workspace.root / "api.key"
    secret.write_text(ADMIN_KEY + "\n")
    secret.chmod(0o640)
    workspace.rewrite_config(f'API_KEY = "{ADMIN_KEY}"', f'API_KEY_FILE = "{secret}"')
    result = workspace.sync("--dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stderr == (f"WARNING: secret file {secret} (BROKER.API_KEY_FILE) is accessible by group or "
                             f"others (mode 640); run: chmod 600 {secret}\n")
