"""``python -m benchmarks [--quick] [--only NAME ...]``; the last line printed is the
path of the JSON record."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from benchmarks import runner


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, under 3 minutes")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="run only this measurement, or every one under a prefix (rebuild → rebuild.*); "
        "repeat or comma-separate",
    )
    parser.add_argument("--list", action="store_true", help="list the measurements and exit")
    parser.add_argument("--plain", action="store_true", help="plain text table, not rich")
    parser.add_argument("--repeats", type=int, default=None, help="override repetitions")
    parser.add_argument("--output", type=Path, default=None, help="directory for the JSON")
    args = parser.parse_args(argv)
    if args.list:
        for name, m in runner.load().items():
            print(f"{name:20} {m.description}")
        return
    # A terminated run still drops its PostgreSQL schemas and temporary files.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    only = [name for item in args.only for name in item.split(",") if name]
    path = runner.main(
        quick=args.quick, only=only, plain=args.plain, repeats=args.repeats, output=args.output
    )
    print(path)


if __name__ == "__main__":
    main()
