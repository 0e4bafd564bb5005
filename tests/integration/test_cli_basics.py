"""The command line as a user meets it first: help, version, entry points."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from broker_sftp_uploader import __version__
from broker_sftp_uploader.cli import cli


def test_python_dash_m_entry_point_shows_help():
    result = subprocess.run([sys.executable, "-m", "broker_sftp_uploader", "--help"],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in cli.commands:
        assert command in result.stdout


def test_console_script_is_installed():
    result = subprocess.run(["broker-sftp-uploader", "--version"], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.strip() == f"broker-sftp-uploader, version {__version__}"


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_every_command_has_help_with_an_example(command):
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0
    assert len(result.output.splitlines()) > 3
    assert "Usage:" in result.output
    assert "Example" in result.output, f"{command} --help shows no example"


def test_command_list_is_not_cut_off():
    output = CliRunner().invoke(cli, ["--help"]).output
    listing = output.split("Commands:", 1)[1]
    assert "..." not in listing, listing
    assert set(cli.commands) <= {line.split()[0] for line in listing.splitlines() if line.strip()}


def test_sync_help_documents_every_exit_code():
    output = CliRunner().invoke(cli, ["sync", "--help"]).output
    for line in ("0  success", "1  unexpected", "2  usage", "3  partial", "4  deletions refused", "10  config invalid",
                 "11  another run holds the lock", "12  key", "13  broker", "14  SFTP", "15  ledger",
                 "130  interrupted"):
        assert line in output


def test_unknown_option_is_a_usage_error():
    result = CliRunner().invoke(cli, ["sync", "--frobnicate"])
    assert result.exit_code == 2
