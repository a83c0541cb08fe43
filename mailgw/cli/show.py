"""
``mailgw show-config``: the effective configuration, every setting with the
value the gateway would run with (the file's, else the default), as TOML
that ``--config`` accepts again. ``--changed`` prints only the settings
that differ from the defaults (as ``postconf -n`` does).
"""

from __future__ import annotations

import argparse
import enum
import ipaddress
import json
import re
import sys
from collections.abc import Mapping
from typing import Any

import attrs

from mailgw.cli.errors import CommandError

DEFAULT_CONFIG = "/etc/mailgw/mailgw.toml"

_SECTIONS: tuple[str, ...] = ("server", "tls", "auth", "spool", "queue", "limits", "policy")
_SECTIONS += ("proxy", "metrics", "api", "webhooks", "reinject", "etrn", "milter", "breaker")


def addShowConfigParser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "show-config",
        help="print the effective configuration",
        description="Print every setting the gateway would run with, as TOML.",
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"default {DEFAULT_CONFIG}")
    parser.add_argument(
        "--changed", action="store_true", help="only the settings that differ from the defaults"
    )
    parser.set_defaults(func=showConfig)


def _key(name: str) -> str:
    """A Config attribute's name as the file spells it (maxMessageSize: max_message_size)."""
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def _value(value: Any) -> str:
    if value is None:  # an unset choice (a route's tls_level)
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return _value(value.value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return _value(str(value))
    if hasattr(value, "toTOML"):  # a milter: an inline table
        return str(value.toTOML())
    if attrs.has(type(value)):  # a Smarthost
        return _value(str(value))
    # A JSON string is a valid TOML basic string.
    return json.dumps(str(value), ensure_ascii=False)


def _table(header: str, value: Any, default: Any, changed: bool) -> list[str]:
    lines = []
    for field in attrs.fields(type(value)):
        mine = getattr(value, field.name)
        if isinstance(mine, Mapping):  # a table of its own, rendered by render()
            continue
        if changed and default is not None and mine == getattr(default, field.name):
            continue
        lines.append(f"{_key(field.name)} = {_value(mine)}")
    if changed and not lines:
        return []
    return [f"[{header}]", *lines, ""]


def _filterTable(value: Any, default: Any, changed: bool) -> list[str]:
    """[filter]: its one address is three fields, its patterns compiled."""
    keys = {
        "content_filter": (value.name, default.name),
        "hold_replies": (
            [p.pattern for p in value.holdReplies],
            [p.pattern for p in default.holdReplies],
        ),
        "connect_timeout": (value.connectTimeout, default.connectTimeout),
        "reply_timeout": (value.replyTimeout, default.replyTimeout),
        "max_connections": (value.maxConnections, default.maxConnections),
    }
    lines = [f"{k} = {_value(v)}" for k, (v, d) in keys.items() if not (changed and v == d)]
    return ["[filter]", *lines, ""] if lines else []


def render(config: Any, changed: bool = False) -> str:
    """``config`` as TOML; only what differs from the defaults when ``changed``."""
    from mailgw.config import Config, Route

    defaults = Config()
    lines: list[str] = []
    for section in _SECTIONS:
        lines += _table(section, getattr(config, section), getattr(defaults, section), changed)
    lines += _filterTable(config.filter, defaults.filter, changed)
    if config.relay.default is not None:
        lines += _table("relay", config.relay.default, _routeDefault(config.relay.default), changed)
    for domain, route in sorted(config.relay.domains.items()):
        lines += _table(f"relay.domains.{json.dumps(domain)}", route, _routeDefault(route), changed)
    for sender, route in sorted(config.relay.senders.items()):
        lines += _table(f"relay.senders.{json.dumps(sender)}", route, Route(), changed)
    for entry in config.dkim.domains:  # every key: three of them have no default
        lines += _table("[dkim.domains]", entry, None, False)
    if config.policy.recipientDomains:
        lines.append("[policy.recipient_domains]")
        for user, domains in sorted(config.policy.recipientDomains.items()):
            lines.append(f"{json.dumps(user)} = {_value(domains)}")
        lines.append("")
    return "\n".join(lines)


def _routeDefault(route: Any) -> Any:
    """What a route's table with no keys but ``mx`` means: MX routes default
    to tls_level "may" and MTA-STS."""
    from mailgw.config import Route, TLSLevel, TLSMode

    if not route.mx:
        return Route()
    if route.tlsLevel is None:
        # Only a written ``tls`` keeps an MX route's older meaning: always show it.
        other = TLSMode.NONE if route.tls is not TLSMode.NONE else TLSMode.STARTTLS
        return Route(tls=other, mtaSts=True)
    return Route(tlsLevel=TLSLevel.MAY, mtaSts=True)


def showConfig(args: argparse.Namespace) -> int:
    from mailgw.config import ConfigError, loadConfig

    try:
        config = loadConfig(args.config)
    except ConfigError as e:
        raise CommandError(str(e)) from None
    sys.stdout.write(f"# mailgw: effective configuration of {args.config}\n")
    sys.stdout.write(render(config, changed=args.changed))
    return 0
