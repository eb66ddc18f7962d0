"""The ``sessionctl`` console script: says which extra is missing instead of a traceback
when sessionbus was installed for a module author only (``pip install sessionbus``)."""

from __future__ import annotations

import sys

EXTRA_MODULES = ("click", "rich", "eventsourcing", "psycopg", "prometheus_client", "uvicorn")


def main() -> None:
    try:
        from sessionctl.cli import main as cli_main  # noqa: PLC0415 - the check is the point
    except ModuleNotFoundError as exc:
        if exc.name not in EXTRA_MODULES:
            raise
        sys.stderr.write(
            f"sessionctl needs the command line extra ({exc.name} is not installed): "
            "pip install 'sessionbus[cli]'\n"
        )
        raise SystemExit(2) from None
    cli_main()


if __name__ == "__main__":
    main()
