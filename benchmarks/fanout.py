"""
The load generator over several processes (C{loadgen.py --processes N}): one
Python process manages about 480 STARTTLS + AUTH sessions a second, so a
server faster than that needs more of them, on CPUs of their own. The
sessions and connections are divided between the children; each says it is
ready, all start on one word, and their figures are merged as those of one
load generator (the wall time from the first start to the last end, on
C{time.monotonic()}, one clock for every process of the machine).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any


def percentile(values: list[float], fraction: float) -> float | None:
    """The nearest-rank percentile of sorted C{values}, or None if empty."""
    if not values:
        return None
    rank = max(1, math.ceil(fraction * len(values)))
    return values[rank - 1]


def childArguments(argv: list[str], options: argparse.Namespace) -> list[list[str]]:
    """
    The arguments of each of C{options.processes} children: the sessions and
    the connections divided as evenly as they go (a later option of argparse
    replaces an earlier one).
    """
    n = options.processes
    per = options.per_connection
    if options.sessions is not None:
        sessions = options.sessions
    else:
        sessions = math.ceil(options.messages / per)
    children = []
    messagesLeft = options.messages
    for i in range(n):
        share = sessions // n + (i < sessions % n)
        connections = max(1, options.connections // n + (i < options.connections % n))
        extra = ["--connections", str(connections), "--processes", "1", "--child"]
        if options.sessions is not None:
            extra += ["--sessions", str(share)]
        else:
            count = messagesLeft if i == n - 1 else min(messagesLeft, share * per)
            messagesLeft -= count
            extra += ["--messages", str(count)]
        children.append([*argv, *extra])
    return children


def merge(parts: list[dict[str, Any]], options: argparse.Namespace) -> dict[str, Any]:
    """The figures of several processes as those of one load generator."""
    total: dict[str, Any] = {}
    for key in ("accepted", "rejected", "errors", "unsent", "sessions", "session_errors",
                "tls_sessions", "resumed"):  # fmt: skip
        total[key] = sum(part[key] for part in parts)
    started = min(part["started"] for part in parts)
    ended = max(part["ended"] for part in parts)
    wall = ended - started
    latencies = sorted(value for part in parts for value in part["latencies_s"])
    kinds: Counter[str] = Counter()
    for part in parts:
        kinds.update(part["error_kinds"])
    finishedSessions = total["sessions"] - total["session_errors"]

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 3)

    return {
        **total,
        "wall_seconds": round(wall, 3),
        "msgs_per_s": round(total["accepted"] / wall, 2) if wall > 0 else 0.0,
        "latency_p50_ms": ms(percentile(latencies, 0.50)),
        "latency_p99_ms": ms(percentile(latencies, 0.99)),
        "sessions_per_s": round(finishedSessions / wall, 2) if wall > 0 else 0.0,
        "client_cpu_s": round(sum(part["client_cpu_s"] for part in parts), 3),
        "processes": len(parts),
        "deadline_hit": any(part["deadline_hit"] for part in parts),
        "error_kinds": dict(kinds),
        "mode": options.mode,
        "auth": options.auth,
        "connections": options.connections,
        "per_connection": options.per_connection,
        "size": options.size,
        "started": started,
        "ended": ended,
        "latencies_s": None,
    }


def runProcesses(script: Path, argv: list[str], options: argparse.Namespace) -> dict[str, Any]:
    """
    Run the load in C{options.processes} child processes: each says it is
    ready, all start on one word, each prints its figures; merge them.
    """
    children = [
        subprocess.Popen(
            [sys.executable, str(script), *arguments],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        for arguments in childArguments(argv, options)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            if "ready" not in json.loads(child.stdout.readline() or b"{}"):
                raise RuntimeError("a load generator process did not start")
        for child in children:
            assert child.stdin is not None
            child.stdin.write(b"go\n")
            child.stdin.close()
        parts = []
        for child in children:
            assert child.stdout is not None
            output = child.stdout.read()
            if child.wait(timeout=options.deadline + 120) != 0:
                raise RuntimeError(f"a load generator process exited with {child.returncode}")
            parts.append(json.loads(output.splitlines()[-1]))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    return merge(parts, options)
