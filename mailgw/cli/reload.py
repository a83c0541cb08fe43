"""
``mailgw reload``: the running gateway reads its configuration, certificate
and key, users and sender maps and relay files again (as ``kill -HUP``),
through its control socket, and says whether it applied or refused them.
"""

from __future__ import annotations

import argparse
from typing import Any

from mailgw.cli.errors import CommandError
from mailgw.cli.queue import DEFAULT_CONFIG_FILE, spoolDirectory
from mailgw.control import ControlError, defaultSocketPath, sendCommand

#: Reading a users file of many entries and a certificate takes a moment.
RELOAD_TIMEOUT = 60.0


def addReloadParser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "reload",
        help="make the running gateway read its configuration again",
        description=(
            "Make the running gateway read its configuration file, certificate and key, "
            "users and sender maps again (as SIGHUP does). Exits 1 when the gateway "
            "refused the new configuration (its log says why) or is not running."
        ),
    )
    parser.add_argument(
        "--spool",
        metavar="DIR",
        help="the spool directory (default: the [spool] directory of the configuration file)",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=DEFAULT_CONFIG_FILE,
        help=f"the configuration file (default: {DEFAULT_CONFIG_FILE})",
    )
    parser.set_defaults(func=reload)


def reload(args: argparse.Namespace) -> int:
    path = defaultSocketPath(spoolDirectory(args))
    try:
        answer = sendCommand(path, "reload", timeout=RELOAD_TIMEOUT)
    except ControlError as e:
        raise CommandError(str(e)) from None
    if not answer["ok"]:
        raise CommandError(str(answer.get("error", "reload failed")))
    print("reloaded")
    return 0
