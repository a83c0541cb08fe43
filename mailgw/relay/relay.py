"""
mailgw's L{IRelay}: queued messages in, one L{DeliveryResult} per pending
recipient out, each message's results reported as soon as they are known.

Each pending recipient's route is looked up (L{RelayConfig.routeFor}), the
recipients are grouped by destination (L{groupRecipients}), each group's
upstream hosts are found (L{resolveDestinations}), and each batch of at most
C{maxMessagesPerConnection} messages tries those hosts in order with
L{deliverBatch}, under connection slots that every call shares
(L{ConnectionSlots}). Batches move on independently: a slow connection
holds up only its own messages.

Success and permanent results are final. Everything that retrying may fix
is transient and leaves the recipient queued: no route configured, DNS
failures, network, TLS and timeout problems, 4xx replies, an unreadable
relay password or CA file, and any bug in this module.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IResolver,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from zope.interface import implementer

from mailgw import tls
from mailgw.config import RelayConfig, Route, TLSLevel, TLSMode
from mailgw.envelope import DeliveryResult, QueuedMessage
from mailgw.interfaces import IMessageSigner, IRelay
from mailgw.relay.client import (
    Attempt,
    MessageOpener,
    RelaySettings,
    RelayTimeouts,
    deliverBatch,
)
from mailgw.relay.deliverylog import logAttempt, relayName, routeName, status, tlsName
from mailgw.relay.filecache import FileCache, RunBlocking, threadPoolRunner
from mailgw.relay.results import INTERNAL, INTERNAL_ERROR, Part, Report, Results, splitParts
from mailgw.relay.routing import (
    Destination,
    DestinationKey,
    RoutingError,
    groupRecipients,
    resolveDestinations,
)
from mailgw.relay.slots import ConnectionSlots
from mailgw.relay.tlspolicy import TLSPolicy, routeLevel
from mailgw.relay.tlssettings import LevelSettings
from mailgw.relay.tlssettings import systemTrustPath as _systemTrustPath

__all__ = ["EndpointFactory", "Relay", "Report"]

log = Logger()

#: Makes the plain TCP endpoint for a destination, given the route's
#: connect timeout in seconds.
EndpointFactory = Callable[[Destination, float], IStreamClientEndpoint]

# RFC 3463 X.3.5 "system incorrectly configured": our setup, not the
# recipient, is at fault.
MISCONFIGURED = "4.3.5"
DEFAULT_TIMEOUTS = RelayTimeouts()


class _LocalProblem(Exception):
    """Our own configuration keeps a group from being tried (transient)."""


@implementer(IRelay)
class Relay:
    """
    Delivers queued messages to the upstreams L{RelayConfig} names.

    At most C{maxConcurrency} upstream connections are open at once, and at
    most C{maxPerHost} to one host, across every call in flight; a host's
    second and later connections leave a quarter of the slots to hosts
    with none (L{ConnectionSlots}). One connection carries at most
    C{maxMessagesPerConnection} messages. The route's C{connectTimeout}
    replaces C{timeouts.connect}.

    Nothing blocking runs on the reactor thread: message files are opened,
    read and closed, relay passwords read and client TLS contexts built
    through C{runBlocking}; passwords and TLS contexts are cached until
    their file changes (L{FileCache}).

    @param reactor: its clock times the sessions; the default endpoint
        factory also connects with it.
    @param resolver: an L{IResolver} for MX routes.
    @param ehloHostname: our name in EHLO.
    @param opener: opens a queued message's bytes (L{ISpool.openMessage}).
    @param rng: shuffles MX hosts of equal preference.
    @param endpointFactory: makes the plain TCP endpoint for a destination;
        by default a L{HostnameEndpoint} to its host and port.
    @param runBlocking: C{runBlocking(f, *args) -> Deferred}; by default
        the reactor's thread pool (inline for a reactor without threads).
    @param lmtp: speak LMTP instead of SMTP (the content filter's relay).
    @param signer: adds signatures (DKIM) to each message as it is read
        for an upstream, in C{runBlocking}'s threads; None: none.
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
        runBlocking: RunBlocking | None = None,
        lmtp: bool = False,
        signer: IMessageSigner | None = None,
        tlsPolicy: TLSPolicy | None = None,
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
        self.runBlocking = runBlocking or threadPoolRunner(reactor)
        self.slots = ConnectionSlots(maxConcurrency, maxPerHost)
        self.lmtp = lmtp  # LMTP (RFC 2033) to every host: a content filter
        self.tlsCreators: FileCache[IOpenSSLClientConnectionCreator] = FileCache(self.runBlocking)
        self.secrets: FileCache[str | None] = FileCache(self.runBlocking)
        #: Swapped by a reload (L{mailgw.service.GatewayService.reload}).
        self.signer = signer
        self.levels = LevelSettings(self.runBlocking, self._tlsFailure)
        #: L{mailgw.metrics.Metrics}, or None: metrics are off.
        self.metrics: Any = None
        #: MTA-STS and DANE for MX routes (docs/relay.md); by default neither.
        self.tlsPolicy = tlsPolicy if tlsPolicy is not None else TLSPolicy()
        if self.tlsPolicy.report is None:
            self.tlsPolicy.report = self._tlsFailure

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
        self, messages: Sequence[QueuedMessage], report: Report | None = None
    ) -> Deferred[dict[str, list[DeliveryResult]]]:
        """
        Try once to deliver C{messages}, sharing connections between them.

        C{report(queueId, results)} is called exactly once per message, from
        the reactor thread, as soon as every pending recipient of that
        message has its result (one per pending recipient, in order): for a
        message split over several routes, when its last route is done; for
        one with no pending recipient (or no route at all), possibly before
        C{deliverMany} returns. Even after a bug in the relay (then every
        unfinished recipient is transient) a message is reported once, never
        twice. An exception raised by C{report} is logged and ignored.

        @return: a Deferred that never fails, firing once every message is
            done with a dict from queue id to the same results (C{[]} for a
            message with none). A queue id given twice is delivered once.
        """
        unique: dict[str, QueuedMessage] = {}
        for message in messages:
            unique.setdefault(message.queueId, message)
        results = Results(list(unique.values()), report, self.reactor.seconds)
        return Deferred.fromCoroutine(self._deliverMany(list(unique.values()), results))

    async def _deliverMany(
        self, messages: list[QueuedMessage], results: Results
    ) -> dict[str, list[DeliveryResult]]:
        try:
            results.start()
            groups = splitParts(messages, groupRecipients(messages, self.relayConfig.routeFor))
            await gatherResults(
                [
                    Deferred.fromCoroutine(self._deliverGroup(key, parts, results))
                    for key, parts in groups.items()
                ],
                consumeErrors=True,
            )
        except Exception:
            log.failure("relay bug; every unfinished recipient is deferred")
        return results.final()

    async def _deliverGroup(
        self, key: DestinationKey | None, parts: list[Part], results: Results
    ) -> None:
        """Never fails: a bug makes what is unfinished in C{parts} transient."""
        try:
            if key is None:
                # The message waits in the queue; `mailgw queue list` shows why.
                for part in parts:
                    outcome = [
                        DeliveryResult(
                            state.address,
                            False,
                            False,
                            0,
                            MISCONFIGURED,
                            f"no relay route configured for {state.address.domain}",
                        )
                        for state in part.message.recipients
                    ]
                    results.local(part, outcome)
            else:
                await self._deliverRoute(key, parts, results)
        except Exception:
            log.failure("relay bug while delivering to {key}", key=key)
            for part in parts:
                self._bug(part, results)

    def _bug(self, part: Part, results: Results) -> None:
        left = results.unfilled(part)
        if left:
            rest = part.only(left)
            results.local(rest, rest.deferred(INTERNAL, INTERNAL_ERROR))

    async def _deliverRoute(self, key: DestinationKey, parts: list[Part], results: Results) -> None:
        route = key.route
        try:
            secureResolver = self.tlsPolicy.secureResolver
            destinations = await resolveDestinations(
                self.resolver,
                route,
                key.domain,
                rng=self.rng,
                secureResolver=secureResolver if routeLevel(route) is TLSLevel.DANE else None,
            )
            mxSecure = bool(destinations) and all(d.mxSecure for d in destinations)
            destinations = await self.tlsPolicy.secure(route, key.domain, destinations, mxSecure)
        except RoutingError as e:
            for part in parts:
                outcome = part.all(
                    success=False, permanent=e.permanent, enhanced=e.enhanced, text=str(e)
                )
                results.local(part, outcome)
            return
        try:
            auth = await self._auth(route)
        except _LocalProblem as e:
            log.warn("relay route unusable: {why}", why=str(e))
            for part in parts:
                results.local(part, part.deferred(MISCONFIGURED, str(e)))
            return
        if not destinations:
            for part in parts:
                results.local(part, part.deferred(INTERNAL, "no upstream host"))
            return
        size = self.maxMessagesPerConnection
        batches = [parts[i : i + size] for i in range(0, len(parts), size)]
        await gatherResults(
            [
                Deferred.fromCoroutine(self._deliverBatch(destinations, auth, batch, results))
                for batch in batches
            ],
            consumeErrors=True,
        )

    async def _deliverBatch(
        self,
        destinations: list[Destination],
        auth: tuple[str, str, str] | None,
        batch: list[Part],
        results: Results,
    ) -> None:
        """One batch through the hosts in order, until nothing is left to
        retry (RFC 5321 5.1). Never fails."""
        pending = batch
        try:
            for number, destination in enumerate(destinations):
                last = number == len(destinations) - 1
                pending = await self._attempt(destination, auth, pending, results, last)
                if not pending:
                    return
        except Exception:
            log.failure(
                "relay bug while delivering to {remote}", remote=[str(d.host) for d in destinations]
            )
            for part in pending:
                self._bug(part, results)

    async def _attempt(
        self,
        destination: Destination,
        auth: tuple[str, str, str] | None,
        parts: list[Part],
        results: Results,
        last: bool,
    ) -> list[Part]:
        """
        Deliver C{parts} over one connection to C{destination}, putting
        each final result as soon as the session knows it.

        @return: the parts with results to try at the next host: transient
            ones, unless C{last}.
        """
        retry: dict[int, list[int]] = {}

        def finished(index: int, partResults: list[DeliveryResult], attempt: Attempt) -> None:
            part = parts[index]
            now = self.reactor.seconds()
            relay = relayName(destination.host, attempt.peer, destination.port)
            tlsText = tlsName(attempt.tlsVersion, attempt.tlsCipher)
            for position, result in enumerate(partResults):
                route = routeName(destination.route, result.recipient.domain.lower())
                logAttempt(part.message, result, now, relay, tlsText, route)
                if self.metrics is not None:
                    self.metrics.delivery(destination.host.lower(), status(result))
                # Success and permanent results are final; what is transient
                # is tried at the next host, or stays after the last.
                if result.transient and not last:
                    retry.setdefault(index, []).append(position)
                else:
                    results.put(part, position, result)

        try:
            settings = await self._settings(destination, auth)
        except ValueError as e:  # TLSConfigError is one
            if isinstance(e, tls.TLSConfigError):
                why = f"relay CA file unusable: {e}"
            else:
                why = f"cannot set up the connection to {destination.host}: {e}"
            log.warn("relay to {remote}: {why}", remote=destination.host, why=why)
            for index, part in enumerate(parts):
                finished(index, part.deferred(MISCONFIGURED, why), Attempt())
            return [parts[i].only(retry[i]) for i in sorted(retry)]
        host = destination.host.lower()
        await self.slots.acquire(host)
        seen: set[int] = set()
        began = self.reactor.seconds()

        def once(index: int, partResults: list[DeliveryResult], attempt: Attempt) -> None:
            seen.add(index)
            finished(index, partResults, attempt)

        opener = self.opener
        if self.signer is not None:
            opener = functools.partial(self.signer.open, self.opener)
        try:
            endpoint = self.endpointFactory(destination, destination.route.connectTimeout)
            everything = await deliverBatch(
                self.reactor,
                endpoint,
                settings,
                [(p.message, opener) for p in parts],
                runBlocking=self.runBlocking,
                onFinished=once,
            )
        except Exception:
            log.failure("relay bug connecting to {remote}", remote=destination.host)
            everything = [p.deferred(INTERNAL, INTERNAL_ERROR, settings.hostname) for p in parts]
        finally:
            self.slots.release(host)
            if self.metrics is not None:
                self.metrics.relayAttempt(host, self.reactor.seconds() - began)
        for index, partResults in enumerate(everything):
            if index not in seen:
                once(index, partResults, Attempt())
        return [parts[i].only(retry[i]) for i in sorted(retry)]

    async def _settings(
        self, destination: Destination, auth: tuple[str, str, str] | None
    ) -> RelaySettings:
        """
        @raise TLSConfigError: the route's CA file is unusable.
        @raise ValueError: the host name or EHLO name is unusable.
        """
        if destination.security is not None:
            without = attrs.evolve(destination, tls=TLSMode.NONE, security=None)
            plain = await self._settings(without, auth)
            return await self.levels.settings(
                destination, destination.security, plain, lambda d: self._settings(d, auth)
            )
        creator = None
        if destination.tls is not TLSMode.NONE:
            host, caFile = destination.host, destination.route.caFile or None
            creator = await self.tlsCreators.get(
                (host, caFile),
                caFile or _systemTrustPath(),
                lambda: tls.clientCreator(host, caFile),
            )
        return RelaySettings(
            hostname=destination.host,
            ehloHostname=self.ehloHostname,
            tlsMode=destination.tls,
            tlsCreator=creator,
            auth=auth,
            timeouts=attrs.evolve(self.timeouts, connect=destination.route.connectTimeout),
            lmtp=self.lmtp,
        )

    def _tlsFailure(self, policyDomain: str, policy: str, resultType: str) -> None:
        """Count a TLS failure the way TLS-RPT (RFC 8460) reports them."""
        if self.metrics is not None:
            self.metrics.tlsFailure(policyDomain, policy, resultType)

    async def _auth(self, route: Route) -> tuple[str, str, str] | None:
        """
        The AUTH settings of C{route}, its password read (off the reactor
        thread) when its file changed since the last read.

        @raise _LocalProblem: the password file cannot be read. The text never
            holds any part of the password.
        """
        if not route.authUser:
            return None
        path = route.authPasswordFile
        try:
            password = await self.secrets.get(path, path, route.authPassword)
        except OSError as e:
            why = e.strerror or type(e).__name__
            raise _LocalProblem(f"the relay password file {path} cannot be read: {why}") from None
        except UnicodeError:
            # The decoder's message quotes the offending byte of the password.
            raise _LocalProblem(
                f"the relay password file {path} cannot be read: not UTF-8"
            ) from None
        except ValueError:
            raise _LocalProblem(
                f"the relay password file {path} cannot be read: its first line is empty"
            ) from None
        if password is None:
            raise _LocalProblem("relay auth_user is set but auth_password_file is not")
        return (route.authUser, password, route.authMechanism)
