"""Import rules of the package, as the README's layout section states them.

Each part may import only the parts listed for it (and itself); only cli.py knows click; nothing but
``__main__`` imports the CLI. A module's part is its subpackage, or its own name at the top level.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "broker_sftp_uploader"
NAME = "broker_sftp_uploader"

# part -> the parts it may import, lowest layer first. Adapters (state, crypto, broker, sftp) never import
# each other but state; the engine sits on the adapters; the commands on the engine; the CLI on the commands.
ALLOWED = {
    "errors": set(),
    "interrupts": set(),
    "concurrency": set(),
    "config": {"errors"},
    "safe_xml": set(),
    "state": {"errors", "config", "safe_xml"},
    "crypto": {"errors", "config", "state"},
    "broker": {"errors", "config", "interrupts", "safe_xml", "concurrency"},
    "sftp": {"errors", "config", "interrupts", "state", "concurrency"},
    "engine": {"errors", "config", "interrupts", "state", "crypto", "broker", "sftp", "concurrency"},
    "commands": {"errors", "config", "interrupts", "state", "crypto", "broker", "sftp", "engine",
                 "concurrency"},
    "cli": {"errors", "config", "interrupts", "engine", "commands"},
    "__main__": {"cli"},
    "__init__": set(),
}


def part_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def imported_names(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute, at any depth (lazy imports inside functions count)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: use absolute imports"
            names.add(node.module or "")
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def package_parts_imported(path: Path) -> set[str]:
    parts = set()
    for name in imported_names(path):
        if name.startswith(NAME + ".") and name != f"{NAME}.__version__":  # the version: anyone may
            parts.add(name.split(".")[1])
    return parts


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_belongs_to_a_known_part():
    assert {part_of(path) for path in modules()} <= set(ALLOWED)


def test_each_part_imports_only_the_parts_below_it():
    wrong = []
    for path in modules():
        part = part_of(path)
        extra = package_parts_imported(path) - ALLOWED[part] - {part}
        if extra:
            wrong.append(f"{path.relative_to(PACKAGE)} imports {sorted(extra)}")
    assert not wrong, "\n".join(wrong)


def test_only_cli_imports_click():
    users = [path.name for path in modules() if any(name.split(".")[0] == "click" for name in imported_names(path))]
    assert users == ["cli.py"]


def test_nothing_imports_cli_but_the_entry_point():
    users = [path.name for path in modules() if f"{NAME}.cli" in imported_names(path)]
    assert users == ["__main__.py"]


def test_the_rules_catch_a_wrong_import(tmp_path):
    """The check itself: an adapter importing another adapter is reported."""
    probe = tmp_path / "probe.py"
    probe.write_text("from broker_sftp_uploader.sftp.session import SftpSession\n"
                     "def later():\n    import broker_sftp_uploader.engine.plan\n")
    assert package_parts_imported(probe) - ALLOWED["broker"] - {"broker"} == {"sftp", "engine"}
