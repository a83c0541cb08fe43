"""
The reference server: the least an SMTP submission server can do per
message. STARTTLS and implicit-TLS listeners with one certificate, AUTH
PLAIN/LOGIN against one user compared in plain text, no queue: the bytes are
discarded and the final dot answered 250 at once. Running the load generator
against it shows what the load generator and the machine can do at all.

    .venv/bin/python benchmarks/refserver.py --certificate CERT --key KEY
        --user USER --password PASSWORD [--starttls-port P] [--implicit-port Q]

On start it prints one JSON line ``{"starttls": P, "implicit": Q}``; on
SIGUSR1 and at exit (SIGINT, SIGTERM, C{--deadline}) one JSON line of
counts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.smtpserver import (  # noqa: E402
    Counters,
    ServerSettings,
    boundPort,
    listen,
    serverContext,
)


def printLine(data: Mapping[str, object]) -> None:
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


async def serve(options: argparse.Namespace) -> int:
    context = serverContext(options.certificate, options.key)
    settings = ServerSettings(
        hostname=options.hostname,
        tlsContext=context,
        user=options.user.encode("utf-8"),
        password=options.password.encode("utf-8"),
    )
    counters = Counters()
    starttls = await listen(settings, counters, options.starttls_port, options.host)
    implicit = await listen(
        settings, counters, options.implicit_port, options.host, implicitTLS=context
    )
    printLine({"starttls": boundPort(starttls), "implicit": boundPort(implicit)})

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, lambda: printLine(counters.asDict()))
    for number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(number, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), timeout=options.deadline)
    except TimeoutError:
        pass
    starttls.close()
    implicit.close()
    printLine(counters.asDict())
    return 0


def parseArguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Reference SMTP server: TLS, AUTH, no queue.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--starttls-port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--implicit-port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--certificate", required=True, help="PEM certificate (and chain)")
    parser.add_argument("--key", required=True, help="PEM private key")
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--hostname", default="localhost")
    parser.add_argument(
        "--deadline", type=float, default=3600, metavar="S", help="exit after S s in any case"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(serve(parseArguments(argv)))


if __name__ == "__main__":
    sys.exit(main())
