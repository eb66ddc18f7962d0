"""Run measurements, repeat their trials, summarize, print, and write the JSON record."""

from __future__ import annotations

import contextlib
import faulthandler
import importlib
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks import environment
from benchmarks.registry import (
    RATIOS,
    REGISTRY,
    TARGETS,
    Context,
    Figure,
    Measurement,
    Trial,
    remove_tree,
)

# Modules that register measurements, in the order they run.
MODULES = (
    "benchmarks.raw",
    "benchmarks.rawbus",
    "benchmarks.commands",
    "benchmarks.bus",
    "benchmarks.typescript",
    "benchmarks.rebuild",
    "benchmarks.memory",
    "benchmarks.console",
)
# The ratios kept at the JSON's top level, exactly these keys, with the goal.
HEADLINE_RATIOS: dict[str, float] = {
    "commands_vs_raw_rpc_64": 0.8,
    "delivered_vs_raw_e2e": 0.6,
    "vs_naive_peer": 10.0,
    "rebuild_vs_raw_decode": 0.7,
}
# Seconds one measurement (set-up and trials) may take before the watchdog ends the run.
WATCHDOG_S = (600, 3600)
RESULTS = Path(__file__).resolve().parent / "results"


def load() -> dict[str, Measurement]:
    for name in MODULES:
        importlib.import_module(name)
    return REGISTRY


def select(names: list[str]) -> list[Measurement]:
    """Measurements named exactly, or by a dotted prefix (``rebuild`` → ``rebuild.*``)."""
    registry = load()
    if not names:
        return list(registry.values())
    chosen: list[Measurement] = []
    for wanted in names:
        hits = [m for n, m in registry.items() if n == wanted or n.startswith(wanted + ".")]
        if not hits:
            raise SystemExit(f"no measurement {wanted!r}; known: {', '.join(registry)}")
        chosen.extend(m for m in hits if m not in chosen)
    return chosen


@dataclass
class Outcome:
    measurement: Measurement
    params: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    trials: list[dict[str, Figure]] = field(default_factory=list)
    error: str | None = None
    setup_seconds: float = 0.0
    trial_seconds: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, dict[str, Any]]:
        names: list[str] = []
        for trial in self.trials:
            names.extend(n for n in trial if n not in names)
        out: dict[str, dict[str, Any]] = {}
        for name in names:
            got = [t[name] for t in self.trials if name in t]
            values = [f.value for f in got]
            out[name] = {
                "unit": got[0].unit,
                "better": got[0].better,
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
                "n": len(values),
                "values": values,
            }
        return out

    def median(self, figure: str) -> float | None:
        summary = self.summary().get(figure)
        return None if summary is None else float(summary["median"])


def groups(chosen: list[Measurement]) -> list[list[Measurement]]:
    """The chosen measurements in run order, those joined by a paired ratio in one group
    (run together, trials alternating), each group where its first member was."""
    names = [m.name for m in chosen]
    root = {name: name for name in names}

    def find(name: str) -> str:
        while root[name] != name:
            name = root[name]
        return name

    for r in RATIOS:
        a, b = r.numerator[0], r.denominator[0]
        if r.paired and a != b and a in root and b in root:
            root[find(a)] = find(b)
    order: dict[str, list[Measurement]] = {}
    for m in chosen:
        order.setdefault(find(m.name), []).append(m)
    return list(order.values())


def _unreachable(m: Measurement, ctx: Context, postgres_url: str) -> str | None:
    if "postgres" in m.needs:
        why = environment.postgres_reachable(postgres_url)
        if why is not None:
            return f"PostgreSQL unreachable at {postgres_url}: {why}"
    if "rabbitmq" in m.needs:
        why = environment.rabbitmq_reachable(ctx.amqp_url)
        if why is not None:
            return f"RabbitMQ unreachable: {why}"
    return None


