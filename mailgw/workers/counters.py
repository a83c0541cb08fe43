"""
The limits of the workers of one machine, counted once: the supervisor
keeps the counts (a L{MemoryCounters}) and serves them over AMP on a UNIX
socket (``SPOOL/counters.sock``, mode 0600 in the 0700 spool directory);
each worker's limiters count through L{SyncedCounters} with an
L{AMPCounters} engine that reaches that socket. Unless ``[limits] backend``
names a shared engine (Redis), which the workers then use themselves.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp
from zope.interface import implementer

from mailgw.control import removeStaleSocket
from mailgw.interfaces import ISharedCounters
from mailgw.limits.shared import CounterChange, MemoryCounters, SyncedCounters, TableSpec

_log = Logger()

#: The socket's name in the spool directory.
SOCKET_NAME = "counters.sock"
#: Changes per AMP call: an AMP value holds at most 65535 bytes.
CHUNK = 100
#: The longest key text sent (logins are short; longer keys are cut alike).
MAX_KEY = 320


#: Bytes of one AMP call's changes at most (an AMP value holds 65535).
CHUNK_BYTES = 32 * 1024


def _safeKey(key: str) -> str:
    # A key is client-chosen text (a login): cut, and any lone surrogate
    # escaped, so that no key can make a batch unsendable.
    return key[:MAX_KEY].encode("utf-8", "backslashreplace").decode("utf-8")


def _chunks(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """``rows`` in calls of at most L{CHUNK} changes and about L{CHUNK_BYTES} bytes."""
    chunks: list[list[dict[str, Any]]] = [[]]
    size = 0
    for row in rows:
        cost = len(row["key"].encode("utf-8")) + len(row["table"]) + 96
        if chunks[-1] and (len(chunks[-1]) >= CHUNK or size + cost > CHUNK_BYTES):
            chunks.append([])
            size = 0
        chunks[-1].append(row)
        size += cost
    return chunks


def socketPath(spool: str) -> str:
    return os.path.join(spool, SOCKET_NAME)


class Apply(amp.Command):
    """Apply changes to the supervisor's counts; the level after each."""

    arguments = [
        (
            b"changes",
            amp.AmpList(
                [
                    (b"table", amp.Unicode()),
                    (b"budget", amp.Float()),
                    (b"window", amp.Float()),
                    (b"key", amp.Unicode()),
                    (b"amount", amp.Float()),
                ]
            ),
        )
    ]
    response = [(b"levels", amp.ListOf(amp.Float()))]


class CounterServer(amp.AMP):
    """The supervisor's side of one worker's connection."""

    def __init__(self, store: MemoryCounters) -> None:
        super().__init__()
        self.store = store

    @Apply.responder
    def apply(self, changes: list[dict[str, Any]]) -> dict[str, Any]:
        levels = self.store.applyNow(
            [
                CounterChange(
                    TableSpec(c["table"], c["budget"], c["window"]), c["key"], c["amount"]
                )
                for c in changes
            ]
        )
        return {"levels": levels}


class CounterService(Service):
    """Serves ``store`` at ``path`` while running (the supervisor's)."""

    def __init__(self, path: str, store: MemoryCounters, reactor: Any) -> None:
        self.path, self.store, self.reactor = path, store, reactor
        self.port: Any = None

    def startService(self) -> None:
        removeStaleSocket(self.path)
        factory = Factory.forProtocol(lambda: CounterServer(self.store))
        factory.noisy = False
        self.port = self.reactor.listenUNIX(self.path, factory, mode=0o600)
        super().startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        port, self.port = self.port, None
        return maybeDeferred(port.stopListening) if port is not None else succeed(None)


@implementer(ISharedCounters)
class AMPCounters:
    """
    An L{ISharedCounters} in the supervisor, reached over AMP at ``path``;
    connected on first use, and again after the connection was lost.
    """

    def __init__(self, reactor: Any, path: str) -> None:
        self.reactor, self.path = reactor, path
        self._protocol: amp.AMP | None = None
        self._waiters: list[Deferred[amp.AMP]] = []

    def _connected(self) -> Deferred[amp.AMP]:
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None:
            if not getattr(protocol.transport, "disconnected", False):
                return succeed(protocol)
        waiter: Deferred[amp.AMP] = Deferred()
        self._waiters.append(waiter)
        if len(self._waiters) == 1:
            endpoint = UNIXClientEndpoint(self.reactor, self.path, timeout=5)
            d = endpoint.connect(Factory.forProtocol(amp.AMP))
            d.addBoth(self._done)
        return waiter

    def _done(self, result: Any) -> None:
        if isinstance(result, amp.AMP):
            self._protocol = result
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(result)  # a Failure fails each waiter

    def apply(self, changes: Sequence[CounterChange]) -> Deferred[list[float]]:
        chunks = _chunks(
            [
                {
                    "table": c.spec.name,
                    "budget": float(c.spec.budget),
                    "window": float(c.spec.window),
                    "key": _safeKey(c.key),
                    "amount": float(c.amount),
                }
                for c in changes
            ]
        )

        def send(protocol: amp.AMP) -> Deferred[list[float]]:
            calls = [protocol.callRemote(Apply, changes=chunk) for chunk in chunks]
            d = gatherResults(calls, consumeErrors=True)
            return d.addCallback(lambda answers: [x for a in answers for x in a["levels"]])

        return self._connected().addCallback(send)

    def close(self) -> Deferred[None]:
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.loseConnection()
        return succeed(None)


def connectGuards(gateway: Any, reactor: Any, path: str) -> SyncedCounters:
    """
    Count ``gateway``'s limits through the supervisor at ``path``: new
    guards with shared tables, given to every listener.
    """
    from mailgw.limits import AuthThrottle, ConnectionLimiter, SubmissionQuota
    from mailgw.server.factory import Guards

    limits = gateway.config.limits
    shared = SyncedCounters(
        reactor, AMPCounters(reactor, path), description="the supervisor's counters"
    )
    guards = Guards(
        connections=ConnectionLimiter(reactor, limits, shared=shared),
        auth=AuthThrottle(reactor, limits, shared=shared),
        quota=SubmissionQuota(reactor, limits, shared=shared),
    )
    if gateway.metrics is not None and guards.auth is not None:
        guards.auth.metrics = gateway.metrics
    gateway.guards = guards
    for factory in gateway.factories:
        factory.guards = guards
    shared.start()
    reactor.addSystemEventTrigger("before", "shutdown", shared.stop)
    return shared
