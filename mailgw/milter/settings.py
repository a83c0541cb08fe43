"""
The ``[milter]`` section: which milters, in which order, with which
deadlines and what to do when one is down (Postfix's ``smtpd_milters``,
``milter_*_timeout`` and ``milter_default_action``).

Addresses are in Postfix's notation: ``inet:HOST:PORT`` (``inet:[::1]:PORT``
for IPv6; Sendmail's ``inet:PORT@HOST`` is accepted too) and
``unix:PATH``.
"""

from __future__ import annotations

import json
import re
from typing import Any

import attrs

from mailgw._configparse import _choice, _duration, _Invalid, _Table

#: What a milter that is down, too slow or broken makes of the command.
DEFAULT_ACTIONS = ("tempfail", "accept", "reject")

_INET = re.compile(
    r"inet6?:(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.\-]+)):(?P<port>\d+)\Z"
)
_SENDMAIL_INET = re.compile(r"inet6?:(?P<port>\d+)@(?P<host>\[?[A-Za-z0-9.:\-]+\]?)\Z")


@attrs.frozen
class MilterServer:
    """
    One milter. ``address`` as configured (for the log), ``endpoint`` the
    Twisted client endpoint string. Times are seconds: ``connectTimeout``
    for the connection and the option negotiation, ``commandTimeout`` for
    each SMTP command's step, ``contentTimeout`` for each header or body
    chunk and for the end of message (below ``[server] idle_timeout``, or
    the session's own deadline ends the wait first).
    """

    address: str
    endpoint: str
    connectTimeout: float = 30.0
    commandTimeout: float = 30.0
    contentTimeout: float = 120.0
    defaultAction: str = "tempfail"

    def toTOML(self) -> str:
        """This milter as a TOML inline table (``mailgw show-config``)."""
        return (
            f"{{ address = {json.dumps(self.address)}, "
            f"connect_timeout = {self.connectTimeout!r}, "
            f"command_timeout = {self.commandTimeout!r}, "
            f"content_timeout = {self.contentTimeout!r}, "
            f"default_action = {json.dumps(self.defaultAction)} }}"
        )


@attrs.frozen
class MilterConfig:
    servers: tuple[MilterServer, ...] = ()


def endpointFor(address: Any) -> str:
    """The Twisted client endpoint string for a milter address."""
    if not isinstance(address, str):
        raise _Invalid(f"must be a string like inet:127.0.0.1:8891, got {address!r}")
    if address.startswith("unix:"):
        path = address[5:]
        if not path.startswith("/") or "\0" in path:
            raise _Invalid(f"unix: needs an absolute path, got {address!r}")
        return "unix:path=" + path.replace("\\", "\\\\").replace(":", "\\:")
    match = _INET.match(address) or _SENDMAIL_INET.match(address)
    if match is None:
        raise _Invalid(f"must be inet:HOST:PORT or unix:PATH, got {address!r}")
    groups = match.groupdict()
    host = (groups.get("v6") or groups["host"]).strip("[]")
    port = int(match.group("port"))
    if not 0 < port < 65536:
        raise _Invalid(f"port out of range in {address!r}")
    if ":" in host:
        return f"tcp6:host={host.replace(':', chr(92) + ':')}:port={port}"
    return f"tcp:host={host}:port={port}"


def _server(t: _Table, address: Any, defaults: MilterServer) -> MilterServer:
    return MilterServer(
        address=address,
        endpoint=endpointFor(address),
        connectTimeout=t.get("connect_timeout", _duration(), defaults.connectTimeout),
        commandTimeout=t.get("command_timeout", _duration(), defaults.commandTimeout),
        contentTimeout=t.get("content_timeout", _duration(), defaults.contentTimeout),
        defaultAction=t.get("default_action", _choice(*DEFAULT_ACTIONS), defaults.defaultAction),
    )


def milterConfig(t: _Table) -> MilterConfig:
    """
    ``[milter]``: ``servers`` lists addresses or tables (``address`` and
    any of the per-milter keys); the section's own keys are the defaults.
    """
    defaults = _server(t, "inet:127.0.0.1:1", MilterServer("", ""))
    entries = t.get("servers", lambda v: v, [])
    if not isinstance(entries, list):
        raise t.error("servers", "must be a list of milter addresses")
    servers = []
    for i, entry in enumerate(entries):
        key = f"servers[{i}]"
        try:
            if isinstance(entry, dict):
                sub = _Table.of(t.source, t.key(key), entry)
                address = sub.get("address", lambda v: v, None)
                if address is None:
                    raise sub.error("address", "must be set")
                server = _server(sub, address, defaults)
                sub.finish()
            else:
                server = attrs.evolve(defaults, address=entry, endpoint=endpointFor(entry))
        except _Invalid as e:
            raise t.error(key, str(e)) from None
        servers.append(server)
    return MilterConfig(servers=tuple(servers))
