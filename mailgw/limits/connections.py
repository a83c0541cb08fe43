"""
Connection limits: how many connections the server holds in total and per
client address, and how fast one address may open new ones.
"""

from __future__ import annotations

from collections.abc import Hashable

from twisted.internet.interfaces import IReactorTime

from mailgw.config import LimitsConfig
from mailgw.limits._counters import DEFAULT_MAX_KEYS, client
from mailgw.limits.shared import SyncedCounters, makeTable
from mailgw.replies import TOO_MANY_CONNECTIONS, TOO_MANY_FROM_ADDRESS, SMTPReply

# connection_rate_per_address counts connections per minute.
RATE_WINDOW = 60.0


class ConnectionLimiter:
    """
    Counts open connections in total (``settings.maxConnections``) and per
    client address (``settings.maxConnectionsPerAddress``; an IPv6 client is
    its /64), and connections opened per address over a sliding minute
    (``settings.connectionRatePerAddress``). Addresses in
    ``settings.exempt`` are free of the per-address limits, not of the
    total, which guards the process itself. Loopback is not exempt unless
    listed.

    Call L{open} when a connection arrives and, for each one it accepted,
    L{close} exactly once when it ends, and L{authenticated} once if it
    logs in.

    With ``shared`` the rate per address is counted across the site (table
    ``connection-rate``, see L{mailgw.limits.shared}); open connections are
    counted in this process.
    """

    def __init__(
        self,
        clock: IReactorTime,
        settings: LimitsConfig,
        maxKeys: int = DEFAULT_MAX_KEYS,
        shared: SyncedCounters | None = None,
    ) -> None:
        self._settings = settings
        self._total = 0
        # Only addresses with open connections: at most maxConnections keys.
        self._open: dict[Hashable, int] = {}
        self._opened = makeTable(
            clock,
            shared,
            "connection-rate",
            settings.connectionRatePerAddress,
            RATE_WINDOW,
            maxKeys,
        )

    def open(self, address: str) -> SMTPReply | None:
        """
        Count a new connection from ``address`` and return None; or, over a
        limit, count nothing and return the 421 reply to send before
        closing it (transient: the client may come back later).
        """
        s = self._settings
        if self._total >= s.maxConnections:
            return TOO_MANY_CONNECTIONS
        who = client(address)
        if not who.within(s.exempt):
            if self._open.get(who.key, 0) >= s.maxConnectionsPerAddress:
                return TOO_MANY_FROM_ADDRESS
            if self._opened.count(who.key) >= s.connectionRatePerAddress:
                return TOO_MANY_FROM_ADDRESS
            self._opened.add(who.key)
            self._open[who.key] = self._open.get(who.key, 0) + 1
        self._total += 1
        return None

    def authenticated(self, address: str) -> None:
        """
        A connection from ``address`` that L{open} accepted has just
        authenticated: take it back from the address's rate of new
        connections, and from the address's count of open connections (it
        stays in the total). A relay client that opens a new session for
        every message, many at once (Postfix runs up to 20 deliveries to
        its relay host in parallel, and a session's slot is freed only when
        its close is done), is then limited by ``max_connections`` and its
        user's quotas, not by the limits meant for unauthenticated floods.
        Call it at most once per connection, and then L{close} it with
        ``authenticated=True``.
        """
        who = client(address)
        if not who.within(self._settings.exempt):
            self._opened.remove(who.key, 1.0)
            self._release(who.key)

    def _release(self, key: Hashable) -> bool:
        count = self._open.get(key, 0)
        if count == 0:
            return False
        if count == 1:
            del self._open[key]
        else:
            self._open[key] = count - 1
        return True

    def close(self, address: str, authenticated: bool = False) -> None:
        """
        Forget a connection from ``address`` that L{open} accepted
        (``authenticated``: and that L{authenticated} was called for).
        """
        who = client(address)
        if not authenticated and not who.within(self._settings.exempt):
            if not self._release(who.key):
                return  # never counted: leave the total alone too
        self._total = max(0, self._total - 1)

    @property
    def openConnections(self) -> int:
        """How many accepted connections are open, in total."""
        return self._total

    def openFrom(self, address: str) -> int:
        """How many accepted connections from ``address`` (its client key) are open."""
        return self._open.get(client(address).key, 0)

    def trackedKeys(self) -> int:
        """How many keys the limiter holds (addresses with open connections, rate counts)."""
        return len(self._open) + len(self._opened)
