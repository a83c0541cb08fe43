"""
``mailgw explain QUEUE-ID`` and ``mailgw explain --session CLIENT-ADDR``:
the decision trace of a message or of a client's sessions, read from the
gateway's JSON log (``--log-format json``; docs/operations.md). ``--log``
names the log file (repeatable); its rotated files beside it (``FILE.1``,
``FILE.2.gz``, ``FILE-20261129`` ...) are read too, oldest first.
``--json`` prints the trace as JSON for tools.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import IO, Any

from mailgw import tracing
from mailgw.cli.errors import CommandError
from mailgw.queue.spool import isQueueId

_ROTATED = re.compile(r"[.-]\d+(\.gz)?\Z")


def addExplainParser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="why a message or session went as it did, from the JSON log",
        description=(
            "Print the decision trace of a message (listener, TLS, login and backend, "
            "sender policy, limits, route, every attempt and its reply) or of a client's "
            "sessions, from the gateway's JSON log (twistd mailgw --log-format json)."
        ),
    )
    parser.add_argument("queueId", nargs="?", metavar="QUEUE-ID", help="the message's queue id")
    parser.add_argument(
        "--session", metavar="CLIENT-ADDR", help="every session of this client address instead"
    )
    parser.add_argument(
        "--log",
        action="append",
        required=True,
        metavar="FILE",
        help="the gateway's JSON log file (repeatable); its rotated files are read too",
    )
    parser.add_argument("--json", action="store_true", help="print the trace as JSON")
    parser.set_defaults(func=explain)


def logFiles(path: str) -> list[str]:
    """``path`` and its rotated files, oldest first (by modification time)."""
    found = [p for p in glob.glob(glob.escape(path) + "[.-]*") if _ROTATED.search(p[len(path) :])]
    found.sort(key=lambda p: (os.stat(p).st_mtime, p), reverse=False)
    if os.path.exists(path):
        found.append(path)
    if not found:
        raise CommandError(f"{path}: no such log file")
    return found


def _open(path: str) -> IO[str]:
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def readEvents(paths: list[str], keep: Callable[[tracing.Event], bool]) -> Iterator[tracing.Event]:
    """The JSON events of ``paths`` that ``keep`` wants; other lines are skipped."""
    for path in paths:
        try:
            with _open(path) as f:
                for line in f:
                    if not line.startswith("{"):
                        continue
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(event, dict) and keep(event):
                        yield event
        except (OSError, EOFError) as e:
            raise CommandError(f"{path}: {getattr(e, 'strerror', None) or e}") from None


def explain(args: argparse.Namespace) -> int:
    if (args.queueId is None) == (args.session is None):
        raise CommandError("give a QUEUE-ID or --session CLIENT-ADDR (one of them)")
    paths = [p for log in args.log for p in logFiles(log)]
    if args.queueId is not None:
        if not isQueueId(args.queueId):
            raise CommandError(f"not a queue id: {args.queueId[:40]!r}")
        trace = traceMessage(paths, args.queueId)
        if trace is None:
            raise CommandError(f"no event of {args.queueId} in {', '.join(args.log)}")
        sys.stdout.write(json.dumps(trace, indent=2) + "\n" if args.json else messageText(trace))
        return 0
    client = traceClient(paths, args.session)
    if not client["sessions"] and not client["events"]:
        raise CommandError(f"no session of {args.session[:64]!r} in {', '.join(args.log)}")
    sys.stdout.write(json.dumps(client, indent=2) + "\n" if args.json else clientText(client))
    return 0


def traceMessage(paths: list[str], queueId: str) -> tracing.Event | None:
    """Two passes: the message's own events, then its session's too."""
    sessions = {
        e["session"]
        for e in readEvents(paths, lambda e: queueId in tracing.queueIdsOf(e))
        if isinstance(e.get("session"), str)
    }
    events = list(readEvents(paths, lambda e: bool(tracing.wanted([e], {queueId}, sessions))))
    return tracing.messageTrace(events, queueId)


def traceClient(paths: list[str], client: str) -> tracing.Event:
    """Three passes: the client's sessions, the messages they queued, then everything."""
    sessions = set(
        tracing.sessionsOf(readEvents(paths, lambda e: tracing.eventClient(e) == client), client)
    )
    queued = {
        e["queueId"]
        for e in readEvents(paths, lambda e: e.get("session") in sessions)
        if tracing.kind(e) == tracing.QUEUED and isinstance(e.get("queueId"), str)
    }

    def keep(e: tracing.Event) -> bool:
        loose = "session" not in e and tracing.eventClient(e) == client
        return loose or bool(tracing.wanted([e], queued, sessions))

    return tracing.clientTrace(list(readEvents(paths, keep)), client)


