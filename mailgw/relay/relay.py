"""
mailgw's L{IRelay}: queued messages in, one L{DeliveryResult} per pending
recipient out.

Each pending recipient's route is looked up (L{RelayConfig.routeFor}), the
recipients are grouped by destination (L{groupRecipients}), each group's
upstream hosts are found (L{resolveDestinations}) and tried in order with
L{deliverBatch}, under connection limits that every call shares.

Success and permanent results are final. Everything that retrying may fix
is transient and leaves the recipient queued: no route configured, DNS
failures, network, TLS and timeout problems, 4xx replies, an unreadable
relay password or CA file, and any bug in this module.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IResolver, IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from mailgw import tls
from mailgw.config import RelayConfig, Route, TLSMode
from mailgw.envelope import Address, DeliveryResult, QueuedMessage
from mailgw.interfaces import IRelay
from mailgw.relay.client import MessageOpener, RelaySettings, RelayTimeouts, deliverBatch
from mailgw.relay.routing import (
    Destination,
    DestinationKey,
    RoutingError,
    groupRecipients,
    resolveDestinations,
)

__all__ = ["EndpointFactory", "Relay"]

log = Logger()

#: Makes the plain TCP endpoint for a destination, given the route's
#: connect timeout in seconds.
EndpointFactory = Callable[[Destination, float], IStreamClientEndpoint]

# RFC 3463 X.3.5 "system incorrectly configured": our setup, not the
# recipient, is at fault; X.3.0 "other mail system status" for our bugs.
MISCONFIGURED = "4.3.5"
INTERNAL = "4.3.0"
INTERNAL_ERROR = "internal error in the relay; will retry"
DEFAULT_TIMEOUTS = RelayTimeouts()


class _LocalProblem(Exception):
    """Our own configuration keeps a group from being tried (transient)."""


@attrs.frozen
class _Part:
    """
    A message restricted to the pending recipients of one group, and the
    position of each of them among the message's pending recipients.
    """

    message: QueuedMessage
    positions: tuple[int, ...]

    def only(self, indices: Sequence[int]) -> _Part:
        """This part with only its recipients at C{indices}."""
        states = self.message.recipients
        return _Part(
            attrs.evolve(self.message, recipients=tuple(states[i] for i in indices)),
            tuple(self.positions[i] for i in indices),
        )

    def all(self, **outcome: Any) -> list[DeliveryResult]:
        """The same C{outcome} for every recipient of this part."""
        return [DeliveryResult(s.address, **outcome) for s in self.message.recipients]

    def deferred(self, enhanced: str, text: str, remote: str = "") -> list[DeliveryResult]:
        """A transient result of our own for every recipient of this part."""
        return self.all(success=False, enhanced=enhanced, text=text, remote=remote)


class _Results:
    """One slot per pending recipient of every message, each filled once."""

    def __init__(self, messages: Sequence[QueuedMessage]) -> None:
        self.messages = messages
        self.slots: dict[str, list[DeliveryResult | None]] = {
            m.queueId: [None] * len(m.pendingRecipients) for m in messages
        }

    def put(self, part: _Part, index: int, result: DeliveryResult) -> None:
        slots = self.slots[part.message.queueId]
        if slots[part.positions[index]] is None:
            slots[part.positions[index]] = result

    def putAll(self, part: _Part, results: Sequence[DeliveryResult]) -> None:
        if len(results) != len(part.positions):
            raise RuntimeError(f"{len(results)} results for {len(part.positions)} recipients")
        for index, result in enumerate(results):
            self.put(part, index, result)

    def final(self) -> dict[str, list[DeliveryResult]]:
        """Every slot, those left empty (a bug) filled with a transient result."""
        final: dict[str, list[DeliveryResult]] = {}
        for message in self.messages:
            slots = self.slots[message.queueId]
            final[message.queueId] = [
                result or DeliveryResult(state.address, False, False, 0, INTERNAL, INTERNAL_ERROR)
                for state, result in zip(message.pendingRecipients, slots, strict=True)
            ]
        return final


def _split(
    messages: Sequence[QueuedMessage],
    groups: dict[DestinationKey | None, list[tuple[QueuedMessage, tuple[Address, ...]]]],
) -> dict[DestinationKey | None, list[_Part]]:
    """Turn L{groupRecipients}' addresses back into recipient positions."""
    free: dict[str, dict[Address, deque[int]]] = {}
    for message in messages:
        table = free[message.queueId] = {}
        for position, state in enumerate(message.pendingRecipients):
            table.setdefault(state.address, deque()).append(position)
    parts: dict[DestinationKey | None, list[_Part]] = {}
    for key, items in groups.items():
        for message, addresses in items:
            # A recipient listed twice takes two positions, in order.
            positions = tuple(free[message.queueId][a].popleft() for a in addresses)
            pending = message.pendingRecipients
            restricted = attrs.evolve(message, recipients=tuple(pending[p] for p in positions))
            parts.setdefault(key, []).append(_Part(restricted, positions))
    return parts