def run_group(
    members: list[Measurement],
    *,
    quick: bool,
    postgres_url: str,
    shared: dict[str, Any],
    workdir: Path,
    repeats: int | None,
) -> list[Outcome]:
    """Set up every member, then run their trials in rounds, alternating the order
    (A B, B A, …) so that neither side always runs first after a set-up or on a host
    that is getting slower. A lone measurement is a group of one."""
    outcomes = {m.name: Outcome(m) for m in members}
    contexts = {
        m.name: Context(
            quick=quick,
            postgres_url=postgres_url,
            shared=shared,
            workdir=workdir,
            amqp_url=environment.amqp_url(),
        )
        for m in members
    }
    wanted = {m.name: repeats or (m.repeats[0] if quick else m.repeats[1]) for m in members}
    trials: dict[str, Trial] = {}
    # A hang (a lock, a stuck socket) must not stall the run forever: past this the
    # process dumps every thread's stack and exits.
    faulthandler.dump_traceback_later(
        (WATCHDOG_S[0] if quick else WATCHDOG_S[1]) * len(members), exit=True
    )
    try:
        with contextlib.ExitStack() as stack:
            for m in members:
                outcome, ctx = outcomes[m.name], contexts[m.name]
                outcome.error = _unreachable(m, ctx, postgres_url)
                if outcome.error is not None:
                    continue
                print(f"▶ {m.name}: {m.description}", file=sys.stderr, flush=True)
                began = time.perf_counter()
                try:
                    trials[m.name] = stack.enter_context(m.setup(ctx))
                except Exception as exc:  # noqa: BLE001 - one failed set-up must not end the run
                    outcome.error = f"{type(exc).__name__}: {exc}"
                    traceback.print_exc(file=sys.stderr)
                outcome.setup_seconds = time.perf_counter() - began
            _rounds(members, outcomes, contexts, trials, wanted, quick=quick)
    except Exception as exc:  # noqa: BLE001 - a failed clean-up is reported, the run goes on
        for outcome in outcomes.values():
            outcome.error = outcome.error or f"clean-up: {type(exc).__name__}: {exc}"
        traceback.print_exc(file=sys.stderr)
    finally:
        faulthandler.cancel_dump_traceback_later()
    for m in members:
        outcomes[m.name].params = dict(contexts[m.name].params)
        outcomes[m.name].notes = list(contexts[m.name].notes)
    return [outcomes[m.name] for m in members]


def _rounds(
    members: list[Measurement],
    outcomes: dict[str, Outcome],
    contexts: dict[str, Context],
    trials: dict[str, Trial],
    wanted: dict[str, int],
    *,
    quick: bool,
) -> None:
    started = time.perf_counter()
    budget = sum(m.budget_s[0] if quick else m.budget_s[1] for m in members)
    running = [m for m in members if m.name in trials]
    for i in range(max(wanted.values(), default=0)):
        for m in running if i % 2 == 0 else running[::-1]:
            outcome, ctx = outcomes[m.name], contexts[m.name]
            if i >= wanted[m.name] or outcome.error is not None:
                continue
            t0 = time.perf_counter()
            try:
                figures = trials[m.name]()
            except Exception as exc:  # noqa: BLE001 - one failed trial ends that measurement only
                outcome.error = f"{type(exc).__name__}: {exc}"
                traceback.print_exc(file=sys.stderr)
                continue
            outcome.trial_seconds.append(time.perf_counter() - t0)
            outcome.trials.append(figures)
            ctx.log(
                f"{m.name}: trial {i + 1}/{wanted[m.name]} done in {outcome.trial_seconds[-1]:.1f}s"
            )
        if time.perf_counter() - started > budget and i + 1 < max(wanted.values()):
            for m in running:
                contexts[m.name].note(
                    f"{m.name}: stopped after {i + 1} of {wanted[m.name]} repetitions "
                    f"(time budget {budget:.0f}s)"
                )
            return


