"""The README's "What we guarantee" table names the tests that prove each promise: each must exist."""

import re
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def guarantee_rows() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## What we guarantee", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| promise")]


def defined_tests() -> set[str]:
    names = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        names.update(re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), re.M))
    return names


def test_every_test_the_guarantees_name_exists():
    existing, files = defined_tests(), {path.name for path in (ROOT / "tests").rglob("test_*.py")}
    rows = guarantee_rows()
    assert len(rows) >= 10
    missing = []
    for row in rows:
        proof = row.rstrip(" |").rsplit(" | ", 1)[1]
        for name in re.findall(r"`([^`]+)`", proof):
            if name.endswith(".py") and name.startswith("test_"):
                found = name in files
            elif name.startswith("test_"):
                found = any(fnmatch(test, name) for test in existing)
            elif "/" in name:
                found = (ROOT / name).exists()
            else:
                continue  # words in backticks, such as `kill -9`

            if not found:
                missing.append(name)
    assert not missing, f"README's guarantees name tests that do not exist: {missing}"
