"""Shell completion for bash, zsh and fish, as the README tells users to set it up: the installed console
script prints each shell's script, and the shells complete commands and options with it."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from test_resources.availability import missing_program

PROGRAM = "broker-sftp-uploader"
VARIABLE = "_BROKER_SFTP_UPLOADER_COMPLETE"
# What identifies each shell's script: bash and zsh register a function, fish a `complete` rule.
MARKERS = {
    "bash": "complete -o nosort -F _broker_sftp_uploader_completion broker-sftp-uploader",
    "zsh": "compdef _broker_sftp_uploader_completion broker-sftp-uploader",
    "fish": "complete --no-files --command broker-sftp-uploader",
}


def console_script() -> str:
    program = shutil.which(PROGRAM)
    assert program, f"the console script {PROGRAM} must be on PATH (the project's .venv/bin)"
    return program


def in_shell(shell: str, script: str, tmp_path) -> str:
    """Run ``script`` in ``shell`` (a missing shell skips the test, or fails it under CI=true); return its
    stdout."""
    if shutil.which(shell) is None:
        missing_program(shell, f"{shell} is not installed (Debian: apt-get install {shell})")
    command = [shell, "-f", "-c", script] if shell == "zsh" else [shell, "-c", script]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_console_script_prints_the_completion_script(shell, tmp_path):
    result = subprocess.run([console_script()], env={**os.environ, VARIABLE: f"{shell}_source"},
                            cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert MARKERS[shell] in result.stdout
    assert f"{VARIABLE}={shell}_complete" in result.stdout


@pytest.mark.parametrize(("words", "expected"), [
    ("broker-sftp-uploader fing", ["fingerprint"]),
    ("broker-sftp-uploader decrypt --output", ["--output", "--output-dir"]),
])
def test_bash_completes_commands_and_options(words, expected, tmp_path):
    """What the README's `eval "$(_BROKER_SFTP_UPLOADER_COMPLETE=bash_source broker-sftp-uploader)"` sets up."""
    script = (f'eval "$({VARIABLE}=bash_source {PROGRAM})"; '
              f"COMP_WORDS=({words}); COMP_CWORD={len(words.split()) - 1}; "
              f"_broker_sftp_uploader_completion {PROGRAM}; printf '%s\\n' \"${{COMPREPLY[@]}}\"")
    assert in_shell("bash", script, tmp_path).split() == expected


def test_fish_completes_commands_and_options(tmp_path):
    script = (f"{VARIABLE}=fish_source {PROGRAM} | source; "
              f'complete -C "{PROGRAM} fing"; complete -C "{PROGRAM} decrypt --output"')
    names = [line.split("\t")[0] for line in in_shell("fish", script, tmp_path).splitlines()]
    assert names == ["fingerprint", "--output", "--output-dir"]


def test_zsh_registers_the_completion_and_it_answers(tmp_path):
    script = (f'autoload -Uz compinit && compinit -u -D && eval "$({VARIABLE}=zsh_source {PROGRAM})" && '
              f"print -r -- ${{_comps[{PROGRAM}]}}")
    assert in_shell("zsh", script, tmp_path).strip() == "_broker_sftp_uploader_completion"
    # and the program answers the zsh function's question (type, value, help per candidate)
    result = subprocess.run([console_script()], capture_output=True, text=True, timeout=60, check=False,
                            env={**os.environ, VARIABLE: "zsh_complete", "COMP_WORDS": f"{PROGRAM} fing",
                                 "COMP_CWORD": "1"}, cwd=tmp_path)
    assert result.stdout.splitlines()[:2] == ["plain", "fingerprint"]
