"""
One account's learnt behaviour and its last hour: what the rules of
L{mailgw.breaker.rules} compare.

The baseline is kept per calendar hour (UTC): for each hour the account
was active, how many messages it sent, to how many distinct recipients,
how many recipient domains and client networks it used for the first
time, and how many of its recipients bounced. The last hour is a sliding
window of the last 3600 seconds, so that a burst straddling the turn of an
hour is seen whole. Recipient domains and client networks (IPv4 /24, IPv6
/56) are remembered with the time they were first and last seen, and
forgotten after ``history_days`` without use.

Everything is bounded: the windows, the learnt domains and networks, and
the hours of history have caps, so that one account cannot grow the state
without limit.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Iterable
from typing import Any

import attrs

HOUR = 3600.0
#: The most events one window keeps (an account past this is far past every rule).
WINDOW_CAP = 20000
#: The most recipient domains and client networks learnt per account.
MAX_DOMAINS = 500
MAX_NETWORKS = 64


def networkOf(address: str) -> str:
    """
    The client network of ``address``: its /24 for IPv4, its /56 for IPv6
    (an IPv4-mapped IPv6 address counts as IPv4); anything else (a UNIX
    socket) as itself.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = 24 if ip.version == 4 else 56
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


@attrs.frozen
class HourStats:
    """One past hour of activity (``hour``: seconds since the epoch // 3600)."""

    hour: int
    messages: int = 0
    recipients: int = 0  # distinct
    domains: int = 0  # first seen in that hour
    networks: int = 0  # first seen in that hour
    sent: int = 0  # recipients, counted per message
    bounces: int = 0

    def toJSON(self) -> list[int]:
        return [self.hour, self.messages, self.recipients, self.domains, self.networks,
                self.sent, self.bounces]  # fmt: skip

    @classmethod
    def fromJSON(cls, data: Any) -> HourStats:
        return cls(*(int(x) for x in data[:7]))


