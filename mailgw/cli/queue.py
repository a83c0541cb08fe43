"""
``mailgw queue list|show|stats|flush|hold|release|delete``: the queue for
operators used to ``mailq``, ``postqueue`` and ``postsuper``.

The listing commands read the spool with L{SpoolReader}, which is safe while
the gateway runs. The others go through the running gateway's control socket
(L{mailgw.control}); when nothing listens there, ``hold``, ``release`` and
``delete`` change the spool directly, which its lock allows only while the
gateway is stopped. docs/queue-cli.md shows each command's output.
"""

from __future__ import annotations

import argparse
import collections
import fcntl
import json
import os
import re
import stat
import sys
import time
from typing import Any

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from mailgw.cli.errors import CommandError, Subparsers
from mailgw.config import ConfigError, configFromDict, readConfigFile
from mailgw.control import (
    MAX_IDS,
    ControlError,
    ControlUnavailable,
    defaultSocketPath,
    sendCommand,
)
from mailgw.envelope import QueuedMessage, RecipientState, RecipientStatus
from mailgw.queue.spool import Spool, SpoolError, SpoolReader, isQueueId
from mailgw.workers.shards import shardDirectories

DEFAULT_CONFIG_FILE = "/etc/mailgw/mailgw.toml"
#: How long to wait for the gateway's answer; deleting many messages fsyncs
#: the spool directory once per message.
CONTROL_TIMEOUT = 60.0
#: The most header bytes ``show`` reads from a message.
MAX_HEADER_BYTES = 1024 * 1024
AGE_BUCKETS = (("<1h", 3600.0), ("<1d", 86400.0), ("<5d", 5 * 86400.0), ("older", float("inf")))
_DENIED = "{}: permission denied (run this as the gateway's user or root)"
#: The time now; tests replace it.
_now = time.time

# What must not reach the operator's terminal raw from a message or a remote
# reply: C0/C1 controls (escape sequences) and bidirectional overrides.
_UNSAFE_IN_LINE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_UNSAFE_IN_TEXT = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02x}" if ord(match.group()) < 0x100 else "\ufffd"


def _held(m: QueuedMessage) -> str:
    if not m.held:
        return "no"
    return f"yes: {printable(m.holdReason)}" if m.holdReason else "yes"


def printable(text: str, multiline: bool = False) -> str:
    """
    ``text`` with what could drive a terminal escaped; tabs are kept, and
    newlines if ``multiline``.
    """
    return (_UNSAFE_IN_TEXT if multiline else _UNSAFE_IN_LINE).sub(_escape, text)


