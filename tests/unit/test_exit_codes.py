"""The exit codes are written once, in errors.EXIT_CODES: every code the package defines is in it, every
error type exits with one of them, and each command's --help is generated from it and lists exactly
that command's share of the codes."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from broker_sftp_uploader import errors
from broker_sftp_uploader.cli import cli
from broker_sftp_uploader.commands.check import STEPS
from broker_sftp_uploader.errors import EXIT_CODES, UploaderError

# What each command can end with: the specification this test holds the help texts to.
EXPECTED = {
    "sync": [0, 1, 2, 3, 4, 10, 11, 12, 13, 14, 15, 130],
    "check": [0, 1, 2, 10, 12, 13, 14, 15, 130],
    "status": [0, 1, 2, 10, 12, 13, 14, 15, 17, 130],
    "keygen": [0, 1, 2, 12],
    "fingerprint": [0, 1, 2, 12],
    "decrypt": [0, 1, 2, 12, 16, 130],
}
CODE_LINE = re.compile(r"^ +(\d+)  (\S.*)$")


def help_of(command: str) -> str:
    result = CliRunner().invoke(cli, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


def listed_codes(help_text: str) -> dict[int, str]:
    """The "Exit codes" part of a help text: code -> its meaning, continuation lines joined."""
    lines = help_text.splitlines()
    start = next(index for index, line in enumerate(lines) if line.strip().startswith("Exit codes"))
    listed: dict[int, str] = {}
    code = None
    for line in lines[start + 1:]:
        match = CODE_LINE.match(line)
        if match:
            code = int(match.group(1))
            listed[code] = match.group(2)
        elif code is not None and line.startswith(" " * 8) and line.strip():
            listed[code] += " " + line.strip()
        else:
            code = None
    return listed


def test_every_exit_constant_is_in_the_table_and_nothing_else():
    constants = {value for name, value in vars(errors).items() if re.fullmatch(r"EXIT_[A-Z_]+", name)
                 and isinstance(value, int)}
    assert constants == set(EXIT_CODES)
    assert all(code == exit_code.code for code, exit_code in EXIT_CODES.items())
    assert list(EXIT_CODES) == sorted(EXIT_CODES)


def test_every_error_type_exits_with_a_code_of_the_table():
    def subclasses(kind):
        for child in kind.__subclasses__():
            yield child
            yield from subclasses(child)

    for kind in [UploaderError, *subclasses(UploaderError)]:
        assert kind.exit_code in EXIT_CODES, kind.__name__


def test_every_command_has_an_expectation():
    assert set(EXPECTED) == set(cli.commands)


@pytest.mark.parametrize("command", sorted(EXPECTED))
def test_help_lists_exactly_the_commands_codes_in_the_tables_order(command):
    listed = listed_codes(help_of(command))
    assert list(listed) == EXPECTED[command]


def test_a_change_in_the_table_reaches_the_help(monkeypatch):
    """The help is generated from the table: a meaning changed there shows in every command that uses it."""
    from broker_sftp_uploader import cli as cli_module

    changed = dict(EXIT_CODES)
    changed[errors.EXIT_LOCKED] = errors.ExitCode(errors.EXIT_LOCKED, "locked", "a wording for the test")
    monkeypatch.setattr(cli_module, "EXIT_CODES", changed)
    assert "  11  a wording for the test\n" in cli_module._exit_codes_help("sync")


def test_sync_help_shows_the_general_meanings():
    listed = listed_codes(help_of("sync"))
    for code in (0, 1, 2, 3, 4, 10, 11, 13, 14, 15):
        assert listed[code] == EXIT_CODES[code].meaning


def test_check_help_lists_every_step_in_order():
    text = " ".join(help_of("check").split())
    steps = text.split("Steps, one line each", 1)[1].split("Exit codes", 1)[0]
    positions = [steps.find(name) for name in STEPS]
    assert -1 not in positions, steps
    assert positions == sorted(positions)


def test_the_help_of_every_other_command_does_not_import_paramiko():
    """check's step list lives beside paramiko; only check's own --help may load it."""
    import subprocess
    import sys

    probe = ("import sys; from click.testing import CliRunner; from broker_sftp_uploader.cli import cli; "
             "[CliRunner().invoke(cli, [name, '--help']) for name in "
             "('sync', 'status', 'keygen', 'fingerprint', 'decrypt')]; "
             "CliRunner().invoke(cli, ['--help']); print('paramiko' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            check=True)
    assert result.stdout.strip() == "False"
