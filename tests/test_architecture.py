"""The dependency rule of the layout, read from the code: each package imports only the
layers below it, with no exceptions, and no module takes part in an import circle.

    sessionctl                       the command line, demo, ops tools (knows everything)
    reference_modules                the seed's seven modules, on the SDK
    coordinator        module_sdk    the writer; what a module imports (never each other)
    transport                        the broker port, aio-pika adapter, in-process broker
    contracts                        the wire as data: no I/O, no broker client

Inside the coordinator: domain < store < read < service, and errors below them all.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = (
    "contracts",
    "transport",
    "coordinator",
    "module_sdk",
    "reference_modules",
    "sessionctl",
)

ALLOWED: dict[str, set[str]] = {
    "contracts": set(),
    "transport": {"contracts"},
    "coordinator": {"contracts", "transport"},
    "module_sdk": {"contracts", "transport"},
    "reference_modules": {"contracts", "transport", "module_sdk"},
    "sessionctl": {"contracts", "transport", "coordinator", "module_sdk", "reference_modules"},
}

# The coordinator's own layers: what each sub-package may import of the coordinator.
COORDINATOR_ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "domain": {"errors"},
    "store": {"errors", "domain"},
    "read": {"errors", "domain", "store"},
    "service": {"errors", "domain", "store", "read"},
}

# The wire contract is data: no broker client, no database, no network, no event loop,
# no process environment (settings are read by the layers that run processes).
NOT_IN_CONTRACTS = {
    "aio_pika",
    "aiormq",
    "pamqp",
    "asyncio",
    "eventsourcing",
    "psycopg",
    "psycopg_pool",
    "sqlite3",
    "socket",
    "http",
    "urllib",
    "starlette",
    "uvicorn",
    "subprocess",
    "os",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(path: Path) -> Iterator[str]:
    """Every module a file imports, at any depth of the file (type-only imports too: a
    circle through annotations is still a circle a reader must untangle)."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import"
            yield node.module
            # ``from coordinator.domain import compact`` imports a module, not a name.
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                if _module_path(candidate) is not None:
                    yield candidate


def _module_path(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_import_only_the_layers_below_them(package: str) -> None:
    """No file reaches into a package above it or beside it; no file is excused."""
    offenders = {}
    for path in _files(package):
        ours = {name.split(".")[0] for name in _imported(path)} & set(PACKAGES)
        extra = ours - ALLOWED[package] - {package}
        if extra:
            offenders[path.relative_to(ROOT).as_posix()] = sorted(extra)
    assert offenders == {}
    assert _files(package), f"{package} has no modules"


def test_coordinator_layers_import_only_the_layers_below_them() -> None:
    offenders = {}
    for path in _files("coordinator"):
        parts = path.relative_to(ROOT / "coordinator").with_suffix("").parts
        if parts == ("__init__",):
            continue
        layer = parts[0]
        allowed = COORDINATOR_ALLOWED[layer] | {layer}
        used = {
            name.split(".")[1]
            for name in _imported(path)
            if name.startswith("coordinator.") and name.count(".") >= 1
        }
        if used - allowed:
            offenders[path.relative_to(ROOT).as_posix()] = sorted(used - allowed)
    assert offenders == {}


def test_contracts_do_no_io() -> None:
    """A module author importing a Struct imports no broker client and no database."""
    offenders = {}
    for path in _files("contracts"):
        io = {name.split(".")[0] for name in _imported(path)} & NOT_IN_CONTRACTS
        if io:
            offenders[path.relative_to(ROOT).as_posix()] = sorted(io)
    assert offenders == {}


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in _files(package):
            targets = set()
            for name in _imported(path):
                if name.split(".")[0] in PACKAGES and _module_path(name) is not None:
                    targets.add(name)
            # Importing a package's submodule runs the package's __init__ first.
            graph[_module_name(path)] = {t for t in targets if t != _module_name(path)}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for node in sorted(graph):
            if node not in index:
                visit(node)
    finally:
        sys.setrecursionlimit(limit)
    return found


def test_no_module_takes_part_in_an_import_circle() -> None:
    assert _circles(_graph()) == []


def test_the_circle_finder_finds_a_circle() -> None:
    """The check above can fail: a made-up graph with a circle is reported."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _circles(graph) == [["a", "b", "c"]]
