"""The fault suite's results table: each scenario adds a row; the suite prints the
table at the end of the run (and writes it as JSON to ``SESSIONBUS_FAULTS_REPORT``
when that is set)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["ROWS", "Row", "record", "render", "seconds"]


@dataclass(frozen=True)
class Row:
    scenario: str
    load: str
    faults: str
    events_checked: int
    lost: int
    duplicated_applied: int
    recovery: str
    spurious_hooks: int | None = None  # CheckReport.spurious_hook_count; None: not checked


ROWS: list[Row] = []


def record(row: Row) -> None:
    ROWS.append(row)
    target = os.environ.get("SESSIONBUS_FAULTS_REPORT")
    if target:
        Path(target).write_text(json.dumps([asdict(r) for r in ROWS], indent=2))


def seconds(values: list[float | None]) -> str:
    """``0.84 s`` or ``max 1.20 s of 3`` for a list of measured recovery times."""
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    if len(known) == 1:
        return f"{known[0]:.2f} s"
    return f"max {max(known):.2f} s (min {min(known):.2f}, n={len(known)})"


def render() -> list[str]:
    headers = list(Row.__dataclass_fields__)
    table = [headers] + [
        ["-" if getattr(r, h) is None else str(getattr(r, h)) for h in headers] for r in ROWS
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(headers))]
    out = []
    for index, line in enumerate(table):
        out.append(" | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))
        if index == 0:
            out.append("-+-".join("-" * w for w in widths))
    return out