def addQueueParser(subparsers: Subparsers) -> None:
    """Add C{mailgw queue list|show|stats|flush|hold|release|delete}."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--spool",
        metavar="DIR",
        help="the spool directory (default: the [spool] directory of the configuration file)",
    )
    common.add_argument(
        "--config",
        metavar="FILE",
        default=DEFAULT_CONFIG_FILE,
        help=f"the configuration file (default: {DEFAULT_CONFIG_FILE})",
    )
    parser = subparsers.add_parser(
        "queue",
        help="list and manage the mail queue",
        description="List the mail queue, or flush, hold, release or delete messages.",
    )
    actions = parser.add_subparsers(title="actions", metavar="ACTION", required=True)

    def action(name: str, help: str, func: Any) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, parents=[common], help=help, description=help + ".")
        sub.set_defaults(func=func, action=name)
        return sub

    listing = action("list", "list the queued messages and their recipients", queueList)
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    show = action("show", "show a message's envelope, session, recipients and headers", queueShow)
    show.add_argument("id", metavar="ID")
    show.add_argument("--body", action="store_true", help="show the body too")
    stats = action("stats", "count messages by recipient state, domain and age", queueStats)
    stats.add_argument("--json", action="store_true", help="print a JSON object")
    flush = action(
        "flush",
        "try the messages now (all when no ID is given); needs the gateway running",
        queueControl,
    )
    flush.add_argument("ids", nargs="*", metavar="ID")
    flush.add_argument(
        "--domain",
        metavar="DOMAIN",
        help="only the messages for DOMAIN (@DOMAIN: its subdomains too), as ETRN",
    )
    for name, help in (
        ("hold", "stop trying messages until released"),
        ("release", "release held messages: they are tried now"),
        ("delete", "remove messages from the queue without a bounce"),
    ):
        sub = action(name, help, queueControl)
        sub.add_argument("ids", nargs="*" if name == "release" else "+", metavar="ID")
    releasing = actions.choices["release"]
    releasing.add_argument(
        "--account", metavar="ACCOUNT", help="release every held message of this account"
    )


def spoolDirectory(args: argparse.Namespace) -> str:
    """
    ``--spool``, else the ``[spool] directory`` of ``--config``. Only the
    [spool] section is read, so that a problem elsewhere in the file (or a
    relay password file only the gateway can read) does not hide the queue.
    """
    if args.spool:
        return str(args.spool)
    try:
        data = readConfigFile(args.config)
        config = configFromDict({"spool": data.get("spool", {})}, source=args.config)
    except ConfigError as e:
        raise CommandError(str(e)) from None
    return config.spool.directory


def spoolParts(directory: str) -> list[str]:
    """
    The spools in ``directory``: itself, and the shards of ``[server]
    workers`` (docs/operations.md), each read like a spool of its own.
    """
    return [directory, *shardDirectories(directory)]


def _checkSpool(directory: str) -> None:
    if shardDirectories(directory):
        return
    try:
        isSpool = stat.S_ISDIR(os.stat(os.path.join(directory, "queue")).st_mode)
    except PermissionError:
        raise CommandError(_DENIED.format(directory)) from None
    except OSError:
        isSpool = False
    if not isSpool:
        raise CommandError(f"{directory}: not a mailgw spool (no queue/ directory)")


def _spoolProblem(directory: str, error: SpoolError) -> CommandError:
    cause = error.__cause__
    if isinstance(cause, PermissionError):
        return CommandError(_DENIED.format(directory))
    return CommandError(f"{directory}: {error}")


def _pending(args: argparse.Namespace) -> list[QueuedMessage]:
    directory = spoolDirectory(args)
    _checkSpool(directory)
    messages: list[QueuedMessage] = []
    for part in spoolParts(directory):
        try:
            messages += SpoolReader(part).pending()
        except SpoolError as e:
            if part == directory and not os.path.isdir(os.path.join(part, "queue")):
                continue  # a sharded spool: the messages are in the shards
            raise _spoolProblem(part, e) from None
    return messages


def _corrupt(args: argparse.Namespace) -> int:
    return sum(SpoolReader(part).corrupt() for part in spoolParts(spoolDirectory(args)))


def _corruptNote(count: int) -> str:
    if not count:
        return ""
    return f"; {count} {'entry' if count == 1 else 'entries'} in corrupt/ (docs/spool.md)"


def formatAge(seconds: float) -> str:
    """``45s``, ``12m``, ``3h05m``, ``2d04h``: the short form of a duration."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def formatSize(size: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{size} bytes"


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(timestamp))


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _sender(message: QueuedMessage) -> str:
    sender = message.envelope.sender
    return "<>" if sender is None else printable(str(sender))


def lastError(recipient: RecipientState) -> str:
    """``code enhanced diagnostic @ remote`` of the last attempt, or ``""``."""
    parts = [
        str(recipient.code) if recipient.code else "",
        recipient.enhanced,
        recipient.diagnostic,
    ]
    text = " ".join(p for p in parts if p)
    if text and recipient.remote:
        text += f" @ {recipient.remote}"
    return printable(text)


def _nextTry(message: QueuedMessage, recipient: RecipientState, now: float) -> str:
    if recipient.status is not RecipientStatus.PENDING:
        return ""
    if message.held:
        return "held"
    if message.nextAttempt <= now:
        return "next: now"
    return f"next in {formatAge(message.nextAttempt - now)}"


def _recipientLines(message: QueuedMessage, now: float, indent: str) -> list[str]:
    width = min(40, max(len(str(r.address)) for r in message.recipients))
    lines = []
    for r in message.recipients:
        facts = ", ".join(
            f for f in (_plural(r.attempts, "attempt"), _nextTry(message, r, now)) if f
        )
        address = printable(str(r.address)).ljust(width)
        lines.append(f"{indent}{r.status.value:<9}  {address}  {facts}")
        if r.status is not RecipientStatus.DELIVERED and lastError(r):
            lines.append(f"{indent}{'':<9}  {lastError(r)}")
    return lines


