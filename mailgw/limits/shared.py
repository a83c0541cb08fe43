"""
Counts shared by every process of a site, read synchronously.

The limiters decide on the reactor thread, at once, from counts they hold;
a shared engine (L{ISharedCounters}: Redis, or a supervisor's memory) is
a round trip away. L{SyncedCounters} joins the two: each of its tables
(L{SyncedTable}) is a L{LeakyCounts} that keeps everything this process
counted, and also

  - sends each change to the engine in the background, in batches, at
    most C{interval} seconds after it was made;
  - remembers the level the engine last reported for each key it was asked
    about, and asks again, in the background, when a read finds that level
    older than C{staleness} seconds (or missing);
  - answers a read at once with the larger of this process's own count and
    the shared level: the engine's last report, leaked to now, plus what
    this process changed since that report was asked for.

While the engine is unreachable (a batch failed or timed out) every read
answers with this process's own count alone (fail safe: the local limits
still hold, as they do without an engine); the changes are kept and sent
again, at least once, when a probe every C{retry} seconds finds the engine
back. Each change of state is logged once and shown in the metrics.

What staleness gives an attacker: a process sees other processes' counts
at most C{staleness + interval} seconds (plus one round trip) late, and its
own at once. Within that window each of N processes can let through what
its own view allows, so a budget B can be passed by at most (N - 1) times
what one process admits in that window; each process still enforces B on
what it saw itself, and the AUTH throttle's delays and caps on attempts in
flight per address bound how many attempts one process admits per window
(at most C{auth_concurrent_per_address} per address with the default
settings, since an attempt's verification and its delay take longer than
the window). After the window the budget is counted once across the site.

With no engine configured the limiters use plain L{LeakyCounts}
(L{makeTable} with C{shared=None}): today's behaviour, unchanged.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.interfaces import ISharedCounters
from mailgw.limits._counters import DEFAULT_MAX_KEYS, LeakyCounts

__all__ = [
    "CounterChange",
    "MemoryCounters",
    "SyncedCounters",
    "SyncedTable",
    "TableSpec",
    "keyText",
    "makeTable",
]

_EPSILON = 1e-9


@attrs.frozen
class TableSpec:
    """A table of shared counts: its ``name``, and its leak of ``budget`` per ``window`` seconds."""

    name: str
    budget: float
    window: float

    @property
    def rate(self) -> float:
        """What a bucket leaks per second."""
        return self.budget / self.window if self.window > 0 else 0.0


@attrs.frozen
class CounterChange:
    """Add ``amount`` (0: only read; negative: refund) to bucket ``key`` of table ``spec``."""

    spec: TableSpec
    key: str
    amount: float


def keyText(key: Hashable) -> str:
    """
    A limiter's key as the engine's text: a client key (a tuple of
    integers) as ``n:`` and its parts, any other key (a login, a UNIX
    peer) as ``s:`` and its text, so the two never meet.
    """
    if isinstance(key, tuple):
        return "n:" + ":".join(str(part) for part in key)
    return "s:" + str(key)


@implementer(ISharedCounters)
@attrs.define(eq=False)
class MemoryCounters:
    """
    An L{ISharedCounters} in this process's memory, on ``clock``: the
    engine of the tests, and the store a process can hold for others that
    reach it over its own transport.
    """

    clock: IReactorTime
    maxKeys: int = DEFAULT_MAX_KEYS
    _buckets: OrderedDict[tuple[str, str], tuple[float, float]] = attrs.field(
        init=False, factory=OrderedDict
    )

    def applyNow(self, changes: Sequence[CounterChange]) -> list[float]:
        """L{apply}, answered at once."""
        now = self.clock.seconds()
        levels = []
        for change in changes:
            name = (change.spec.name, change.key)
            level, stamp = self._buckets.get(name, (0.0, now))
            level = max(0.0, level - max(0.0, now - stamp) * change.spec.rate)
            if change.amount:
                level = max(0.0, level + change.amount)
                self._buckets[name] = (level, now)
                self._buckets.move_to_end(name)
                while len(self._buckets) > self.maxKeys:
                    self._buckets.popitem(last=False)
            levels.append(level)
        return levels

    def apply(self, changes: Sequence[CounterChange]) -> Deferred[list[float]]:
        return succeed(self.applyNow(changes))

    def close(self) -> Deferred[None]:
        return succeed(None)

    def __len__(self) -> int:
        return len(self._buckets)


def _bounded(table: OrderedDict[str, Any], maxKeys: int) -> None:
    while len(table) > maxKeys:
        table.popitem(last=False)


@attrs.define(eq=False)
class SyncedTable(LeakyCounts):
    """
    A L{LeakyCounts} of this process's own counts that also reads and
    changes the shared counts of table ``spec`` through ``sync``; made by
    L{SyncedCounters.table}.
    """

    sync: SyncedCounters = attrs.field(kw_only=True)
    spec: TableSpec = attrs.field(kw_only=True)
    # What the engine last reported per key: (level, local time of the report).
    _remote: OrderedDict[str, tuple[float, float]] = attrs.field(init=False, factory=OrderedDict)
    # Changes not sent yet, and changes in the batch in flight.
    _pending: OrderedDict[str, float] = attrs.field(init=False, factory=OrderedDict)
    _sent: dict[str, float] = attrs.field(init=False, factory=dict)
    # Keys whose level a read found missing or stale.
    _wanted: OrderedDict[str, None] = attrs.field(init=False, factory=OrderedDict)

    def count(self, key: Hashable) -> int:
        own = super().count(key)
        if not self.sync.up:
            return own
        text = keyText(key)
        now = self.clock.seconds()
        level = self._pending.get(text, 0.0) + self._sent.get(text, 0.0)
        entry = self._remote.get(text)
        if entry is None or now - entry[1] >= self.sync.staleness:
            self._want(text, soon=entry is None)
        if entry is not None:
            level += self._leaked(entry[0], entry[1], now)
        shared = math.ceil(level - _EPSILON) if level > _EPSILON else 0
        return max(own, shared)

    def _want(self, text: str, soon: bool) -> None:
        if text not in self._pending and text not in self._sent:
            self._wanted[text] = None
            _bounded(self._wanted, self.maxKeys)
        self.sync._dirty(soon)

    def prefetch(self, key: Hashable) -> None:
        """
        Ask for the shared level of ``key`` now, in the background, however
        fresh the one known: a read soon after (the AUTH of a connection
        that has just opened) then sees the site's count as of now.
        """
        if self.sync.up:
            self._want(keyText(key), soon=True)

    def _change(self, key: Hashable, amount: float) -> None:
        text = keyText(key)
        self._pending[text] = self._pending.get(text, 0.0) + amount
        self._pending.move_to_end(text)
        _bounded(self._pending, self.maxKeys)
        self.sync._dirty()

    def add(self, key: Hashable, amount: float = 1.0) -> None:
        super().add(key, amount)
        self._change(key, amount)

    def remove(self, key: Hashable, amount: float) -> None:
        super().remove(key, amount)
        self._change(key, -amount)

    # -- what SyncedCounters calls --

    def _collect(self, room: int) -> list[tuple[str, float]]:
        """Up to ``room`` changes and reads to send; changes move to the batch in flight."""
        taken: list[tuple[str, float]] = []
        while self._pending and len(taken) < room:
            text, amount = self._pending.popitem(last=False)
            self._sent[text] = amount
            self._wanted.pop(text, None)
            taken.append((text, amount))
        while self._wanted and len(taken) < room:
            text, _ = self._wanted.popitem(last=False)
            taken.append((text, 0.0))
        return taken

    def _confirmed(self, text: str, amount: float, level: float) -> None:
        self._sent.pop(text, None)
        self._remote[text] = (level, self.clock.seconds())
        self._remote.move_to_end(text)
        _bounded(self._remote, self.maxKeys)

    def _failed(self, text: str, amount: float) -> None:
        """The batch failed: its change goes back to be sent again."""
        self._sent.pop(text, None)
        if amount:
            self._pending[text] = self._pending.get(text, 0.0) + amount
            self._pending.move_to_end(text, last=False)
            _bounded(self._pending, self.maxKeys)

    def _forgetShared(self) -> None:
        """The engine is down: its levels are no longer trusted, nor asked for."""
        self._remote.clear()
        self._wanted.clear()

    def _busy(self) -> bool:
        return bool(self._pending or self._wanted)


@attrs.define(eq=False)
class SyncedCounters:
    """
    The tables of shared counts of one process, synced with ``engine`` in
    the background on ``clock`` (see the module's docstring): changes are
    sent at most ``interval`` seconds after they were made, in batches of
    at most ``maxBatch``, one batch at a time; a level older than
    ``staleness`` seconds is asked for again when it is read; a batch not
    answered within ``timeout`` seconds has failed; while the engine is
    down a probe is sent every ``retry`` seconds.

    ``up`` tells whether reads use the shared levels; it starts False and
    becomes True with the first answer of the engine (L{start} probes at
    once). ``metrics``, when set, is told of each change of state
    (C{sharedLimitsUp(bool)}) and each failed batch (C{sharedLimitsError()}).
    """

    clock: IReactorTime
    engine: ISharedCounters
    interval: float = 0.1
    staleness: float = 1.0
    timeout: float = 5.0
    retry: float = 5.0
    maxBatch: int = 1000
    log: Logger = attrs.field(factory=lambda: Logger(namespace=__name__))
    metrics: Any = None
    description: str = "the shared limits engine"
    up: bool = attrs.field(init=False, default=False)
    _tables: dict[str, SyncedTable] = attrs.field(init=False, factory=dict)
    _call: IDelayedCall | None = attrs.field(init=False, default=None)
    _inFlight: Deferred[Any] | None = attrs.field(init=False, default=None)
    _stopped: bool = attrs.field(init=False, default=False)
    _known: bool = attrs.field(init=False, default=False)
    _hurry: bool = attrs.field(init=False, default=False)

    def table(
        self, name: str, budget: float, window: float, maxKeys: int = DEFAULT_MAX_KEYS
    ) -> SyncedTable:
        """The table ``name`` (one per name), leaking ``budget`` per ``window`` seconds."""
        if name in self._tables:
            raise ValueError(f"shared table {name!r} made twice")
        table = SyncedTable(
            self.clock, budget, window, maxKeys, sync=self, spec=TableSpec(name, budget, window)
        )
        self._tables[name] = table
        return table

    def start(self) -> None:
        """Probe the engine now; syncing goes on until L{stop}."""
        self._stopped = False
        self._schedule(0.0)

    def stop(self) -> Deferred[None]:
        """Stop syncing (changes not sent yet are dropped) and close the engine."""
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        result: Deferred[None] = self.engine.close()
        return result

    def _schedule(self, delay: float) -> None:
        if self._stopped or self._inFlight is not None:
            return
        if self._call is not None and self._call.active():
            return
        self._call = self.clock.callLater(delay, self._flush)

    def _dirty(self, soon: bool = False) -> None:
        """
        A table has something to send: send it within ``interval`` (when
        up), or as soon as no batch is in flight when ``soon`` (a level
        never asked for yet: the first sight of a key matters most).
        """
        if not self.up:
            return
        self._hurry = self._hurry or soon
        call = self._call
        if soon and call is not None and call.active() and call.getTime() > self.clock.seconds():
            call.reset(0.0)
            return
        self._schedule(0.0 if soon else self.interval)

    def _flush(self) -> None:
        self._call = None
        if self._stopped or self._inFlight is not None:
            return
        self._hurry = False
        batch: list[tuple[SyncedTable, str, float]] = []
        for table in self._tables.values():
            for text, amount in table._collect(self.maxBatch - len(batch)):
                batch.append((table, text, amount))
        changes = [CounterChange(table.spec, text, amount) for table, text, amount in batch]
        try:
            d: Deferred[list[float]] = self.engine.apply(changes)
        except Exception:  # the contract says it never raises; fail safe if it does
            d = _failed()
        d.addTimeout(self.timeout, self.clock)
        self._inFlight = d
        d.addCallbacks(
            self._answered, self._unanswered, callbackArgs=(batch,), errbackArgs=(batch,)
        )

    def _answered(self, levels: list[float], batch: list[tuple[SyncedTable, str, float]]) -> None:
        self._inFlight = None
        if len(levels) != len(batch):
            self._unanswered(Failure(ValueError("the engine answered a wrong count")), batch)
            return
        for (table, text, amount), level in zip(batch, levels, strict=True):
            table._confirmed(text, amount, float(level))
        self._state(True)
        if any(table._busy() for table in self._tables.values()):
            # What a full batch left behind waited long enough already.
            hurry = self._hurry or len(batch) >= self.maxBatch
            self._schedule(0.0 if hurry else self.interval)

    def _unanswered(self, reason: Failure, batch: list[tuple[SyncedTable, str, float]]) -> None:
        self._inFlight = None
        for table, text, amount in batch:
            table._failed(text, amount)
        if self.metrics is not None:
            self.metrics.sharedLimitsError()
        self._state(False, reason)
        self._schedule(self.retry)

    def _state(self, up: bool, reason: Failure | None = None) -> None:
        if up == self.up and self._known:
            return
        self._known = True
        self.up = up
        if self.metrics is not None:
            self.metrics.sharedLimitsUp(up)
        if up:
            self.log.info(
                "shared limits: {what} reachable, counting site-wide", what=self.description
            )
            return
        for table in self._tables.values():
            table._forgetShared()
        why = reason.getErrorMessage() if reason is not None else "unknown"
        self.log.warn(
            "shared limits: {what} unreachable ({why}), counting locally until it is back",
            what=self.description,
            why=why,
        )


def _failed() -> Deferred[list[float]]:
    d: Deferred[list[float]] = Deferred()
    d.errback(RuntimeError("the engine raised"))
    return d


def makeTable(
    clock: IReactorTime,
    shared: SyncedCounters | None,
    name: str,
    budget: float,
    window: float,
    maxKeys: int = DEFAULT_MAX_KEYS,
) -> LeakyCounts:
    """
    A limiter's table of counts: a L{SyncedTable} shared through ``shared``
    under ``name``, or with no engine (``shared`` None) a plain
    L{LeakyCounts} of this process.
    """
    if shared is None:
        return LeakyCounts(clock, budget, window, maxKeys)
    return shared.table(name, budget, window, maxKeys)
