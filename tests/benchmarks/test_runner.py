"""The benchmark runner's pairing: measurements joined by a paired ratio run together,
their trials alternating, and the ratio is the median of the per-round ratios."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks import registry, runner
from benchmarks.registry import Context, Figure, Measurement, Ratio, Trial


def _fake(name: str, values: list[float], calls: list[str], repeats: int = 4) -> Measurement:
    @contextlib.contextmanager
    def setup(ctx: Context) -> Iterator[Trial]:
        del ctx
        series = iter(values)

        def trial() -> dict[str, Figure]:
            calls.append(name)
            return {"rate": Figure(next(series), "ops/s")}

        calls.append(f"setup {name}")
        yield trial
        calls.append(f"clean {name}")

    return Measurement(name, name, setup, (repeats, repeats), (60.0, 60.0))


@pytest.fixture
def ratios(monkeypatch: pytest.MonkeyPatch) -> list[Ratio]:
    fresh: list[Ratio] = []
    monkeypatch.setattr(registry, "RATIOS", fresh)
    monkeypatch.setattr(runner, "RATIOS", fresh)
    return fresh


def test_paired_measurements_run_together_with_alternating_trials(
    ratios: list[Ratio], tmp_path: Path
) -> None:
    """Both set-ups come first, then rounds A B, B A, …; a lone measurement runs alone."""
    ratios.append(Ratio("a_vs_b", ("a", "rate"), ("b", "rate"), "", paired=True))
    calls: list[str] = []
    a = _fake("a", [10, 20, 30, 40], calls)
    b = _fake("b", [10, 10, 10, 10], calls)
    c = _fake("c", [1, 1, 1, 1], calls, repeats=1)
    assert runner.groups([a, c, b]) == [[a, b], [c]]
    outcomes = runner.run_group(
        [a, b], quick=True, postgres_url="", shared={}, workdir=tmp_path, repeats=None
    )
    assert calls == [
        "setup a",
        "setup b",
        "a",
        "b",
        "b",
        "a",
        "a",
        "b",
        "b",
        "a",
        "clean b",
        "clean a",
    ]
    _, details = runner.evaluate({o.measurement.name: o for o in outcomes})
    assert details["a_vs_b"]["paired"] is True
    assert details["a_vs_b"]["values"] == [1.0, 2.0, 3.0, 4.0]
    assert details["a_vs_b"]["value"] == 2.5
    assert (details["a_vs_b"]["min"], details["a_vs_b"]["max"]) == (1.0, 4.0)


def test_unpaired_ratio_is_the_ratio_of_medians(ratios: list[Ratio], tmp_path: Path) -> None:
    ratios.append(Ratio("a_vs_b", ("a", "rate"), ("b", "rate"), ""))
    calls: list[str] = []
    a = _fake("a", [10, 20, 90, 40], calls)
    b = _fake("b", [10, 10, 10, 20], calls)
    assert runner.groups([a, b]) == [[a], [b]]
    outcomes = [
        o
        for group in runner.groups([a, b])
        for o in runner.run_group(
            group, quick=True, postgres_url="", shared={}, workdir=tmp_path, repeats=None
        )
    ]
    _, details = runner.evaluate({o.measurement.name: o for o in outcomes})
    assert details["a_vs_b"] == {
        "numerator": "a/rate",
        "denominator": "b/rate",
        "meaning": "",
        "value": 30 / 10,
        "paired": False,
    }


def test_a_failing_trial_ends_only_its_own_measurement(ratios: list[Ratio], tmp_path: Path) -> None:
    ratios.append(Ratio("a_vs_b", ("a", "rate"), ("b", "rate"), "", paired=True))
    calls: list[str] = []
    a = _fake("a", [10, 20], calls)  # runs out after two trials: StopIteration
    b = _fake("b", [10, 10, 10, 10], calls)
    outcomes = runner.run_group(
        [a, b], quick=True, postgres_url="", shared={}, workdir=tmp_path, repeats=None
    )
    by_name = {o.measurement.name: o for o in outcomes}
    assert by_name["a"].error is not None
    assert len(by_name["a"].trials) == 2
    assert by_name["b"].error is None
    assert len(by_name["b"].trials) == 4
    _, details = runner.evaluate(by_name)
    assert details["a_vs_b"]["values"] == [1.0, 2.0]