def _messageJSON(message: QueuedMessage, now: float) -> dict[str, Any]:
    sender = message.envelope.sender

    def waiting(r: RecipientState) -> bool:
        return r.status is RecipientStatus.PENDING and not message.held

    return {
        "id": message.queueId,
        "size": message.size,
        "arrival": message.arrival,
        "age": max(0, int(now - message.arrival)),
        "sender": None if sender is None else str(sender),
        "held": message.held,
        "contentFilter": message.envelope.contentFilter or None,
        "holdReason": message.holdReason,
        "nextAttempt": message.nextAttempt,
        "recipients": [
            # The spool's own form of a recipient (status, attempts, last
            # reply...) and when it is tried next (null: not pending, or held).
            {**r.toJSON(), "nextAttempt": message.nextAttempt if waiting(r) else None}
            for r in message.recipients
        ],
    }


def _waitsForFilter(message: QueuedMessage) -> bool:
    """Marked for the content filter (docs/content-filter.md), and not a bounce."""
    return bool(message.envelope.contentFilter) and not message.isBounce


def queueList(args: argparse.Namespace) -> int:
    messages, now = _pending(args), _now()
    if args.json:
        print(json.dumps([_messageJSON(m, now) for m in messages], indent=1))
        return 0
    corrupt = _corrupt(args)
    if not messages:
        print("queue is empty" + _corruptNote(corrupt))
        return 0
    print(f"{'QUEUE ID':<20}  {'SIZE':>9}  {'AGE':<6}  SENDER")
    for m in messages:
        held = "  HELD" if m.held else ""
        if _waitsForFilter(m):
            held += f"  waiting for the filter {printable(m.envelope.contentFilter)}"
        age = formatAge(now - m.arrival)
        print(f"{m.queueId:<20}  {m.size:>9}  {age:<6}  {_sender(m)}{held}")
        print("\n".join(_recipientLines(m, now, "  ")))
    pending = sum(len(m.pendingRecipients) for m in messages)
    total = sum(m.size for m in messages)
    print(
        f"-- {_plural(len(messages), 'message')}, {formatSize(total)}, "
        f"{_plural(pending, 'recipient')} pending{_corruptNote(corrupt)}"
    )
    return 0


def _headers(reader: SpoolReader, queueId: str, body: bool) -> str:
    with reader.openMessage(queueId) as f:
        if body:
            data = f.read()
        else:
            lines = []
            size = 0
            for line in f:
                if line in (b"\r\n", b"\n") or size > MAX_HEADER_BYTES:
                    break
                lines.append(line)
                size += len(line)
            data = b"".join(lines)
    text = data.decode("utf-8", "replace").replace("\r\n", "\n")
    return printable(text, multiline=True)


def queueShow(args: argparse.Namespace) -> int:
    directory = spoolDirectory(args)
    _checkSpool(directory)
    reader, now = SpoolReader(directory), _now()
    for part in spoolParts(directory):
        if isQueueId(args.id) and os.path.exists(os.path.join(part, "queue", f"{args.id}.json")):
            reader = SpoolReader(part)  # the shard that holds it
    try:
        m = reader.load(args.id)
        text = _headers(reader, args.id, args.body)
    except KeyError:
        raise CommandError(f"unknown queue id {printable(args.id)}") from None
    except SpoolError as e:
        raise _spoolProblem(directory, e) from None
    env, s = m.envelope, m.session
    body = env.body.value + (", SMTPUTF8" if env.smtputf8 else "")
    if env.declaredSize is not None:
        body += f" (declared size {env.declaredSize})"
    client = s.clientAddress + (f" port {s.clientPort}" if s.clientPort is not None else "")
    if s.helo:
        client += f", HELO {s.helo}"
    tlsText = ", ".join(x for x in (s.tlsProtocol, s.tlsCipher) if x) or "none"
    if not m.pendingRecipients:
        nextTry = "-"
    elif m.held:
        nextTry = "held"
    else:
        wait = m.nextAttempt - now
        nextTry = _when(m.nextAttempt) + (f" (in {formatAge(wait)})" if wait > 0 else " (now)")
    rows = [
        ("Queue ID", m.queueId),
        ("Arrival", f"{_when(m.arrival)} ({formatAge(now - m.arrival)} ago)"),
        ("Size", f"{m.size} bytes"),
        ("Sender", _sender(m)),
        ("Body", body),
        ("Held", _held(m)),
        ("Next try", nextTry),
        ("Delay warning", "sent" if m.warned else "not sent"),
        ("User", s.user if s.user is not None else "(none)"),
        ("Client", client),
        ("TLS", tlsText),
        ("Listener", s.listener),
    ]
    if _waitsForFilter(m):
        rows.append(("Stage", f"waiting for the filter {env.contentFilter}"))
    for label, value in rows:
        print(f"{label + ':':<15}{printable(value)}")
    print("Recipients:")
    print("\n".join(_recipientLines(m, now, "  ")))
    print()
    print(text, end="" if text.endswith("\n") or not text else "\n")
    return 0


