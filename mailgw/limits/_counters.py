"""
Bounded, clock-driven bookkeeping shared by the limiters: per-key counts
that leak away over a window, keys that expire, and the reduction of a
client address to the keys it is counted under.

Nothing here does I/O or schedules anything: time is read from an
L{IReactorTime} when a count is read or changed.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from collections.abc import Hashable, Iterable

import attrs
from twisted.internet.interfaces import IReactorTime

#: The most keys one table keeps (client addresses, networks, logins ...): an
#: attacker with many addresses makes the table forget its oldest keys
#: instead of growing without bound.
DEFAULT_MAX_KEYS = 100_000

# Leaking is float arithmetic: a count this close to an integer is that integer.
_EPSILON = 1e-9

# Expired keys removed from the front of a table on each change: amortised
# cleaning, so a table shrinks again once an attack stops.
_PURGE_PER_CHANGE = 2

#: Prefix lengths under which clients are counted. An IPv6 host commonly
#: holds a whole /64 (RFC 4291 2.5.4, RFC 8981 temporary addresses), so
#: counting single IPv6 addresses would let it start afresh at will.
IPV6_CLIENT_PREFIX = 64
IPV4_NETWORK_PREFIX = 24
IPV6_NETWORK_PREFIX = 56

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@attrs.define
class LeakyCounts:
    """
    Counts per key that leak away linearly at ``budget`` per ``window``
    seconds: a burst of ``budget`` events is forgotten one window later, and
    a key held at its budget regains one event every ``window / budget``
    seconds (a leaky bucket, as in the generic cell rate algorithm). Each key
    costs two floats, whatever its count.

    At most ``maxKeys`` keys are kept; when a new key would pass that, the
    least recently changed key is forgotten.
    """

    clock: IReactorTime
    budget: float
    window: float
    maxKeys: int = DEFAULT_MAX_KEYS
    _entries: OrderedDict[Hashable, tuple[float, float]] = attrs.field(
        init=False, factory=OrderedDict
    )

    def _leaked(self, level: float, stamp: float, now: float) -> float:
        # A clock stepped backwards leaks nothing rather than adding counts.
        elapsed = max(0.0, now - stamp)
        return max(0.0, level - elapsed * self.budget / self.window)

    def count(self, key: Hashable) -> int:
        """The events counted for ``key`` now, rounded up to a whole event."""
        entry = self._entries.get(key)
        if entry is None:
            return 0
        level = self._leaked(*entry, self.clock.seconds())
        if level <= _EPSILON:
            del self._entries[key]
            return 0
        return math.ceil(level - _EPSILON)

    def add(self, key: Hashable, amount: float = 1.0) -> None:
        """Count ``amount`` more events for ``key``."""
        now = self.clock.seconds()
        entry = self._entries.get(key)
        level = self._leaked(*entry, now) if entry is not None else 0.0
        self._entries[key] = (level + amount, now)
        self._entries.move_to_end(key)
        for _ in range(_PURGE_PER_CHANGE):
            oldest, (oldLevel, oldStamp) = next(iter(self._entries.items()))
            if oldest == key or self._leaked(oldLevel, oldStamp, now) > _EPSILON:
                break
            del self._entries[oldest]
        while len(self._entries) > self.maxKeys:
            self._entries.popitem(last=False)

    def prefetch(self, key: Hashable) -> None:
        """Nothing: the counts are all here (a shared table asks for its level)."""

    def remove(self, key: Hashable, amount: float) -> None:
        """
        Take ``amount`` events back from ``key`` (a refund), never below
        zero; a key left at zero is forgotten.
        """
        entry = self._entries.get(key)
        if entry is None:
            return
        now = self.clock.seconds()
        level = self._leaked(*entry, now) - amount
        if level <= _EPSILON:
            del self._entries[key]
        else:
            self._entries[key] = (level, now)  # keeps its place: a refund is no activity

    def __len__(self) -> int:
        return len(self._entries)


@attrs.define
class Contributions:
    """
    What each key (an address and account pair) added to a few
    L{LeakyCounts} tables, each part leaking at its table's rate, so that
    it can be taken back from those tables later (a refund). A part leaks
    as if it were alone in its table, so a refund never takes back more
    than the key added. At most ``maxKeys`` keys are kept, as in
    L{LeakyCounts}.
    """

    clock: IReactorTime
    tables: tuple[LeakyCounts, ...]
    maxKeys: int = DEFAULT_MAX_KEYS
    _entries: OrderedDict[Hashable, tuple[tuple[float, ...], float]] = attrs.field(
        init=False, factory=OrderedDict
    )

    def _levels(self, key: Hashable, now: float) -> tuple[float, ...]:
        entry = self._entries.get(key)
        if entry is None:
            return (0.0,) * len(self.tables)
        levels, stamp = entry
        return tuple(
            t._leaked(level, stamp, now) for t, level in zip(self.tables, levels, strict=True)
        )

    def add(self, key: Hashable, amounts: tuple[float, ...]) -> None:
        """Record that ``key`` added ``amounts`` (one per table)."""
        now = self.clock.seconds()
        levels = self._levels(key, now)
        self._entries[key] = (tuple(a + b for a, b in zip(levels, amounts, strict=True)), now)
        self._entries.move_to_end(key)
        for _ in range(_PURGE_PER_CHANGE):
            oldest = next(iter(self._entries))
            if oldest == key or any(level > _EPSILON for level in self._levels(oldest, now)):
                break
            del self._entries[oldest]
        while len(self._entries) > self.maxKeys:
            self._entries.popitem(last=False)

    def subtract(self, key: Hashable, amounts: tuple[float, ...]) -> None:
        """Forget ``amounts`` of what ``key`` added (its attempt was refunded)."""
        if key not in self._entries:
            return
        now = self.clock.seconds()
        levels = tuple(
            max(0.0, a - b) for a, b in zip(self._levels(key, now), amounts, strict=True)
        )
        if all(level <= _EPSILON for level in levels):
            del self._entries[key]
        else:
            self._entries[key] = (levels, now)

    def take(self, key: Hashable) -> tuple[float, ...]:
        """What ``key`` added and has not leaked away yet; the key is forgotten."""
        levels = self._levels(key, self.clock.seconds())
        self._entries.pop(key, None)
        return levels

    def __len__(self) -> int:
        return len(self._entries)


@attrs.define
class ExpiringKeys:
    """
    A set of keys, each kept for ``lifetime`` seconds after it was last
    added; at most ``maxKeys`` of them (the oldest is forgotten first).
    """

    clock: IReactorTime
    lifetime: float
    maxKeys: int = DEFAULT_MAX_KEYS
    _expiry: OrderedDict[Hashable, float] = attrs.field(init=False, factory=OrderedDict)

    def add(self, key: Hashable) -> None:
        if self.lifetime <= 0:
            return
        now = self.clock.seconds()
        self._expiry[key] = now + self.lifetime
        self._expiry.move_to_end(key)
        # Every key has the same lifetime, so the front is the first to expire.
        while self._expiry and next(iter(self._expiry.values())) <= now:
            self._expiry.popitem(last=False)
        while len(self._expiry) > self.maxKeys:
            self._expiry.popitem(last=False)

    def __contains__(self, key: Hashable) -> bool:
        expiry = self._expiry.get(key)
        if expiry is None:
            return False
        if expiry <= self.clock.seconds():
            del self._expiry[key]
            return False
        return True

    def __len__(self) -> int:
        return len(self._expiry)


@attrs.frozen
class Client:
    """
    A client address reduced to what the limiters count: the ``key`` of the
    client (its address; for IPv6 its /64) and the ``networkKey`` of its
    network (IPv4 /24, IPv6 /56), both cheap to hash; an IPv4-mapped IPv6
    address counts as the IPv4 address. A peer that is not an IP address (a
    UNIX socket) is its own key and network. ``address`` and ``network``
    are the texts to log.
    """

    given: str = attrs.field(eq=False)
    ip: IPAddress | None
    key: Hashable
    networkKey: Hashable

    @property
    def address(self) -> str:
        return self.given if self.ip is None else str(self.ip)

    @property
    def network(self) -> str:
        ip = self.ip
        if ip is None:
            return self.given
        if isinstance(ip, ipaddress.IPv4Address):
            return str(ipaddress.IPv4Network((ip, IPV4_NETWORK_PREFIX), strict=False))
        return str(ipaddress.IPv6Network((ip, IPV6_NETWORK_PREFIX), strict=False))

    def within(self, networks: Iterable[Network]) -> bool:
        """Whether the address is inside one of ``networks``."""
        ip = self.ip
        return ip is not None and any(ip.version == n.version and ip in n for n in networks)


def client(address: str) -> Client:
    """The L{Client} for a peer address as the transport or PROXY header gave it."""
    ip: IPAddress
    try:
        if ":" in address:
            ip = ipaddress.IPv6Address(address)
            if ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            elif ip.scope_id is not None:
                ip = ipaddress.IPv6Address(int(ip))  # without its %scope
        else:
            ip = ipaddress.IPv4Address(address)
    except ValueError:
        return Client(address, None, address, address)
    # Keys are (version, prefix as an integer): hashing them is cheap, and
    # the prefix texts are only built for the log.
    n = int(ip)
    if isinstance(ip, ipaddress.IPv4Address):
        return Client(address, ip, (4, n), (4, n >> (32 - IPV4_NETWORK_PREFIX)))
    return Client(
        address,
        ip,
        (6, n >> (128 - IPV6_CLIENT_PREFIX)),
        (6, n >> (128 - IPV6_NETWORK_PREFIX)),
    )
