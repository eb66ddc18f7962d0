"""What each install brings: a module author's `pip install sessionbus` is the contracts,
the transport and the SDK, with no store, command line or web server; our top-level
import names are ours alone in the locked environment."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OUR_NAMES = (
    "contracts",
    "transport",
    "coordinator",
    "module_sdk",
    "reference_modules",
    "sessionctl",
)
# What only the extras bring (the coordinator's store, the command line, HTTP).
EXTRA_ONLY = (
    "eventsourcing",
    "psycopg",
    "psycopg_pool",
    "prometheus_client",
    "click",
    "rich",
    "uvicorn",
    "starlette",
)


def _project() -> dict[str, object]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert isinstance(project, dict)
    return project


def _run_blocked(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter where every extra-only library fails to
    import, as in an environment where none of them is installed."""
    prelude = f"import sys\nfor name in {EXTRA_ONLY!r}:\n    sys.modules[name] = None\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


def test_the_base_install_declares_no_extra_only_library() -> None:
    base = {
        str(d).split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip().lower()
        for d in _project()["dependencies"]  # type: ignore[attr-defined]
    }
    # aiormq and pamqp come with aio-pika; they are declared (and pinned) because
    # transport/_aiormq_publish.py uses them directly.
    assert base == {"aio-pika", "aiormq", "pamqp", "yarl", "msgspec", "tenacity"}


def test_a_module_author_imports_everything_without_the_extras() -> None:
    result = _run_blocked(
        """
        import contracts, transport, transport.amqp, transport.memory, transport.topology
        import module_sdk, module_sdk.testing
        from module_sdk import CoordinatorClient, SessionManager
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_the_block_is_real() -> None:
    """The check above can fail: the coordinator does need its extra."""
    result = _run_blocked("import coordinator.store.eventstore")
    assert result.returncode != 0
    assert "halted; None in sys.modules" in result.stderr


def test_sessionctl_without_its_extra_names_the_extra() -> None:
    result = _run_blocked("from sessionctl.entry import main\nmain()")
    assert result.returncode == 2
    assert "pip install 'sessionbus[cli]'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", OUR_NAMES)
def test_no_other_distribution_installs_our_import_names(name: str) -> None:
    """Top-level names are shared by every distribution in an environment (see
    docs/design.md, "Import names"): none in our locked set may claim one of ours."""
    owners = set(packages_distributions().get(name, [])) - {"sessionbus"}
    assert owners == set()