def _stats(messages: list[QueuedMessage], now: float) -> dict[str, Any]:
    states = {s.value: 0 for s in RecipientStatus}
    domains: dict[str, dict[str, int]] = collections.defaultdict(
        lambda: {s.value: 0 for s in RecipientStatus}
    )
    ages = {name: 0 for name, _ in AGE_BUCKETS}
    for m in messages:
        for r in m.recipients:
            states[r.status.value] += 1
            domains[r.address.domain.lower()][r.status.value] += 1
        age = now - m.arrival
        ages[next(name for name, limit in AGE_BUCKETS if age < limit)] += 1
    order = sorted(domains, key=lambda d: (-domains[d]["pending"], d))
    return {
        "messages": len(messages),
        "held": sum(1 for m in messages if m.held),
        "size": sum(m.size for m in messages),
        "recipients": states,
        "age": ages,
        "domains": {d: domains[d] for d in order},
    }


def queueStats(args: argparse.Namespace) -> int:
    stats = _stats(_pending(args), _now())
    stats["corrupt"] = _corrupt(args)
    if args.json:
        print(json.dumps(stats, indent=1))
        return 0
    print(f"messages:    {stats['messages']} ({stats['held']} held), {formatSize(stats['size'])}")
    if stats["corrupt"]:
        print(f"corrupt:     {stats['corrupt']} (unreadable entries kept in corrupt/)")
    print("recipients:  " + ", ".join(f"{n} {s}" for s, n in stats["recipients"].items()))
    print("age:         " + ", ".join(f"{b} {n}" for b, n in stats["age"].items()))
    if stats["domains"]:
        width = max(len("DOMAIN"), *(len(d) for d in stats["domains"]))
        print(f"\n{'DOMAIN':<{width}}  {'PENDING':>9}  {'DELIVERED':>9}  {'BOUNCED':>9}")
        for domain, n in stats["domains"].items():
            print(
                f"{printable(domain):<{width}}  {n['pending']:>9}  {n['delivered']:>9}  "
                f"{n['bounced']:>9}"
            )
    return 0


_DONE = {
    "flush": "scheduled {} for delivery",
    "hold": "held {}",
    "release": "released {}",
    "delete": "deleted {}",
}


def queueControl(args: argparse.Namespace) -> int:
    """``flush``, ``hold``, ``release``, ``delete``: through the gateway if it runs."""
    if args.action == "release" and (args.account is None) == (not args.ids):
        print("mailgw queue release: error: give queue ids or --account ACCOUNT", file=sys.stderr)
        return 2  # a usage error
    if args.action == "release" and args.account is not None:
        from mailgw.cli.account import releaseAccount

        return releaseAccount(args)
    directory = spoolDirectory(args)
    socketPath = defaultSocketPath(directory)
    command, ids = args.action, list(dict.fromkeys(args.ids))
    if getattr(args, "domain", None) is not None:
        return _flushDomain(socketPath, ids, args.domain)
    try:
        count, errors = _throughGateway(socketPath, command, ids)
    except ControlUnavailable:
        if command == "flush":
            raise CommandError(
                f"the gateway is not running (nothing listens on {socketPath}); flush "
                "needs it: the gateway tries every due message when it starts"
            ) from None
        count, errors = _inSpools(directory, socketPath, command, ids)
    except ControlError as e:
        raise CommandError(str(e)) from None
    if count or not errors:
        print(_DONE[command].format(_plural(count, "message")))
    if errors:
        raise CommandError("; ".join(errors))
    return 0


