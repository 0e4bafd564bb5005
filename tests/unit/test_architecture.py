"""Import rules of the package: only cli.py knows click; the adapters never import each other."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "broker_sftp_uploader"
ADAPTERS = {"broker", "ledger", "lock", "crypto", "sftp"}


def imported_modules(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            prefix = "broker_sftp_uploader." if node.level else ""
            names.add(prefix + (node.module or ""))
    return names


def modules() -> list[str]:
    return sorted(path.stem for path in PACKAGE.glob("*.py"))


def test_only_cli_imports_click():
    users = [module for module in modules() if any(name.split(".")[0] == "click" for name in imported_modules(module))]
    assert users == ["cli"]


def test_nothing_imports_cli_but_the_entry_point():
    users = [module for module in modules() if "broker_sftp_uploader.cli" in imported_modules(module)]
    assert users == ["__main__"]


def test_adapters_do_not_import_each_other():
    for module in ADAPTERS:
        imported = {name.rsplit(".", 1)[-1] for name in imported_modules(module)
                    if name.startswith("broker_sftp_uploader.")}
        assert not imported & (ADAPTERS - {module}), module


def test_leaf_modules_import_nothing_from_the_package():
    for module in ("errors", "interrupts"):
        assert not [name for name in imported_modules(module) if name.startswith("broker_sftp_uploader")], module
