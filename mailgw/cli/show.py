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
from typing import Any

import attrs

from mailgw.cli.errors import CommandError

DEFAULT_CONFIG = "/etc/mailgw/mailgw.toml"

_SECTIONS = (
    "server",
    "tls",
    "auth",
    "spool",
    "queue",
    "limits",
    "policy",
    "proxy",
    "metrics",
    "breaker",
)


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
    if attrs.has(type(value)):  # a Smarthost
        return _value(str(value))
    # A JSON string is a valid TOML basic string.
    return json.dumps(str(value), ensure_ascii=False)


def _table(header: str, value: Any, default: Any, changed: bool) -> list[str]:
    lines = []
    for field in attrs.fields(type(value)):
        mine = getattr(value, field.name)
        if changed and default is not None and mine == getattr(default, field.name):
            continue
        lines.append(f"{_key(field.name)} = {_value(mine)}")
    if changed and not lines:
        return []
    return [f"[{header}]", *lines, ""]


def render(config: Any, changed: bool = False) -> str:
    """``config`` as TOML; only what differs from the defaults when ``changed``."""
    from mailgw.config import Config, Route

    defaults = Config()
    lines: list[str] = []
    for section in _SECTIONS:
        lines += _table(section, getattr(config, section), getattr(defaults, section), changed)
    if config.relay.default is not None:
        lines += _table("relay", config.relay.default, Route(), changed)
    for domain, route in sorted(config.relay.domains.items()):
        lines += _table(f"relay.domains.{json.dumps(domain)}", route, Route(), changed)
    return "\n".join(lines)


def showConfig(args: argparse.Namespace) -> int:
    from mailgw.config import ConfigError, loadConfig

    try:
        config = loadConfig(args.config)
    except ConfigError as e:
        raise CommandError(str(e)) from None
    sys.stdout.write(f"# mailgw: effective configuration of {args.config}\n")
    sys.stdout.write(render(config, changed=args.changed))
    return 0
