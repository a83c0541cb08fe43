"""
Connection slots for the relay: at most C{limit} upstream connections open
at once, at most C{perHost} to one host, and a reserve that slow hosts
cannot take from the others.

A connection that waits for a slow upstream holds its slot for minutes
(RFC 5321 4.5.3.2 allows 10 minutes for the final dot alone). Plain
semaphores let a few slow hosts, each at its per-host limit, fill every
slot, and then mail for every other host waits behind them. Here a host's
I{first} connection may take any free slot, but a further connection to a
host that already has one is granted only while more than C{reserve} slots
stay free: the last C{reserve} slots are kept for hosts with no connection
at all: however many further connections slow hosts hold, mail to a new
host still finds a slot, unless the reserve too is taken, each slot by the
first connection of yet another host.
"""

from __future__ import annotations

from collections import deque

import attrs
from twisted.internet.defer import Deferred

__all__ = ["ConnectionSlots"]


@attrs.define
class _Waiter:
    host: str
    granted: Deferred[None]


@attrs.define
class ConnectionSlots:
    """
    Grants connection slots by host name (compare lowercased names).

    @ivar limit: connections at once, every host together.
    @ivar perHost: connections at once to one host.
    @ivar reserve: slots a host's second and later connections leave
        free for hosts with none; C{limit // 4} by default.
    """

    limit: int
    perHost: int
    reserve: int = -1
    _active: dict[str, int] = attrs.field(factory=dict, init=False)
    _waiting: deque[_Waiter] = attrs.field(factory=deque, init=False)
    _inUse: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        if min(self.limit, self.perHost) < 1:
            raise ValueError("connection limits must be at least 1")
        if self.reserve < 0:
            self.reserve = self.limit // 4
        self.reserve = min(self.reserve, self.limit - 1)

    @property
    def inUse(self) -> int:
        """Slots granted and not yet released."""
        return self._inUse

    def active(self, host: str) -> int:
        """Slots C{host} holds now."""
        return self._active.get(host, 0)

    @property
    def idle(self) -> bool:
        """Nothing held, nobody waiting."""
        return not self._inUse and not self._waiting

    def acquire(self, host: str) -> Deferred[None]:
        """
        @return: a Deferred that fires once C{host} may open a connection;
            call L{release} with the same name when it is closed.
        """
        waiter = _Waiter(host, Deferred())
        self._waiting.append(waiter)
        self._grant()
        return waiter.granted

    def release(self, host: str) -> None:
        """Give back a slot C{host} was granted."""
        count = self._active.get(host, 0)
        if count < 1:
            raise RuntimeError(f"release of a slot {host!r} does not hold")
        if count == 1:
            del self._active[host]  # idle: do not keep one entry per host ever seen
        else:
            self._active[host] = count - 1
        self._inUse -= 1
        self._grant()

    def _eligible(self, host: str) -> bool:
        free = self.limit - self._inUse
        held = self._active.get(host, 0)
        if held >= self.perHost or free < 1:
            return False
        return held == 0 or free > self.reserve

    def _grant(self) -> None:
        # In order of arrival, skipping (not stopping at) a waiter that may
        # not have a slot yet: a host at its limit blocks nobody else.
        granted = []
        for waiter in list(self._waiting):
            if self._inUse >= self.limit:
                break
            if self._eligible(waiter.host):
                self._waiting.remove(waiter)
                self._active[waiter.host] = self._active.get(waiter.host, 0) + 1
                self._inUse += 1
                granted.append(waiter)
        # Fired after the bookkeeping: a callback may acquire or release.
        for waiter in granted:
            waiter.granted.callback(None)
