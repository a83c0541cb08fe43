"""
The counting sink: a plain SMTP server on 127.0.0.1 (no TLS, no AUTH) that
the gateway relays to (``--relay 127.0.0.1:PORT --relay-tls none``). It
counts the messages it receives and can keep them in a directory.

    .venv/bin/python benchmarks/sink.py --port 2525 [--store DIR]
        [--status-file PATH] [--expect N --timeout S]

On start it prints one JSON line ``{"port": P}``. The counts go to
C{--status-file} (rewritten at most every 0.2 s while they change), to stdout
as one JSON line on SIGUSR1, and to stdout at exit (SIGINT, SIGTERM,
C{--expect} reached, C{--timeout} or C{--deadline} passed). Exit status: 0,
or 1 when C{--expect} was not reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.smtpserver import Counters, ServerSettings, boundPort, listen  # noqa: E402


class Sink:
    """The counters, the store directory and the wake-up for C{--expect}."""

    def __init__(self, store: str | None, expect: int | None) -> None:
        self.counters = Counters()
        self.store = store
        self.expect = expect
        self.reached = asyncio.Event()
        self.started = time.monotonic()
        self.firstAt: float | None = None
        self.lastAt: float | None = None
        if expect is not None and expect <= 0:
            self.reached.set()

    def onMessage(self, message: bytes | None) -> None:
        now = time.monotonic()
        if self.firstAt is None:
            self.firstAt = now
        self.lastAt = now
        if self.store is not None and message is not None:
            name = os.path.join(self.store, f"{self.counters.messages:08d}.eml")
            with open(name, "wb") as f:
                f.write(message)
        if self.expect is not None and self.counters.messages >= self.expect:
            self.reached.set()

    def status(self) -> dict[str, object]:
        result: dict[str, object] = dict(self.counters.asDict())
        result["received"] = self.counters.messages
        result["uptime_s"] = round(time.monotonic() - self.started, 3)
        if self.firstAt is not None and self.lastAt is not None:
            result["first_to_last_s"] = round(self.lastAt - self.firstAt, 3)
        if self.expect is not None:
            result["expect"] = self.expect
            result["reached"] = self.counters.messages >= self.expect
        return result


def writeStatus(path: str, status: dict[str, object]) -> None:
    """Replace C{path} atomically, so a reader never sees half a file."""
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        f.write(json.dumps(status) + "\n")
    os.replace(temporary, path)


def printLine(status: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(status) + "\n")
    sys.stdout.flush()


async def serve(options: argparse.Namespace) -> int:
    sink = Sink(options.store, options.expect)
    if options.store is not None:
        os.makedirs(options.store, exist_ok=True)
    settings = ServerSettings(
        hostname=options.hostname,
        keepMessages=options.store is not None,
        onMessage=sink.onMessage,
        maxSize=options.max_size,
    )
    server = await listen(settings, sink.counters, options.port, options.host)
    printLine({"port": boundPort(server)})

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, lambda: printLine(sink.status()))
    for number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(number, stop.set)

    limit = options.deadline
    if options.timeout is not None:
        limit = min(limit, options.timeout)
    deadline = loop.time() + limit
    lastWritten: int | None = None
    while loop.time() < deadline and not stop.is_set() and not sink.reached.is_set():
        if options.status_file and sink.counters.messages != lastWritten:
            lastWritten = sink.counters.messages
            writeStatus(options.status_file, sink.status())
        waiters = [asyncio.ensure_future(e.wait()) for e in (stop, sink.reached)]
        await asyncio.wait(waiters, timeout=min(0.2, max(0.0, deadline - loop.time())))
        for waiter in waiters:
            waiter.cancel()

    server.close()
    status = sink.status()
    if options.status_file:
        writeStatus(options.status_file, status)
    printLine(status)
    if options.expect is not None and not status["reached"]:
        return 1
    return 0


def parseArguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Counting SMTP sink (plain, no AUTH).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--hostname", default="sink.localhost")
    parser.add_argument("--store", metavar="DIR", help="also write each message to DIR")
    parser.add_argument("--status-file", metavar="PATH", help="keep the counts in PATH")
    parser.add_argument("--expect", type=int, metavar="N", help="exit once N messages arrived")
    parser.add_argument("--timeout", type=float, metavar="S", help="give up --expect after S s")
    parser.add_argument(
        "--deadline", type=float, default=3600, metavar="S", help="exit after S s in any case"
    )
    parser.add_argument("--max-size", type=int, default=64 * 1024 * 1024)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(serve(parseArguments(argv)))


if __name__ == "__main__":
    sys.exit(main())