def _flushDomain(socketPath: str, ids: list[str], domain: str) -> int:
    """``flush --domain``: the queued mail for one domain, as ETRN (RFC 1985)."""
    if ids:
        raise CommandError("give either queue ids or --domain, not both")
    try:
        answer = sendCommand(socketPath, "flush-domain", timeout=CONTROL_TIMEOUT, domain=domain)
    except ControlUnavailable:
        raise CommandError(
            f"the gateway is not running (nothing listens on {socketPath}); flush needs it"
        ) from None
    except ControlError as e:
        raise CommandError(str(e)) from None
    if not answer["ok"]:
        raise CommandError(printable(str(answer.get("error", "failed"))))
    held = int(answer.get("held", 0))
    note = f" ({_plural(held, 'held message')} left alone)" if held else ""
    print(f"scheduled {_plural(int(answer.get('count', 0)), 'message')} for delivery{note}")
    return 0


def _throughGateway(path: str, command: str, ids: list[str]) -> tuple[int, list[str]]:
    count, errors = 0, []
    batches = [ids[i : i + MAX_IDS] for i in range(0, len(ids), MAX_IDS)] or [[]]
    for batch in batches:
        answer = sendCommand(path, command, batch, timeout=CONTROL_TIMEOUT)
        count += int(answer.get("count", 0))
        if not answer["ok"]:
            errors.append(printable(str(answer.get("error", "failed"))))
    return count, errors


def _runNow(f: Any, *args: Any) -> Deferred[Any]:
    return maybeDeferred(f, *args)


def _wait(d: Deferred[Any]) -> Any:
    # Spool calls run through _runNow, so their Deferreds have fired already.
    results: list[Any] = []
    d.addBoth(results.append)
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def _lockTaken(directory: str) -> bool:
    try:
        fd = os.open(os.path.join(directory, "lock"), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False  # no lock file: no gateway; otherwise opening the Spool tells
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases the probe's lock
    return False


def _inSpools(
    directory: str, socketPath: str, command: str, ids: list[str]
) -> tuple[int, list[str]]:
    """L{_inSpool} on the spool, or on each shard holding some of ``ids``."""
    shards = shardDirectories(directory)
    if not shards:
        return _inSpool(directory, socketPath, command, ids)
    count, left = 0, list(ids)
    for shard in shards:
        mine = [
            i
            for i in left
            if isQueueId(i) and os.path.exists(os.path.join(shard, "queue", f"{i}.json"))
        ]
        if mine:
            done, _ = _inSpool(shard, defaultSocketPath(shard), command, mine)
            count += done
            left = [i for i in left if i not in mine]
    if left:
        unknown = ", ".join(printable(i) for i in left)
        return count, [f"unknown queue id{'s' if len(left) > 1 else ''} {unknown}"]
    return count, []


def _inSpool(
    directory: str, socketPath: str, command: str, ids: list[str]
) -> tuple[int, list[str]]:
    """Carry out ``command`` on the spool itself: only while the gateway is stopped."""
    _checkSpool(directory)
    if _lockTaken(directory):
        raise CommandError(
            f"{directory}: the spool is locked by a running gateway, but nothing answers on "
            f"{socketPath}: it may be starting or stopping; try again, or check its log"
        )
    try:
        # The clock only times new messages, and none is written here.
        spool = Spool(directory, Clock(), _runNow)
    except SpoolError as e:
        raise _spoolProblem(directory, e) from None
    count, unknown = 0, []
    try:
        for queueId in ids:
            try:
                message = spool.load(queueId)
            except KeyError:
                unknown.append(printable(queueId))
                continue
            if command == "hold":
                _wait(spool.update(attrs.evolve(message, held=True)))
            elif command == "release":
                released = attrs.evolve(message, held=False, holdReason="", nextAttempt=_now())
                _wait(spool.update(released))
            else:
                _wait(spool.remove(queueId))
            count += 1
    except SpoolError as e:
        raise _spoolProblem(directory, e) from None
    finally:
        spool.close()
    if unknown:
        return count, [f"unknown queue id{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}"]
    return count, []
