"""
The machinery under L{mailgw.config}: the error type, the value converters
and the reader that walks one TOML table and notices unknown keys.

Private: import the public names (L{ConfigError}, L{readConfigFile},
L{mergeOverrides}) from L{mailgw.config}.
"""

from __future__ import annotations

import copy
import difflib
import ipaddress
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.internet import endpoints


class ConfigError(ValueError):
    """A configuration problem: permanent until the operator fixes it."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        super().__init__(source, key, problem)
        self.source, self.key, self.problem = source, key, problem

    def __str__(self) -> str:
        return f"{self.source}: {self.key}: {self.problem}"


class _Invalid(Exception):
    """A value converter's complaint; L{_Table} adds the source and key."""


# Value converters: each returns the value or raises _Invalid(problem).


def _integer(minimum: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise _Invalid(f"must be an integer >= {minimum}, got {value!r}")
        return value

    return convert


_SIZE = re.compile(r"\s*(\d+)\s*([KMG]?)i?B?\s*", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def _size(minimum: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        octets = value
        if isinstance(value, str) and (m := _SIZE.fullmatch(value)):
            octets = int(m.group(1)) * _UNITS[m.group(2).upper()]
        if isinstance(octets, bool) or not isinstance(octets, int) or octets < minimum:
            raise _Invalid(
                f"must be a size in octets >= {minimum} (an integer, or a string "
                f"such as '64K' or '35M'), got {value!r}"
            )
        return octets

    return convert


def _duration(allowZero: bool = False) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or value < 0 or (value == 0 and not allowZero):
            bound = ">= 0" if allowZero else "> 0"
            raise _Invalid(f"must be a number of seconds {bound}, got {value!r}")
        return value

    return convert


def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise _Invalid(f"must be a number from 0 to 1, got {value!r}")
    return float(value)


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"must be true or false, got {value!r}")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, got {value!r}")
    return value


def _stringList(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _Invalid(f"must be a list of non-empty strings, got {value!r}")
    return tuple(value)


def _choice(*choices: str, fold: bool = False) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        for choice in choices:
            if value == choice or (fold and isinstance(value, str) and value.upper() == choice):
                return choice
        raise _Invalid(f"must be one of {', '.join(map(repr, choices))}, got {value!r}")

    return convert


def _hostname(value: Any) -> str:
    name = _string(value)
    labels = name.rstrip(".").split(".")
    valid = all(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", x) for x in labels)
    if name and (len(name) > 253 or not valid):
        raise _Invalid(f"must be a host name such as 'mail.example.org', got {value!r}")
    return name


def _listeners(value: Any) -> tuple[str, ...]:
    descriptions = _stringList(value)
    for description in descriptions:
        if description.split(":", 1)[0].lower() in ("ssl", "tls"):
            raise _Invalid(f"give a plain endpoint such as 'tcp:465', got {description!r}")
        if description.split(":", 1)[0].lower() == "haproxy":
            # Twisted's haproxy: endpoint believes a PROXY header from any peer.
            raise _Invalid(
                f"haproxy: endpoints trust every peer; use a plain endpoint and "
                f"[proxy] trusted instead, got {description!r}"
            )
        if description.split(":", 1)[0].lower() == "systemd":
            continue  # parsing it looks up the inherited sockets, present only under systemd
        try:
            # Parsing builds an endpoint object without listening; a reactor
            # is only needed to listen, so none is given here.
            endpoints.serverFromString(None, description)
        except Exception as e:
            raise _Invalid(f"not a Twisted endpoint string: {description!r} ({e})") from None
    return descriptions


def _nonEmpty(value: Any) -> str:
    if not _string(value):
        raise _Invalid("must not be empty")
    return value


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(value: Any) -> tuple[Network, ...]:
    """
    A list of networks in CIDR notation (``"192.0.2.0/24"``, ``"2001:db8::/32"``)
    or single addresses (``"192.0.2.7"`` means ``/32``); a network with host
    bits set is refused rather than silently widened.
    """
    networks = []
    for text in _stringList(value):
        try:
            networks.append(ipaddress.ip_network(text))
        except ValueError:
            try:
                wide = ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise _Invalid(
                    f"must be a list of CIDR networks or addresses such as '192.0.2.0/24', "
                    f"'2001:db8::/32' or '192.0.2.7', got {text!r}"
                ) from None
            raise _Invalid(f"{text!r} has host bits set; did you mean '{wide}'?") from None
    return tuple(networks)


@attrs.define
class _Table:
    """One TOML table being read: tracks which keys were used."""

    source: str
    prefix: str
    data: dict[str, Any]
    used: set[str] = attrs.field(factory=set)

    @classmethod
    def of(cls, source: str, prefix: str, value: Any) -> _Table:
        if not isinstance(value, dict):
            raise ConfigError(source, prefix, f"must be a table, got {value!r}")
        return cls(source, prefix, value)

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.source, self.key(name), problem)

    def get(self, name: str, convert: Callable[[Any], Any], default: Any) -> Any:
        self.used.add(name)
        if name not in self.data:
            return default
        try:
            return convert(self.data[name])
        except _Invalid as e:
            raise self.error(name, str(e)) from None

    def table(self, name: str) -> _Table:
        self.used.add(name)
        return _Table.of(self.source, self.key(name), self.data.get(name, {}))

    def finish(self) -> None:
        for name in self.data:
            if name not in self.used:
                near = difflib.get_close_matches(name, sorted(self.used), n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise self.error(name, f"unknown key{hint}")


def readConfigFile(path: str) -> dict[str, Any]:
    """
    The parsed TOML of ``path``, for callers that merge in other options
    (see L{mergeOverrides}) before L{configFromDict}.

    @raise ConfigError: unreadable, not UTF-8, or a TOML syntax error (the
        key part of the error names the line).
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(path, "file", f"cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(path, f"line {line}", "not UTF-8 text") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message = str(e)
        m = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
        if m:
            where = f"line {m.group(1)}"
            message = f"TOML syntax error: {message[: m.start()]} (column {m.group(2)})"
        else:  # "(at end of document)"
            where = f"line {text.count(chr(10)) + 1}"
            message = f"TOML syntax error: {message}"
        raise ConfigError(path, where, message) from None


def mergeOverrides(data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """
    A deep copy of ``data`` with each dotted key of ``overrides`` (e.g.
    ``{"tls.certificate": "/x.pem", "relay.tls": "none"}``) set, replacing
    what the file said; the result goes to L{configFromDict}.
    """
    merged = copy.deepcopy(dict(data))
    for dotted, value in overrides.items():
        *path, last = dotted.split(".")
        table = merged
        for name in path:
            if not isinstance(table.get(name), dict):
                table[name] = {}
            table = table[name]
        table[last] = value
    return merged
