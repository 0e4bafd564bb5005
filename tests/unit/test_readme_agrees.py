"""The README states facts the code holds once: its exit-code tables agree with errors.EXIT_CODES, its
config table with config.py's defaults and ranges, its check section with check's steps and codes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from broker_sftp_uploader import config
from broker_sftp_uploader.cli import COMMAND_EXIT_CODES
from broker_sftp_uploader.commands.check import STEPS
from broker_sftp_uploader.errors import EXIT_CODES, EXIT_OK, EXIT_UNEXPECTED, EXIT_INTERRUPTED, EXIT_USAGE

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def section(heading: str) -> str:
    """The README's text from the line ``heading`` to the next heading of any level."""
    start = README.index(f"\n{heading}\n") + len(heading) + 2
    end = README.find("\n#", start)
    return README[start:] if end < 0 else README[start:end]


def table_after(text: str) -> list[list[str]]:
    """The rows (cells stripped) of the first Markdown table in ``text``, without header and rule."""
    lines = text.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return table


def test_exit_code_table_lists_every_code_with_its_meaning():
    rows = table_after(section("### Exit codes"))
    assert [int(code) for code, _ in rows] == list(EXIT_CODES)
    for code, meaning in rows:
        assert EXIT_CODES[int(code)].summary.lower() in meaning.lower(), (code, meaning)


def test_troubleshooting_table_lists_every_failure_with_its_meaning():
    text = README.split("**Troubleshooting**", 1)[1]
    rows = table_after(text)
    assert [int(row[0]) for row in rows] == [code for code in EXIT_CODES if code != EXIT_OK]
    for code, what_happened, _ in rows:
        assert EXIT_CODES[int(code)].summary.lower() in what_happened.lower(), (code, what_happened)


def test_check_section_names_every_step_in_order():
    text = " ".join(section("### Checking the set-up: `check`").split())
    positions = [text.find(f"`{name}`") for name in STEPS]
    assert -1 not in positions, [name for name, at in zip(STEPS, positions) if at < 0]
    assert positions == sorted(positions)


@pytest.mark.parametrize(("command", "heading"), [("check", "### Checking the set-up: `check`"),
                                                  ("status", "### Reading the state: `status`")])
def test_command_sections_name_the_codes_of_failures(command, heading):
    """"… 10, 12, 13, 14 or 15": the codes of a failure, beside success, usage, bugs and interrupts."""
    text = " ".join(section(heading).split())
    failures = [code for code in COMMAND_EXIT_CODES[command]
                if code not in (EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_INTERRUPTED)]
    stated = ", ".join(map(str, failures[:-1])) + f" or {failures[-1]}"
    assert stated in text


def config_rows() -> dict[str, str]:
    """The config table: "SECTION.KEY" -> its meaning."""
    rows = table_after(section("## Configuration"))
    return {f"{row[0]}.{row[1]}": row[3] for row in rows}


@pytest.mark.parametrize("spec", config.NUMBER_KEYS, ids=lambda spec: spec.name)
def test_config_table_states_each_numbers_default_and_range(spec):
    meaning = config_rows()[spec.name]
    if spec.default is not None:
        assert f"default {spec.default:g}" in meaning, meaning
    elif not spec.required:
        assert "default no limit" in meaning, meaning
    if spec.maximum is None:
        assert f"(≥ {spec.minimum:g})" in meaning, meaning
    else:
        assert re.search(rf"\({spec.minimum:g}–{spec.maximum:g}\b", meaning), meaning


def test_config_table_states_the_other_defaults():
    rows = config_rows()
    assert f'`"{config.DEFAULT_TRANSPORT}"` (default' in rows["SFTP.TRANSPORT"]
    assert f"default `{str(config.DEFAULT_UPLOAD_LEDGER).lower()}`" in rows["SFTP.UPLOAD_LEDGER"]


def test_config_table_lists_every_key_the_tool_knows():
    rows = config_rows()
    documented = set(rows)
    documented.discard("SMTP.HOST, USERNAME, PASSWORD")
    documented |= {"SMTP.HOST", "SMTP.USERNAME", "SMTP.PASSWORD"}
    known = {f"{section}.{key}" for section, keys in config._KNOWN_KEYS.items() if section for key in keys}
    known |= {f"(top level).{key}" for key in config._KNOWN_KEYS[None] if key not in config._KNOWN_KEYS}
    # the …_FILE variants are documented in the footnote on secrets
    missing = {name for name in known - documented if not name.endswith("_FILE")}
    assert not missing