# -- text for a human ---------------------------------------------------------


def _quota(quota: Any) -> str:
    if not isinstance(quota, dict):
        return "no quota counted (none configured, or no login)"
    parts = []
    for what in ("messages", "recipients"):
        limit = quota.get(f"{what}Limit")
        if limit:
            parts.append(f"{what} {quota.get(what)}/{limit}")
    if not parts:
        return "no quota configured"
    return "quota " + ", ".join(parts) + f" per {quota.get('window')} s"


def _login(login: Any) -> str:
    if not isinstance(login, dict):
        return "-"
    text = f"{login.get('user')}"
    if login.get("mech"):
        text += f" with {login['mech']}"
    if login.get("backend"):
        text += f", backend {login['backend']}"
    return text


def messageText(trace: tracing.Event) -> str:
    out = [f"Message {trace['queueId']}"]
    received = trace.get("received")
    if received is None:
        out.append("  (its queued line is not in the log: rotated away, or another log)")
    else:
        out += [
            f"  queued      {received['time']}",
            f"  listener    {received['listener']} (client {received['client']})",
            f"  TLS         {received['tls']}",
            f"  login       {_login(received.get('login')) if received.get('login') else received['user']}",  # noqa: E501
            f"  sender      <{received['sender']}> allowed by {received['policy']}",
            f"  limits      {_quota(received['quota'])}",
            f"  recipients  {', '.join(f'<{r}>' for r in received['recipients'] or [])}",
            f"  size        {received['size']} octets, Message-ID {received['messageId']}",
        ]
    session = trace.get("session")
    if session is not None:
        out.append(f"  session     {session['session']}: {_sessionLine(session)}")
        for login in session["logins"]:
            mark = "ok" if login["ok"] else "FAILED"
            out.append(f"    {login['time']}  AUTH {mark}: {_login(login)}")
        for event in session["events"]:
            out.append(f"    {event['time']}  {event['text']}")
    out.append("  attempts" if trace["attempts"] else "  attempts    none logged yet")
    for a in trace["attempts"]:
        out.append(
            f"    {a['time']}  <{a['to']}> {a['status']}: route {a['route']}, "
            f"relay {a['relay']}, TLS {a['tls']}"
        )
        out.append(f"        reply: {a['reply']}")
    if trace["events"]:
        out.append("  events")
        for event in trace["events"]:
            out.append(f"    {event['time']}  {event['text']}")
    return "\n".join(out) + "\n"


def _sessionLine(session: tracing.Event) -> str:
    text = f"listener {session['listener']}, TLS {session['tls']}, client {session['client']}"
    if session["outcome"]:
        text += f", ended {session['end']} ({session['outcome']})"
    return text


def clientText(trace: tracing.Event) -> str:
    out = [f"Client {trace['client']}: {len(trace['sessions'])} session(s)"]
    for session in trace["sessions"]:
        out.append("")
        out.append(f"Session {session['session']} from {session['start']}")
        out.append(f"  {_sessionLine(session)}")
        if session["commands"]:
            counts = ", ".join(f"{k}={v}" for k, v in session["commands"].items())
            out.append(f"  commands    {counts}")
        for login in session["logins"]:
            mark = "ok" if login["ok"] else "FAILED"
            out.append(f"  {login['time']}  AUTH {mark}: {_login(login)}")
        for event in session["events"]:
            out.append(f"  {event['time']}  {event['text']}")
        for message in session["messages"]:
            if message is not None:
                out.append("")
                out += ["  " + line for line in messageText(message).splitlines()]
    if trace["events"]:
        out.append("")
        out.append("Outside a session")
        for event in trace["events"]:
            out.append(f"  {event['time']}  {event['text']}")
    return "\n".join(out) + "\n"
