"""How big the fault scenarios run: the default is sized to finish in a few minutes
as part of ``make test``; ``SESSIONBUS_FAULTS_FULL=1`` runs bigger loads and more
cases."""

from __future__ import annotations

import os
from typing import TypeVar

__all__ = ["FULL", "sized"]

FULL = os.environ.get("SESSIONBUS_FAULTS_FULL") == "1"

T = TypeVar("T")


def sized(default: T, full: T) -> T:
    """``full`` when SESSIONBUS_FAULTS_FULL=1, else ``default``."""
    return full if FULL else default
