"""Named measurements, the figures they return, and the targets and ratios read from them.

A measurement is a function taking a ``Context`` and returning a context manager that
yields one *trial* callable: everything before the ``yield`` is set-up (generating
data, opening stores) done once; the runner then calls the trial once per repetition,
and each call returns ``{figure name: Figure}``. Everything after the ``yield`` is
clean-up. Modules register their measurements with ``@measurement(...)`` at import.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Better = Literal["higher", "lower"] | None
Trial = Callable[[], dict[str, "Figure"]]
Setup = Callable[["Context"], contextlib.AbstractContextManager[Trial]]


@dataclass(frozen=True)
class Figure:
    """One measured number. ``better`` says which direction is an improvement
    (``None`` for figures that describe the run rather than grade it)."""

    value: float
    unit: str
    better: Better = "higher"


@dataclass
class Context:
    """What a measurement gets from the runner."""

    quick: bool
    postgres_url: str
    shared: dict[str, Any]
    workdir: Path
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    params: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def size(self, quick: int, full: int) -> int:
        return quick if self.quick else full

    def tmpdir(self, prefix: str) -> Path:
        """A fresh directory under the run's work directory."""
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.workdir))

    def log(self, message: str) -> None:
        print(f"  · {message}", file=sys.stderr, flush=True)

    def note(self, message: str) -> None:
        """A remark kept in the JSON (and printed under the table)."""
        self.notes.append(message)


@dataclass(frozen=True)
class Measurement:
    name: str
    description: str
    setup: Setup
    repeats: tuple[int, int]  # (quick, full)
    budget_s: tuple[float, float]  # time allowed for the repetitions (quick, full)
    needs: tuple[str, ...] = ()  # "postgres", "rabbitmq"


@dataclass(frozen=True)
class Target:
    """An issue target: ``measurement``'s ``figure`` (median) compared with ``value``."""

    label: str
    measurement: str
    figure: str
    op: Literal[">=", "<="]
    value: float
    unit: str
    # The target only applies at a size: (params key of the measurement, minimum).
    at_size: tuple[str, int] | None = None

    def met(self, measured: float) -> bool:
        return measured >= self.value if self.op == ">=" else measured <= self.value


@dataclass(frozen=True)
class Ratio:
    """``numerator / denominator``, each a (measurement, figure).

    A ``paired`` ratio's two measurements run together, their trials alternating
    (A B, B A, A B …), and the ratio is the median of the per-pair ratios with their
    min and max: a slow minute of a shared host then slows both sides of a pair
    instead of one side's whole series. Unpaired ratios are ratios of medians."""

    name: str
    numerator: tuple[str, str]
    denominator: tuple[str, str]
    meaning: str
    paired: bool = False


REGISTRY: dict[str, Measurement] = {}
TARGETS: list[Target] = []
RATIOS: list[Ratio] = []


def measurement(
    name: str,
    description: str,
    *,
    repeats: tuple[int, int] = (3, 5),
    budget_s: tuple[float, float] = (30.0, 120.0),
    needs: tuple[str, ...] = (),
) -> Callable[[Setup], Setup]:
    def register(setup: Setup) -> Setup:
        if name in REGISTRY:
            raise ValueError(f"measurement {name!r} registered twice")
        REGISTRY[name] = Measurement(name, description, setup, repeats, budget_s, needs)
        return setup

    return register


def target(*args: Any, **kwargs: Any) -> None:
    TARGETS.append(Target(*args, **kwargs))


def ratio(*args: Any, **kwargs: Any) -> None:
    RATIOS.append(Ratio(*args, **kwargs))


class Deadline:
    """A time bound for a loop: ``while not deadline.passed()``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    def passed(self) -> bool:
        return time.perf_counter() - self.start >= self.seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def percentile(sorted_values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of already sorted values, nearest rank."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
