"""
``mailgw check-config``: run every start-up check of ``twistd mailgw``
without starting, so an operator (or systemd's ExecStartPre) learns of a
mistake before the gateway is restarted.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mailgw.cli import CommandError

DEFAULT_CONFIG = "/etc/mailgw/mailgw.toml"


def addCheckConfigParser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "check-config",
        help="check a configuration file as twistd mailgw would at start-up",
        description="Load the configuration, its certificate and key, auth backends, "
        "sender map and relay CA files, as twistd mailgw does at start-up; print the "
        "first problem (file, key, problem) or 'ok'.",
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"default {DEFAULT_CONFIG}")
    parser.set_defaults(func=checkConfig)


def checkConfig(args: argparse.Namespace) -> int:
    from mailgw.config import ConfigError, loadConfig
    from mailgw.service import makeCheckers, makePolicy

    try:
        config = loadConfig(args.config)
        config.check()
        makeCheckers(config)
        makePolicy(config, clock=None)
    except ConfigError as e:
        raise CommandError(str(e)) from None
    listeners = len(config.server.submission) + len(config.server.submissions)
    relay = "no relay route" if config.relay.default is None else "a default relay route"
    sys.stdout.write(
        f"{args.config}: ok ({listeners} listener(s), {len(config.auth.backends)} auth "
        f"backend(s), {relay}, {len(config.relay.domains)} domain route(s))\n"
    )
    return 0
