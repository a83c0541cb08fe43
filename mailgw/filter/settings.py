"""
The ``[filter]``, ``[reinject]`` and ``[etrn]`` sections: read by
L{mailgw.config.configFromDict} through the loaders here, checked as
strictly as the rest (every problem a L{ConfigError} naming the key).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import attrs

from mailgw._configparse import (
    Network,
    _boolean,
    _duration,
    _integer,
    _Invalid,
    _listeners,
    _networks,
    _stringList,
    _Table,
)

#: The reinjection listener's clients by default: the loopback networks
#: (Postfix's ``mynetworks = 127.0.0.0/8`` of the 10025 service, and ::1).
LOOPBACK: tuple[Network, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)

_FILTER = re.compile(r"(smtp|lmtp):(?:\[([0-9A-Fa-f:.]+)\]|([0-9.]+|localhost)):(\d{1,5})\Z")


@attrs.frozen
class FilterConfig:
    """
    The after-queue content filter (docs/content-filter.md). ``protocol``
    is "" when there is none; ``host`` is a loopback address (the filter
    gets the message in plain text, as Postfix's ``smtp-amavis``).
    ``replyTimeout`` bounds the wait for every reply of the filter (RFC
    5321's 10 minutes for the final dot); ``maxConnections`` the connections
    open to it at once (amavis's ``$max_servers``, 2 by default).
    ``holdReplies``: patterns (searched, case-insensitive) in a refusing
    reply, ``"CODE ENHANCED TEXT"``, that put the message on hold instead
    of bouncing or retrying it.
    """

    protocol: str = ""
    host: str = ""
    port: int = 0
    holdReplies: tuple[re.Pattern[str], ...] = ()
    connectTimeout: float = 30
    replyTimeout: float = 600
    maxConnections: int = 2

    @property
    def enabled(self) -> bool:
        return bool(self.protocol)

    @property
    def name(self) -> str:
        """``smtp:127.0.0.1:10024``, as configured (brackets for IPv6)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.protocol}:{host}:{self.port}" if self.protocol else ""


@attrs.frozen
class ReinjectConfig:
    """
    The reinjection listeners, where the filter hands the filtered message
    back: no AUTH, clients from ``networks`` only, never filtered again.
    """

    listen: tuple[str, ...] = ()
    networks: tuple[Network, ...] = LOOPBACK


@attrs.frozen
class EtrnConfig:
    """
    ETRN (RFC 1985) on the submission listeners: offered when ``enabled``,
    obeyed for authenticated clients and for clients in ``networks``.
    """

    enabled: bool = False
    networks: tuple[Network, ...] = ()


def _filterAddress(value: Any) -> tuple[str, str, int]:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string such as 'smtp:127.0.0.1:10024', got {value!r}")
    if not value:
        return "", "", 0
    m = _FILTER.match(value)
    if m is None:
        raise _Invalid(
            "must be 'smtp:HOST:PORT' or 'lmtp:HOST:PORT' with a loopback address "
            f"(e.g. 'smtp:127.0.0.1:10024', 'lmtp:[::1]:10024'), got {value!r}"
        )
    protocol, host, port = m.group(1), m.group(2) or m.group(3), int(m.group(4))
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            raise _Invalid(f"not an IP address: {host!r}") from None
        if not loopback:
            # Plain text, no AUTH: only to this machine.
            raise _Invalid(f"the filter must be on a loopback address, got {host!r}")
    if not 1 <= port <= 65535:
        raise _Invalid(f"port must be from 1 to 65535, got {value!r}")
    return protocol, host, port


def _patterns(value: Any) -> tuple[re.Pattern[str], ...]:
    patterns = []
    for text in _stringList(value):
        try:
            patterns.append(re.compile(text, re.IGNORECASE))
        except re.error as e:
            raise _Invalid(f"not a regular expression: {text!r} ({e})") from None
    return tuple(patterns)


def loadFilter(t: _Table) -> FilterConfig:
    protocol, host, port = t.get("content_filter", _filterAddress, ("", "", 0))
    return FilterConfig(
        protocol=protocol,
        host=host,
        port=port,
        holdReplies=t.get("hold_replies", _patterns, ()),
        connectTimeout=t.get("connect_timeout", _duration(), 30),
        replyTimeout=t.get("reply_timeout", _duration(), 600),
        maxConnections=t.get("max_connections", _integer(1), 2),
    )


def loadReinject(t: _Table) -> ReinjectConfig:
    return ReinjectConfig(
        listen=t.get("listen", _listeners, ()),
        networks=t.get("networks", _networks, LOOPBACK),
    )


def loadEtrn(t: _Table) -> EtrnConfig:
    return EtrnConfig(
        enabled=t.get("enabled", _boolean, False),
        networks=t.get("networks", _networks, ()),
    )
