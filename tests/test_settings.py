"""One settings object: every ``SESSIONBUS_*`` variable declared once, read once, with
flags over the environment over the defaults, bad values named with their variable,
and the README's configuration table generated from the declarations."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from contracts import Topology
from coordinator.service.runtime import CoordinatorRuntime
from coordinator.service.settings import CoordinatorSettings
from module_sdk.testing import InProcessBus
from reference_modules.__main__ import main as run_module
from reference_modules.settings import ReferenceModuleSettings
from sessionctl import settings as sessionctl_settings
from sessionctl.cli import main as sessionctl
from transport.settings import Settings, SettingsError

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- configuration:start -->", "<!-- configuration:end -->"


def test_the_readme_configuration_table_is_the_generated_one() -> None:
    """The table between the README's configuration markers is exactly what the
    settings' declarations render (regenerate with ``sessionctl config --markdown``)."""
    text = (ROOT / "README.md").read_text()
    assert text.count(START) == 1
    assert text.count(END) == 1
    table = text.split(START, 1)[1].split(END, 1)[0].lstrip("\n")
    assert table == sessionctl_settings.markdown()


def test_sessionctl_config_markdown_prints_the_table() -> None:
    result = CliRunner().invoke(sessionctl, ["config", "--markdown"], env={})
    assert result.exit_code == 0, result.output
    assert result.output == sessionctl_settings.markdown()


def test_every_variable_is_declared_once_and_documented() -> None:
    """No variable is declared by two fields; each has a meaning; every program's
    variables are in the table."""
    table = sessionctl_settings.markdown()
    for program in sessionctl_settings.EVERY_PROGRAM:
        names = [variable.name for _, variable in program.variables()]
        assert len(names) == len(set(names)), program
        for _, variable in program.variables():
            assert variable.name.startswith("SESSIONBUS_")
            assert variable.meaning
            assert f"| `{variable.name}` |" in table


def test_from_env_parses_types_and_an_empty_variable_is_unset() -> None:
    settings = CoordinatorSettings.from_env(
        {
            "SESSIONBUS_PARTITIONS": "4",
            "SESSIONBUS_METRICS_PORT": "9464",
            "SESSIONBUS_PREFIX": "tenant-a",
            "SESSIONBUS_STORE": "",
            "SESSIONBUS_LOG_FORMAT": "json",
        }
    )
    assert settings.partitions == 4
    assert settings.metrics_port == 9464
    assert settings.store == "sqlite:///sessionbus.sqlite"
    assert settings.log_format == "json"
    assert settings.topology() == Topology("tenant-a", 4)
    assert Settings.from_env({}) == Settings()


def test_overrides_win_over_the_environment_and_none_is_not_given() -> None:
    environ = {"SESSIONBUS_PREFIX": "tenant-a", "SESSIONBUS_PARTITIONS": "3"}
    settings = Settings.from_env(environ, prefix="tenant-b", partitions=None)
    assert (settings.prefix, settings.partitions) == ("tenant-b", 3)
    with pytest.raises(TypeError, match="no setting 'prefx'"):
        Settings.from_env(environ, prefx="tenant-b")


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("SESSIONBUS_PARTITIONS", "x", "a whole number from 1 to 256"),
        ("SESSIONBUS_PARTITIONS", "300", "a whole number from 1 to 256"),
        ("SESSIONBUS_PREFIX", "Tenant A", "lower-case letters"),
        ("SESSIONBUS_METRICS_PORT", "70000", "a port number from 0 to 65535"),
        ("SESSIONBUS_LOG_FORMAT", "xml", "text or json"),
    ],
)
def test_a_bad_value_is_an_error_naming_the_variable_and_the_value(
    variable: str, value: str, expected: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        CoordinatorSettings.from_env({variable: value})
    assert caught.value.source == variable
    assert caught.value.value == value
    assert str(caught.value).startswith(f"{variable} must be {expected}")
    assert str(caught.value).endswith(f"got {value!r}")


def test_a_bad_override_is_an_error_naming_the_argument() -> None:
    with pytest.raises(SettingsError, match=r"^partitions must be a whole number"):
        Settings.from_env({}, partitions=0)


def test_sessionctl_takes_the_flag_over_the_variable_over_the_default() -> None:
    """``sessionctl definitions`` writes its policies for the prefix it was given: the
    flag's, else SESSIONBUS_PREFIX's, else the default."""

    def policy_prefixes(args: list[str], env: dict[str, str]) -> set[str]:
        result = CliRunner().invoke(sessionctl, ["definitions", *args], env=env)
        assert result.exit_code == 0, result.output
        doc = json.loads(result.stdout)
        return {p["pattern"].removeprefix("^").split("\\.", 1)[0] for p in doc["policies"]}

    assert policy_prefixes([], {}) == {"sessionbus"}
    env = {"SESSIONBUS_PREFIX": "tenant_a"}
    assert policy_prefixes([], env) == {"tenant_a"}
    assert policy_prefixes(["--prefix", "tenant_b"], env) == {"tenant_b"}


def test_sessionctl_refuses_a_bad_variable_naming_it() -> None:
    result = CliRunner().invoke(
        sessionctl, ["sessions", "list"], env={"SESSIONBUS_PARTITIONS": "x"}
    )
    assert result.exit_code == 2
    assert "SESSIONBUS_PARTITIONS must be a whole number from 1 to 256, got 'x'" in result.output


def test_sessionctl_config_shows_values_and_where_they_come_from() -> None:
    env = {"SESSIONBUS_AMQP_URL": "amqp://ops:secret@rabbit:5672/", "SESSIONBUS_HTTP_PORT": "8080"}
    result = CliRunner().invoke(sessionctl, ["config", "--json"], env=env)
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["SESSIONBUS_AMQP_URL"] == {
        "value": "amqp://ops:***@rabbit:5672/",
        "from": "environment",
    }
    assert shown["SESSIONBUS_HTTP_PORT"] == {"value": "8080", "from": "environment"}
    assert shown["SESSIONBUS_PREFIX"] == {"value": "sessionbus", "from": "default"}


def test_the_reference_modules_refuse_a_bad_variable_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SESSIONBUS_HTTP_PORT", "eighty")
    with pytest.raises(SystemExit) as caught:
        run_module(["frontend-api"])
    assert caught.value.code == 2
    assert "SESSIONBUS_HTTP_PORT must be a port number from 0 to 65535, got 'eighty'" in (
        capsys.readouterr().err
    )
    assert ReferenceModuleSettings.from_env({"SESSIONBUS_HTTP_PORT": "8080"}).http_port == 8080


def test_a_runtime_given_no_identity_takes_the_settings_one() -> None:
    """An embedded coordinator left without an identity map does not fall back to
    development mode where the settings (SESSIONBUS_IDENTITY) name one."""
    bus = InProcessBus()
    given = CoordinatorSettings(identity="executor=executor;ops=*", store="memory://")
    runtime = CoordinatorRuntime(bus.transport("coordinator"), settings=given)
    assert not runtime.identity.development
    assert runtime.identity.users() == ["executor", "ops"]
    assert runtime._store_url == "memory://"
    development = CoordinatorRuntime(
        bus.transport("coordinator"), settings=CoordinatorSettings(store="memory://")
    )
    assert development.identity.development


def test_contracts_read_no_environment() -> None:
    """The wire package takes every value as an argument: with a broken
    SESSIONBUS_PARTITIONS in the environment, a Topology is still what it is given."""
    code = "from contracts import Topology; print(Topology().partitions)"
    env = {"SESSIONBUS_PARTITIONS": "x", "PATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"