@implementer(IRelay)
class Relay:
    """
    Delivers queued messages to the upstreams L{RelayConfig} names.

    At most C{maxConcurrency} upstream connections are open at once, and at
    most C{maxPerHost} to one host, across every call in flight. One
    connection carries at most C{maxMessagesPerConnection} messages. The
    route's C{connectTimeout} replaces C{timeouts.connect}.

    @param reactor: its clock times the sessions; the default endpoint
        factory also connects with it.
    @param resolver: an L{IResolver} for MX routes.
    @param ehloHostname: our name in EHLO.
    @param opener: opens a queued message's bytes (L{ISpool.openMessage}).
    @param rng: shuffles MX hosts of equal preference.
    @param endpointFactory: makes the plain TCP endpoint for a destination;
        by default a L{HostnameEndpoint} to its host and port.
    """

    def __init__(
        self,
        reactor: Any,
        relayConfig: RelayConfig,
        resolver: IResolver,
        ehloHostname: str,
        opener: MessageOpener,
        *,
        maxConcurrency: int = 20,
        maxPerHost: int = 5,
        timeouts: RelayTimeouts = DEFAULT_TIMEOUTS,
        maxMessagesPerConnection: int = 100,
        rng: random.Random | None = None,
        endpointFactory: EndpointFactory | None = None,
    ) -> None:
        if min(maxConcurrency, maxPerHost, maxMessagesPerConnection) < 1:
            raise ValueError("connection and batch limits must be at least 1")
        self.reactor = reactor
        self.relayConfig = relayConfig
        self.resolver = resolver
        self.ehloHostname = ehloHostname
        self.opener = opener
        self.maxPerHost = maxPerHost
        self.timeouts = timeouts
        self.maxMessagesPerConnection = maxMessagesPerConnection
        self.rng = rng
        self.endpointFactory = endpointFactory or self._hostnameEndpoint
        self._connections = DeferredSemaphore(maxConcurrency)
        self._perHost: dict[str, DeferredSemaphore] = {}

    def _hostnameEndpoint(self, destination: Destination, timeout: float) -> IStreamClientEndpoint:
        return HostnameEndpoint(self.reactor, destination.host, destination.port, timeout=timeout)

    def deliver(self, message: QueuedMessage) -> Deferred[list[DeliveryResult]]:
        """
        Try once to deliver C{message} to its pending recipients.

        @return: a Deferred that never fails, firing with one result per
            pending recipient, in order.
        """
        d = self.deliverMany([message])
        return d.addCallback(lambda results: results[message.queueId])

    def deliverMany(
        self, messages: Sequence[QueuedMessage]
    ) -> Deferred[dict[str, list[DeliveryResult]]]:
        """
        Try once to deliver C{messages}, sharing connections between them.

        @return: a Deferred that never fails, firing with a dict from queue
            id to one result per pending recipient of that message, in
            order (C{[]} for a message with none). A queue id given twice is
            delivered once.
        """
        unique: dict[str, QueuedMessage] = {}
        for message in messages:
            unique.setdefault(message.queueId, message)
        return Deferred.fromCoroutine(self._deliverMany(list(unique.values())))

    async def _deliverMany(self, messages: list[QueuedMessage]) -> dict[str, list[DeliveryResult]]:
        results = _Results(messages)
        try:
            groups = _split(messages, groupRecipients(messages, self.relayConfig.routeFor))
            await gatherResults(
                [
                    Deferred.fromCoroutine(self._deliverGroup(key, parts, results))
                    for key, parts in groups.items()
                ],
                consumeErrors=True,
            )
        except Exception:
            log.failure("relay bug; every unfinished recipient is deferred")
        final = results.final()
        for message in messages:
            for result in final[message.queueId]:
                _logResult(message.queueId, result)
        return final

    async def _deliverGroup(
        self, key: DestinationKey | None, parts: list[_Part], results: _Results
    ) -> None:
        try:
            if key is None:
                # The message waits in the queue; `mailgw queue list` shows why.
                for part in parts:
                    for index, state in enumerate(part.message.recipients):
                        text = f"no relay route configured for {state.address.domain}"
                        outcome = DeliveryResult(
                            state.address, False, False, 0, MISCONFIGURED, text
                        )
                        results.put(part, index, outcome)
            else:
                await self._deliverRoute(key, parts, results)
        except Exception:
            log.failure("relay bug while delivering to {key}", key=key)
            for part in parts:
                results.putAll(part, part.deferred(INTERNAL, INTERNAL_ERROR))

    async def _deliverRoute(
        self, key: DestinationKey, parts: list[_Part], results: _Results
    ) -> None:
        route = key.route
        try:
            destinations = await resolveDestinations(self.resolver, route, key.domain, rng=self.rng)
        except RoutingError as e:
            for part in parts:
                outcome = part.all(
                    success=False, permanent=e.permanent, enhanced=e.enhanced, text=str(e)
                )
                results.putAll(part, outcome)
            return
        try:
            auth = _auth(route)
        except _LocalProblem as e:
            log.warn("relay route unusable: {why}", why=str(e))
            for part in parts:
                results.putAll(part, part.deferred(MISCONFIGURED, str(e)))
            return
        pending = parts
        for number, destination in enumerate(destinations):
            last = number == len(destinations) - 1
            attempt = await self._attempt(destination, auth, pending)
            # Success and permanent results are final; what is transient is
            # tried at the next host (RFC 5321 5.1), or stays after the last.
            retry: list[_Part] = []
            for part, partResults in zip(pending, attempt, strict=True):
                again = []
                for index, result in enumerate(partResults):
                    if result.transient and not last:
                        again.append(index)
                    else:
                        results.put(part, index, result)
                if again:
                    retry.append(part.only(again))
            pending = retry
            if not pending:
                return
        for part in pending:  # no destination at all
            results.putAll(part, part.deferred(INTERNAL, "no upstream host"))

    async def _attempt(
        self, destination: Destination, auth: tuple[str, str, str] | None, parts: list[_Part]
    ) -> list[list[DeliveryResult]]:
        """One result list per part, from C{destination}, over as many
        connections as C{maxMessagesPerConnection} asks for."""
        try:
            settings = self._settings(destination, auth)
        except ValueError as e:  # TLSConfigError is one
            if isinstance(e, tls.TLSConfigError):
                why = f"relay CA file unusable: {e}"
            else:
                why = f"cannot set up the connection to {destination.host}: {e}"
            log.warn("relay to {remote}: {why}", remote=destination.host, why=why)
            return [part.deferred(MISCONFIGURED, why) for part in parts]
        size = self.maxMessagesPerConnection
        batches = [parts[i : i + size] for i in range(0, len(parts), size)]
        perBatch = await gatherResults(
            [
                Deferred.fromCoroutine(self._connection(destination, settings, batch))
                for batch in batches
            ],
            consumeErrors=True,
        )
        return [results for batchResults in perBatch for results in batchResults]

    def _settings(
        self, destination: Destination, auth: tuple[str, str, str] | None
    ) -> RelaySettings:
        """
        @raise TLSConfigError: the route's CA file is unusable.
        @raise ValueError: the host name or EHLO name is unusable.
        """
        creator = None
        if destination.tls is not TLSMode.NONE:
            creator = tls.clientCreator(destination.host, destination.route.caFile or None)
        return RelaySettings(
            hostname=destination.host,
            ehloHostname=self.ehloHostname,
            tlsMode=destination.tls,
            tlsCreator=creator,
            auth=auth,
            timeouts=attrs.evolve(self.timeouts, connect=destination.route.connectTimeout),
        )

    async def _connection(
        self, destination: Destination, settings: RelaySettings, batch: list[_Part]
    ) -> list[list[DeliveryResult]]:
        """One connection to C{destination} for C{batch}, within the limits."""
        host = destination.host.lower()
        perHost = self._perHost.setdefault(host, DeferredSemaphore(self.maxPerHost))
        # Always the host's slot first, then a global one: a connection
        # never holds a global slot while it waits for its host.
        await perHost.acquire()
        try:
            await self._connections.acquire()
            try:
                endpoint = self.endpointFactory(destination, destination.route.connectTimeout)
                return await deliverBatch(
                    self.reactor, endpoint, settings, [(p.message, self.opener) for p in batch]
                )
            finally:
                self._connections.release()
        except Exception:
            log.failure("relay bug connecting to {remote}", remote=destination.host)
            return [part.deferred(INTERNAL, INTERNAL_ERROR, settings.hostname) for part in batch]
        finally:
            perHost.release()
            if perHost.tokens == perHost.limit and self._perHost.get(host) is perHost:
                del self._perHost[host]  # idle: do not keep one per host ever seen


