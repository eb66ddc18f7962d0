"""A browser's live stream in a process of its own, for ``console.live_feed``.

``python -m benchmarks.feed_reader URL RESULT_PATH MAX_SECONDS``: signs in to the
console at URL, reads the sessions list's live stream, says ``feed ready`` once the
stream is open and ``applied N`` (N session events read since) as they come, and on
SIGTERM (or after MAX_SECONDS) writes what it read to RESULT_PATH as JSON: received,
missed, lags (seconds, event time → read here).

A browser is not in the process that sends the coordinator its commands: read in that
process, the stream's 1,000 events a second would share its event loop with the
commands being timed, and their replies would wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from pathlib import Path

from benchmarks.console import Feed, _read_feed, _signed_in


async def main(url: str, result: Path, max_seconds: float) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    http = await _signed_in(url)
    feed = Feed()
    reader = asyncio.create_task(_read_feed(http, feed, max_seconds))
    try:
        await asyncio.wait_for(feed.ready.wait(), 30)
        feed.since = time.time()
        print("feed ready", flush=True)
        said = -1
        deadline = time.monotonic() + max_seconds
        while not stop.is_set() and not reader.done() and time.monotonic() < deadline:
            if feed.received != said:
                said = feed.received
                print(f"applied {said}", flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)
        if reader.done():
            reader.result()  # raises what ended it
    finally:
        reader.cancel()
        with contextlib.suppress(BaseException):
            await reader
        await http.aclose()
        read = {"received": feed.received, "missed": feed.missed, "lags": feed.lags}
        await asyncio.to_thread(result.write_text, json.dumps(read))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])))