def _paired(num: Outcome, num_fig: str, den: Outcome, den_fig: str) -> list[float]:
    """Per-round ratios of two measurements that ran together, round by round."""
    values = []
    for a, b in zip(num.trials, den.trials, strict=False):
        if num_fig in a and den_fig in b and b[den_fig].value:
            values.append(a[num_fig].value / b[den_fig].value)
    return values


def evaluate(outcomes: dict[str, Outcome]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    targets = []
    for t in TARGETS:
        outcome = outcomes.get(t.measurement)
        if outcome is None:
            continue
        measured = outcome.median(t.figure)
        verdict: str
        if measured is None:
            verdict = "not measured"
        elif t.at_size and int(outcome.params.get(t.at_size[0], 0)) < t.at_size[1]:
            verdict = (
                f"not comparable: measured at {t.at_size[0]}="
                f"{outcome.params.get(t.at_size[0])}, target is for {t.at_size[1]:,}"
            )
        else:
            verdict = "met" if t.met(measured) else "MISSED"
        targets.append(
            {
                "label": t.label,
                "measurement": t.measurement,
                "figure": t.figure,
                "target": f"{t.op} {t.value:,} {t.unit}",
                "measured": measured,
                "unit": t.unit,
                "measured_over_target": (measured / t.value) if measured is not None else None,
                "verdict": verdict,
            }
        )
    ratios: dict[str, Any] = {}
    for r in RATIOS:
        num_o, den_o = outcomes.get(r.numerator[0]), outcomes.get(r.denominator[0])
        if num_o is None or den_o is None:
            continue
        detail: dict[str, Any] = {
            "numerator": f"{r.numerator[0]}/{r.numerator[1]}",
            "denominator": f"{r.denominator[0]}/{r.denominator[1]}",
            "meaning": r.meaning,
        }
        pairs = (
            _paired(num_o, r.numerator[1], den_o, r.denominator[1])
            if r.paired and num_o is not den_o
            else []
        )
        if pairs:
            detail |= {
                "value": statistics.median(pairs),
                "min": min(pairs),
                "max": max(pairs),
                "n": len(pairs),
                "values": pairs,
                "paired": True,
            }
        else:
            num, den = num_o.median(r.numerator[1]), den_o.median(r.denominator[1])
            if num is None or den is None or den == 0:
                continue
            detail |= {"value": num / den, "paired": False}
        ratios[r.name] = detail
    for name, wanted in HEADLINE_RATIOS.items():
        value = ratios[name]["value"] if name in ratios else None
        targets.append(
            {
                "label": f"ratio {name}",
                "measurement": "ratios",
                "figure": name,
                "target": f">= {wanted}",
                "measured": value,
                "unit": "x",
                "measured_over_target": None if value is None else value / wanted,
                "verdict": "not measured"
                if value is None
                else "met"
                if value >= wanted
                else "MISSED",
            }
        )
    return targets, ratios


def headline(ratios: dict[str, Any]) -> dict[str, float | None]:
    """The four ratios the JSON keeps at its top level, always all four (``null`` when a
    run did not measure both sides)."""
    return {name: ratios[name]["value"] if name in ratios else None for name in HEADLINE_RATIOS}


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "nan"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def render(record: dict[str, Any], *, plain: bool) -> None:
    rows = []
    for name, m in record["measurements"].items():
        if m["error"]:
            rows.append((name, "ERROR", m["error"][:80], "", "", "", ""))
            continue
        for fig, s in m["figures"].items():
            rows.append(
                (
                    name,
                    fig,
                    _fmt(s["median"]),
                    _fmt(s["min"]),
                    _fmt(s["max"]),
                    s["unit"],
                    str(s["n"]),
                )
            )
    target_rows = [
        (
            t["label"],
            t["target"],
            "-" if t["measured"] is None else f"{_fmt(t['measured'])} {t['unit']}",
            t["verdict"],
        )
        for t in record["targets"]
    ]
    ratio_rows = [
        (
            k,
            f"{v['value']:.3f}"
            + (f" ({v['min']:.3f} to {v['max']:.3f}, {v['n']} pairs)" if v.get("paired") else ""),
            v["meaning"],
        )
        for k, v in record["ratio_details"].items()
    ]
    title = f"sessionbus benchmarks ({record['mode']}, {record['started_at']})"
    if not plain:
        console = Console(width=max(120, Console().width))
        table = Table(title=title)
        for col, justify in (
            ("measurement", "left"),
            ("figure", "left"),
            ("median", "right"),
            ("min", "right"),
            ("max", "right"),
            ("unit", "left"),
            ("n", "right"),
        ):
            table.add_column(col, justify=justify)  # type: ignore[arg-type]
        for row in rows:
            table.add_row(*row)
        console.print(table)
        if target_rows:
            tt = Table(title="issue targets")
            for col in ("target", "wanted", "measured (median)", "verdict"):
                tt.add_column(col)
            for t in target_rows:
                tt.add_row(*t)
            console.print(tt)
        if ratio_rows:
            rt = Table(title="ratios (of medians)")
            for col in ("ratio", "value", "meaning"):
                rt.add_column(col)
            for r in ratio_rows:
                rt.add_row(*r)
            console.print(rt)
    else:
        print(title)
        widths = [
            max(
                len(r[i])
                for r in [*rows, ("measurement", "figure", "median", "min", "max", "unit", "n")]
            )
            for i in range(7)
        ]
        header = ("measurement", "figure", "median", "min", "max", "unit", "n")
        for line in (header, *rows):
            print(
                "  ".join(
                    c.ljust(w) if i < 2 or i == 5 else c.rjust(w)
                    for i, (c, w) in enumerate(zip(line, widths, strict=True))
                )
            )
        for t in target_rows:
            print(f"target  {t[0]}: wanted {t[1]}, measured {t[2]}: {t[3]}")
        for r in ratio_rows:
            print(f"ratio   {r[0]} = {r[1]}  ({r[2]})")
    for name, m in record["measurements"].items():
        for note in m["notes"]:
            print(f"note: {note}")
        if m["error"]:
            print(f"error in {name}: {m['error']}")


def main(
    *, quick: bool, only: list[str], plain: bool, repeats: int | None, output: Path | None
) -> Path:
    chosen = select(only)
    postgres_url = environment.postgres_base_url()
    started_at = datetime.now(UTC)
    load_at_start = environment.load_average()
    began = time.perf_counter()
    shared: dict[str, Any] = {}
    workdir = Path(tempfile.mkdtemp(prefix="sessionbus-bench-"))
    outcomes: dict[str, Outcome] = {}
    try:
        for group in groups(chosen):
            for outcome in run_group(
                group,
                quick=quick,
                postgres_url=postgres_url,
                shared=shared,
                workdir=workdir,
                repeats=repeats,
            ):
                outcomes[outcome.measurement.name] = outcome
    finally:
        remove_tree(workdir)
    targets, ratios = evaluate(outcomes)
    host = environment.host()
    host["load_average_at_start"] = load_at_start
    record: dict[str, Any] = {
        "mode": "quick" if quick else "full",
        "started_at": started_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "seconds": round(time.perf_counter() - began, 1),
        "argv": sys.argv,
        "host": host,
        "versions": environment.versions(postgres_url),
        "measurements": {
            name: {
                "description": o.measurement.description,
                "params": o.params,
                "notes": o.notes,
                "error": o.error,
                "setup_seconds": round(o.setup_seconds, 2),
                "trial_seconds": [round(s, 2) for s in o.trial_seconds],
                "figures": o.summary(),
            }
            for name, o in outcomes.items()
        },
        "targets": targets,
        "ratios": headline(ratios),
        "ratio_details": ratios,
    }
    directory = output or RESULTS
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{started_at.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    render(record, plain=plain)
    return path
