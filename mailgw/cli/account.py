"""
``mailgw account show|reset ACCOUNT``: what the account breaker knows of an
account and why it tripped, and re-arming it after review
(docs/breaker.md); and ``mailgw queue release --account ACCOUNT``, which
relays the account's held mail.

Each goes through the running gateway's control socket; when nothing
listens there, ``show`` reads the breaker's state file, and ``reset`` and
``release`` change the state file or the spool themselves (only while the
gateway is stopped).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from twisted.internet.task import Clock

from mailgw.breaker.breaker import AccountBreaker
from mailgw.breaker.config import BreakerConfig
from mailgw.breaker.store import STATE_NAME, CorruptState, StateFile
from mailgw.cli import queue as queuecli
from mailgw.cli.errors import CommandError, Subparsers
from mailgw.config import ConfigError, configFromDict, readConfigFile
from mailgw.control import ControlError, ControlUnavailable, defaultSocketPath, sendCommand

CONTROL_TIMEOUT = 60.0


def addAccountParser(subparsers: Subparsers) -> None:
    """Add C{mailgw account show|reset}."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--spool", metavar="DIR", help="the spool directory (default: the "
                        "[spool] directory of the configuration file)")  # fmt: skip
    common.add_argument(
        "--config",
        metavar="FILE",
        default=queuecli.DEFAULT_CONFIG_FILE,
        help=f"the configuration file (default: {queuecli.DEFAULT_CONFIG_FILE})",
    )
    common.add_argument("account", metavar="ACCOUNT", help="the login, as the backend knows it")
    parser = subparsers.add_parser(
        "account",
        help="show or re-arm an account of the breaker",
        description="Show what the account breaker knows of an account, or re-arm it.",
    )
    actions = parser.add_subparsers(title="actions", metavar="ACTION", required=True)
    show = actions.add_parser(
        "show", parents=[common], help="the account's trip, last hour, baseline and rules"
    )
    show.add_argument("--json", action="store_true", help="print a JSON object")
    show.set_defaults(func=accountShow)
    reset = actions.add_parser(
        "reset", parents=[common], help="re-arm a tripped account (its held mail stays held)"
    )
    reset.set_defaults(func=accountReset)


def _ask(args: argparse.Namespace, command: str) -> dict[str, Any] | None:
    """The gateway's answer, or None when it is not running."""
    path = defaultSocketPath(queuecli.spoolDirectory(args))
    try:
        return sendCommand(path, command, [args.account], timeout=CONTROL_TIMEOUT)
    except ControlUnavailable:
        return None
    except ControlError as e:
        raise CommandError(str(e)) from None


def _breakerConfig(args: argparse.Namespace) -> BreakerConfig:
    """The [breaker] section of ``--config`` (the defaults when it cannot be read)."""
    try:
        data = readConfigFile(args.config)
        return configFromDict({"breaker": data.get("breaker", {})}, args.config).breaker
    except ConfigError:
        return BreakerConfig()


def _offline(args: argparse.Namespace) -> tuple[AccountBreaker, StateFile]:
    """The stored breaker (the gateway is stopped); its settings are the defaults."""
    directory = queuecli.spoolDirectory(args)
    state = StateFile(os.path.join(directory, STATE_NAME))
    clock = Clock()
    clock.advance(queuecli._now())
    breaker = AccountBreaker(clock, _breakerConfig(args))
    try:
        breaker.restore(state.read())
    except CorruptState as e:
        raise CommandError(f"{state.path}: {e}") from None
    except OSError as e:
        raise CommandError(f"{state.path}: {e.strerror or e}") from None
    return breaker, state


def accountShow(args: argparse.Namespace) -> int:
    answer = _ask(args, "account-show")
    if answer is None:
        state = _offline(args)[0].state(args.account)
        if state is None:
            raise CommandError(f"unknown account {queuecli.printable(args.account)}")
        state["note"] = "the gateway is not running: read from its state file"
    elif not answer["ok"]:
        raise CommandError(queuecli.printable(str(answer.get("error", "failed"))))
    else:
        state = answer["account"]
    if args.json:
        print(json.dumps(state, indent=2, sort_keys=True))
    else:
        print(formatState(state))
    return 0


def formatState(state: dict[str, Any]) -> str:
    """``mailgw account show`` for humans."""
    p = queuecli.printable
    lines = []
    trip = state.get("trip")
    name = p(str(state["account"]))
    if trip:
        lines.append(
            f"{name}: TRIPPED at {trip['time']} by rule {trip['rule']} ({state['action']}); "
            f"{state['held']} messages held since"
        )
        lines.append(f"  {p(str(trip['text']))}")
        lines.append(f"  client {p(str(trip['client'] or '-'))}, queue id {trip['queueId'] or '-'}")
    else:
        lines.append(f"{name}: armed")
    f = state["figures"]
    lines.append(
        f"first seen {state['firstSeen']}, last seen {state['lastSeen']}; {f['history']} active "
        f"hours learnt, {state['domains']} recipient domains"
    )
    lines.append("client networks: " + (", ".join(state["networks"]) or "none"))
    lines.append("the rules on the last hour:")
    lines += [f"  {p(str(c['text']))}" for c in state["checks"]]
    if state.get("note"):
        lines.append(f"({state['note']})")
    return "\n".join(lines)


def accountReset(args: argparse.Namespace) -> int:
    answer = _ask(args, "account-reset")
    if answer is None:
        directory = queuecli.spoolDirectory(args)
        if queuecli._lockTaken(directory):
            raise CommandError(f"{directory}: the spool is locked by a running gateway, but it "
                               "does not answer on its control socket; try again")  # fmt: skip
        breaker, state = _offline(args)
        try:
            wasTripped = breaker.reset(args.account)
        except KeyError:
            raise CommandError(f"unknown account {queuecli.printable(args.account)}") from None
        try:
            state.write(breaker.toJSON())
        except OSError as e:
            raise CommandError(f"{state.path}: {e.strerror or e}") from None
    elif not answer["ok"]:
        raise CommandError(queuecli.printable(str(answer.get("error", "failed"))))
    else:
        wasTripped = bool(answer.get("wasTripped"))
    what = "re-armed" if wasTripped else "was not tripped; its window starts afresh"
    print(f"{queuecli.printable(args.account)}: {what}")
    return 0


def releaseAccount(args: argparse.Namespace) -> int:
    """``mailgw queue release --account ACCOUNT``."""
    answer = _ask(args, "release-account")
    if answer is None:
        directory = queuecli.spoolDirectory(args)
        ids = [
            m.queueId for m in queuecli._pending(args) if m.held and m.session.user == args.account
        ]
        count, errors = queuecli._inSpool(directory, defaultSocketPath(directory), "release",
                                          ids)  # fmt: skip
    else:
        count = int(answer.get("count", 0))
        errors = [] if answer["ok"] else [queuecli.printable(str(answer.get("error")))]
    print(f"released {queuecli._plural(count, 'message')} of "
          f"{queuecli.printable(args.account)}")  # fmt: skip
    if errors:
        raise CommandError("; ".join(errors))
    return 0