def _auth(route: Route) -> tuple[str, str, str] | None:
    """
    The AUTH settings of C{route}, its password read now.

    @raise _LocalProblem: the password file cannot be read. The text never
        holds any part of the password.
    """
    if not route.authUser:
        return None
    path = route.authPasswordFile
    try:
        password = route.authPassword()
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise _LocalProblem(f"the relay password file {path} cannot be read: {why}") from None
    except UnicodeError:
        # The decoder's message quotes the offending byte of the password.
        raise _LocalProblem(f"the relay password file {path} cannot be read: not UTF-8") from None
    except ValueError:
        raise _LocalProblem(
            f"the relay password file {path} cannot be read: its first line is empty"
        ) from None
    if password is None:
        raise _LocalProblem("relay auth_user is set but auth_password_file is not")
    return (route.authUser, password, route.authMechanism)


def _logResult(queueId: str, result: DeliveryResult) -> None:
    """One line per recipient, as Postfix operators know it."""
    if result.success:
        status = "sent"
    elif result.permanent:
        status = "bounced"
    else:
        status = "deferred"
    detail = " ".join(
        p for p in (str(result.code) if result.code else "", result.enhanced, result.text) if p
    )
    log.info(
        "{queueId}: to=<{rcpt}>, relay={remote}, status={status} ({detail})",
        queueId=queueId,
        rcpt=str(result.recipient),
        remote=result.remote or "none",
        status=status,
        detail=detail,
        result=result,
    )