@attrs.frozen
class Figures:
    """
    The last hour, beside the baseline: every number a rule looks at.
    ``history`` is the number of active hours learnt.
    """

    messages: int
    recipients: int
    domains: int
    networks: int
    sent: int
    bounces: int
    peakMessages: int
    peakRecipients: int
    peakDomains: int
    peakNetworks: int
    bounceShare: float
    history: int

    def toJSON(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.define
class AccountState:
    """
    What the breaker knows of one account. ``armedAt``: the last reset (the
    window counts nothing before it); ``trip``: the trip in force, as a
    JSON-able dict (None: armed); ``held``: messages held since the trip.
    """

    firstSeen: float
    lastSeen: float
    history: list[HourStats] = attrs.field(factory=list)
    current: HourStats = attrs.field(factory=lambda: HourStats(0))
    domains: dict[str, list[float]] = attrs.field(factory=dict)
    networks: dict[str, list[float]] = attrs.field(factory=dict)
    armedAt: float = 0.0
    trip: dict[str, Any] | None = None
    held: int = 0
    # The sliding window; not stored (a restart starts it afresh).
    _rcptInHour: set[str] = attrs.field(factory=set)
    _messages: deque[float] = attrs.field(factory=lambda: deque(maxlen=WINDOW_CAP))
    _sent: deque[tuple[float, int]] = attrs.field(factory=deque)
    _bounces: deque[tuple[float, int]] = attrs.field(factory=deque)
    _totals: list[int] = attrs.field(factory=lambda: [0, 0])  # of _sent, of _bounces
    # Recipient -> last use, least recently used first (each use moves it last).
    _recipients: dict[str, float] = attrs.field(factory=dict)
    _newDomains: deque[float] = attrs.field(factory=lambda: deque(maxlen=WINDOW_CAP))
    _newNetworks: deque[float] = attrs.field(factory=lambda: deque(maxlen=WINDOW_CAP))
    # The baseline's figures, computed again only when the history changes.
    _peaks: tuple[int, int, int, int, float] | None = None

    # -- learning ----------------------------------------------------------------

    def _roll(self, now: float, historyDays: int) -> None:
        """Close the current hour when a new one has begun."""
        self.lastSeen = max(self.lastSeen, now)
        hour = int(now // HOUR)
        current = self.current
        if hour == current.hour:
            return
        if current.messages or current.networks or current.bounces:
            self.history.append(attrs.evolve(current, recipients=len(self._rcptInHour)
                                             or current.recipients))  # fmt: skip
        self.current, self._rcptInHour, self._peaks = HourStats(hour), set(), None
        oldest = hour - historyDays * 24
        if self.history and self.history[0].hour <= oldest:
            self.history = [h for h in self.history if h.hour > oldest]
        del self.history[: max(0, len(self.history) - historyDays * 24)]
        forget = now - historyDays * 86400.0
        for learnt in (self.domains, self.networks):
            for key in [k for k, (_, last) in learnt.items() if last < forget]:
                del learnt[key]

    def login(self, now: float, network: str, historyDays: int) -> None:
        self._roll(now, historyDays)
        if self._learn(self.networks, network, now, MAX_NETWORKS):
            self._newNetworks.append(now)
            self.current = attrs.evolve(self.current, networks=self.current.networks + 1)

    def message(self, now: float, recipients: Iterable[str], historyDays: int) -> None:
        self._roll(now, historyDays)
        rcpts = list(dict.fromkeys(recipients))
        newDomains = 0
        for rcpt in rcpts:
            if self._recipients.pop(rcpt, None) is not None or len(self._recipients) < WINDOW_CAP:
                self._recipients[rcpt] = now
            if len(self._rcptInHour) < WINDOW_CAP:
                self._rcptInHour.add(rcpt)
            domain = rcpt.rpartition("@")[2].lower()
            if self._learn(self.domains, domain, now, MAX_DOMAINS):
                self._newDomains.append(now)
                newDomains += 1
        self._messages.append(now)
        self._add(self._sent, 0, now, len(rcpts))
        c = self.current
        self.current = attrs.evolve(
            c,
            messages=c.messages + 1,
            recipients=len(self._rcptInHour),
            domains=c.domains + newDomains,
            sent=c.sent + len(rcpts),
        )

    def bounce(self, now: float, count: int, historyDays: int) -> None:
        self._roll(now, historyDays)
        self._add(self._bounces, 1, now, count)
        self.current = attrs.evolve(self.current, bounces=self.current.bounces + count)

    def _add(self, window: deque[tuple[float, int]], total: int, now: float, n: int) -> None:
        if len(window) < WINDOW_CAP:
            window.append((now, n))
            self._totals[total] += n

    def _expire(self, window: deque[tuple[float, int]], total: int, since: float) -> None:
        while window and window[0][0] <= since:
            self._totals[total] -= window.popleft()[1]

    @staticmethod
    def _learn(learnt: dict[str, list[float]], key: str, now: float, cap: int) -> bool:
        """Remember ``key`` as seen now; True if it is new."""
        seen = learnt.get(key)
        if seen is not None:
            seen[1] = now
            return False
        if len(learnt) >= cap:
            # Forget the least recently seen tenth at once (amortised).
            stale = sorted(learnt, key=lambda k: learnt[k][1])[: max(1, cap // 10)]
            for k in stale:
                del learnt[k]
        learnt[key] = [now, now]
        return True

    def rearm(self, now: float) -> None:
        """Forget the trip and the window (the baseline stays)."""
        self.trip, self.held, self.armedAt = None, 0, now
        for window in (self._messages, self._sent, self._bounces, self._newDomains,
                       self._newNetworks):  # fmt: skip
            window.clear()
        self._recipients.clear()
        self._totals = [0, 0]

    def forgetHour(self, now: float) -> None:
        """Do not learn the hour that tripped: it is not how the account behaves."""
        self.current, self._rcptInHour = HourStats(int(now // HOUR)), set()

    # -- the figures -----------------------------------------------------------------

    def figures(self, now: float) -> Figures:
        since = max(now - HOUR, self.armedAt - 1e-9)
        for window in (self._messages, self._newDomains, self._newNetworks):
            while window and window[0] <= since:
                window.popleft()
        self._expire(self._sent, 0, since)
        self._expire(self._bounces, 1, since)
        recipients = self._recipients
        while recipients:
            oldest = next(iter(recipients))
            if recipients[oldest] > since:
                break
            del recipients[oldest]
        peaks = self._peaks
        if peaks is None:
            peaks = self._peaks = self._baseline()
        return Figures(
            messages=len(self._messages),
            recipients=len(recipients),
            domains=len(self._newDomains),
            networks=len(self._newNetworks),
            sent=self._totals[0],
            bounces=self._totals[1],
            peakMessages=peaks[0],
            peakRecipients=peaks[1],
            peakDomains=peaks[2],
            peakNetworks=peaks[3],
            bounceShare=peaks[4],
            history=len(self.history),
        )

    def _baseline(self) -> tuple[int, int, int, int, float]:
        history = self.history
        sent = sum(h.sent for h in history)
        return (
            max((h.messages for h in history), default=0),
            max((h.recipients for h in history), default=0),
            max((h.domains for h in history), default=0),
            max((h.networks for h in history), default=0),
            sum(h.bounces for h in history) / sent if sent else 0.0,
        )

    # -- storage -----------------------------------------------------------------------

    def toJSON(self) -> dict[str, Any]:
        return {
            "firstSeen": self.firstSeen,
            "lastSeen": self.lastSeen,
            "history": [h.toJSON() for h in self.history],
            "current": self.current.toJSON(),
            # Copies: the snapshot is encoded in a thread while this one changes.
            "domains": {k: [a, b] for k, (a, b) in self.domains.items()},
            "networks": {k: [a, b] for k, (a, b) in self.networks.items()},
            "armedAt": self.armedAt,
            "trip": None if self.trip is None else dict(self.trip),
            "held": self.held,
        }

    @classmethod
    def fromJSON(cls, data: dict[str, Any]) -> AccountState:
        """@raise ValueError, KeyError, TypeError: not a state this code wrote."""

        def learnt(value: Any) -> dict[str, list[float]]:
            return {str(k): [float(v[0]), float(v[1])] for k, v in dict(value).items()}

        trip = data.get("trip")
        if trip is not None and not isinstance(trip, dict):
            raise ValueError("trip must be an object")
        return cls(
            firstSeen=float(data["firstSeen"]),
            lastSeen=float(data["lastSeen"]),
            history=[HourStats.fromJSON(h) for h in data.get("history", [])],
            current=HourStats.fromJSON(data.get("current", [0])),
            domains=learnt(data.get("domains", {})),
            networks=learnt(data.get("networks", {})),
            armedAt=float(data.get("armedAt", 0.0)),
            trip=trip,
            held=int(data.get("held", 0)),
        )
