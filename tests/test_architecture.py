"""The dependency rule of the layout: contracts imports nothing of ours; coordinator and
module_sdk import contracts and never each other (the command line, the distribution's
composition root, is the one place that starts reference modules next to the
coordinator)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = {"contracts", "coordinator", "module_sdk"}
COMPOSITION_ROOT = {"coordinator/cli.py", "coordinator/demo.py"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & OURS


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize(
    ("package", "allowed"),
    [
        ("contracts", {"contracts"}),
        ("coordinator", {"contracts", "coordinator"}),
        ("module_sdk", {"contracts", "module_sdk"}),
    ],
)
def test_packages_import_only_what_the_layout_allows(package: str, allowed: set[str]) -> None:
    """No file reaches into a package it must not know about."""
    offenders = {}
    for path in _files(package):
        relative = path.relative_to(ROOT).as_posix()
        extra = _imports(path) - allowed
        if relative in COMPOSITION_ROOT:
            extra -= {"module_sdk"}
        if extra:
            offenders[relative] = sorted(extra)
    assert offenders == {}
    assert _files(package), f"{package} has no modules"
