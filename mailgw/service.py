"""
The gateway as one Twisted service: spool, listeners and (when configured)
the queue runner. ``twistd mailgw`` builds it from options; an embedding
application builds it from a L{mailgw.config.Config} and its reactor and
adds it to its own service tree.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from prometheus_client import CollectorRegistry
from twisted.application.service import MultiService, Service
from twisted.cred import strcred
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet.defer import Deferred, DeferredList, gatherResults, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.threadpool import ThreadPool

from mailgw.api import ApiResource, makeApi
from mailgw.apiconfig import readSecret
from mailgw.auth.realm import makePortal
from mailgw.auth.workers import retireReplaced
from mailgw.breaker.build import makeBreaker
from mailgw.certcheck import configuredCertificateReport
from mailgw.config import Config, ConfigError
from mailgw.control import ControlService, defaultSocketPath
from mailgw.dkim.signer import makeSigner
from mailgw.filter.build import filterIntake, filterStage, makeEtrn, reinjectFactory
from mailgw.health import MetricsService, gatewayChecks, makeSite
from mailgw.interfaces import IRelay, ISpool, ISubmissionPolicy
from mailgw.limits import AuthThrottle, ConnectionLimiter, SubmissionQuota
from mailgw.limits.backend import SharedLimitsService, makeSharedCounters
from mailgw.limits.shared import SyncedCounters
from mailgw.metrics import Metrics
from mailgw.milter.chain import makeMilters
from mailgw.policy.recipients import RecipientDomainPolicy
from mailgw.policy.senders import SenderLoginPolicy
from mailgw.proxy import ProxyFactory
from mailgw.queue.events import WebhookObserver
from mailgw.queue.runner import QueueRunner
from mailgw.queue.spool import Spool, SpoolError
from mailgw.relay.relay import Relay
from mailgw.relay.tlssetup import makeTLSPolicy
from mailgw.reloading import SwappableContextFactory, restartOnly
from mailgw.server.factory import Guards, ServerSettings, SubmissionFactory
from mailgw.server.plaintext import PlaintextSniffingFactory
from mailgw.webhooks import WebhookSender


def threadRunner(reactor: Any, pool: ThreadPool | None = None) -> Callable[..., Deferred[Any]]:
    """A ``runInThread(f, *args)`` on ``pool`` (default: ``reactor``'s thread pool)."""

    def runInThread(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        return deferToThreadPool(reactor, pool or reactor.getThreadPool(), f, *args, **kwargs)

    return runInThread


#: Threads of the spool's own pool: its fsyncs never wait behind password
#: hashing (which uses the reactor's pool), so a burst of logins cannot
#: delay a 250.
SPOOL_THREADS = 4


def serverSettings(config: Config) -> ServerSettings:
    """
    The listeners' settings: the host name, and every other field of
    L{ServerSettings} copied by name from ``[server]`` (each is written
    once, in L{mailgw.config.ServerConfig}; a test checks the names match).
    """
    server = config.server
    names = (f.name for f in attrs.fields(ServerSettings) if f.name != "hostname")
    return ServerSettings(hostname=config.fqdn(), **{n: getattr(server, n) for n in names})


def makePolicy(config: Config, clock: Any) -> ISubmissionPolicy:
    """
    Sender ownership (docs/senders.md): a user sends as their own login
    (when it is an address) and as what the map file grants them.

    @raise ConfigError: the map file cannot be read or parsed.
    """
    policy = config.policy
    try:
        senders = SenderLoginPolicy(
            policy.senderLoginMaps or None,
            checkHeaderFrom=policy.checkHeaderFrom == "reject",
            allowNullSender=policy.allowNullSender,
            clock=clock,
        )
    except (OSError, ValueError) as e:
        raise ConfigError(config.source, "policy.sender_login_maps", str(e)) from None
    if policy.allowedRecipientDomains or policy.recipientDomains:
        # Recipient restrictions (mailgw/policy/recipients.py) after the sender's.
        return RecipientDomainPolicy(
            senders, policy.allowedRecipientDomains, policy.recipientDomains
        )
    return senders


def makeGuards(config: Config, clock: Any, shared: SyncedCounters | None = None) -> Guards:
    """
    The shared abuse defences: connection limits, AUTH throttle, quotas;
    counting site-wide through ``shared`` when given (docs/cluster.md).
    """
    limits = config.limits
    return Guards(
        connections=ConnectionLimiter(clock, limits, shared=shared),
        auth=AuthThrottle(clock, limits, shared=shared),
        quota=SubmissionQuota(clock, limits, shared=shared),
    )


def makeCheckers(config: Config) -> list[ICredentialsChecker]:
    """
    One checker per ``auth.backends`` entry (strcred strings).

    @raise ConfigError: a backend string is unknown or its checker cannot
        be made (e.g. the passwd file is missing).
    """
    checkers: list[ICredentialsChecker] = []
    for backend in config.auth.backends:
        try:
            checkers.append(strcred.makeChecker(backend))
        except (
            strcred.InvalidAuthType,
            strcred.InvalidAuthArgumentString,
            ValueError,
            OSError,
        ) as e:
            authType = backend.partition(":")[0]
            retireReplaced(checkers, ())  # those made already let go of their pools
            raise ConfigError(config.source, "auth.backends", f"{authType}: {e}") from None
    return checkers


class GatewayService(MultiService):
    """
    The whole gateway: listeners, spool, queue runner, relay and the
    control socket of the ``mailgw queue`` commands.

    Building it runs the start-up safety checks (listeners, certificate and
    key, an auth backend) and raises L{ConfigError} when one fails; starting
    it opens the spool and the listeners.

    ``checkers`` replaces the checkers made from ``config.auth.backends``;
    ``policy`` (default: sender ownership, L{SenderLoginPolicy}), ``guards``
    (default: the limits of ``config.limits``), ``spool``, ``relay`` and
    ``resolver`` (for MX routes) may replace the defaults (tests and
    embedders). ``sharedCounters`` (a L{SyncedCounters} over any
    L{ISharedCounters} engine, e.g. a supervisor's) replaces the one made
    from ``[limits] backend``; the gateway starts and stops its syncing.
    ``controlSocket`` is the
    control socket's path (default: in the spool directory when the spool
    is the on-disk one; "" for none). ``webhookSender`` (``send(event,
    payload)``; default: the ``[webhooks]`` sender) carries the account
    breaker's ``account.tripped`` event when ``[breaker] webhook`` is on.
    """

    log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: Any,
        *,
        checkers: Sequence[ICredentialsChecker] | None = None,
        policy: ISubmissionPolicy | None = None,
        spool: ISpool | None = None,
        relay: IRelay | None = None,
        resolver: Any = None,
        guards: Guards | None = None,
        sharedCounters: SyncedCounters | None = None,
        controlSocket: str | None = None,
        exitOnListenFailure: bool = False,
        metrics: Metrics | None = None,
        webhookSender: Any = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.exitOnListenFailure = exitOnListenFailure
        self._ownCheckers, self._ownPolicy = checkers is None, policy is None
        self.tlsContext = SwappableContextFactory(self._checkTLS(config))
        self.checkers = list(checkers) if checkers is not None else makeCheckers(config)
        if not self.checkers:
            raise ConfigError(
                config.source, "auth.backends", "no auth backend: nobody could log in"
            )
        self.portal = makePortal(self.checkers)
        self._spoolThreads: ThreadPool | None = None
        if spool is None:
            self._spoolThreads = ThreadPool(0, SPOOL_THREADS, name="mailgw-spool")
            try:
                spool = Spool(
                    config.spool.directory, reactor, threadRunner(reactor, self._spoolThreads)
                )
            except SpoolError as e:
                # One line for the operator, not a traceback.
                raise ConfigError(config.source, "spool.directory", str(e)) from None
        self.spool: ISpool = spool
        self.settings = serverSettings(config)
        self.policy = policy if policy is not None else makePolicy(config, reactor)
        #: The counts shared with the other nodes ([limits] backend), or None.
        self.sharedCounters = sharedCounters
        if guards is None and sharedCounters is None:
            self.sharedCounters = makeSharedCounters(config.limits, config.source, reactor)
        self.guards = (
            guards if guards is not None else makeGuards(config, reactor, self.sharedCounters)
        )
        self.signer = makeSigner(config.dkim, config.source)  # DKIM keys: read now
        # [milter] servers: every new session asks them (None: no milter).
        self.milters = makeMilters(config.milter.servers, reactor, self.settings)
        self.relay: IRelay = relay if relay is not None else self._makeRelay(resolver)
        # The content filter, if any, comes before the routes (docs/content-filter.md).
        queueRelay = filterStage(
            config,
            self.relay,
            reactor,
            self.settings.hostname,
            self.spool.openMessage,
            lambda queueId, why: self.runner.hold(queueId, why),
            self._relayThreads().get("runBlocking"),
        )
        # The queue: committing a message through it schedules it.
        self.runner = QueueRunner(
            self.spool, queueRelay, reactor, config.queue, self.settings.hostname
        )
        self.runner.setServiceParent(self)
        if self.sharedCounters is not None:
            SharedLimitsService(self.sharedCounters).setServiceParent(self)
        #: The webhook sender ([webhooks]), or None: no webhooks configured.
        self.webhooks: WebhookSender | None = _webhooks(config, reactor, self.runner)
        if self.webhooks is not None:
            self.webhooks.setServiceParent(self)
        # An embedder's sender, or the [webhooks] one, carries the breaker's alerts.
        self.breaker = self._addBreaker(
            webhookSender if webhookSender is not None else self.webhooks
        )
        if controlSocket is None and isinstance(self.spool, Spool):
            controlSocket = defaultSocketPath(config.spool.directory)
        #: What ``mailgw reload`` calls (``twistd mailgw``: the SIGHUP reload,
        #: which reads the configuration file again).
        self.reloader: Callable[[], bool] = self.reload
        if controlSocket:
            control = _OptionalControl(
                controlSocket,
                self.runner,
                reactor,
                reload=lambda: self.reloader(),
                breaker=self.breaker,
            )
            control.setServiceParent(self)
        if metrics is None and config.metrics.listen:
            metrics = Metrics(CollectorRegistry())
        self.metrics = metrics
        self.metricsService: MetricsService | None = None
        #: The queue API (docs/api.md), or None: ``[api] token_file`` not set.
        self.api: ApiResource | None = None
        if metrics is not None:
            self._watch(metrics)
        self.factories: list[SubmissionFactory] = []
        self._listeners: list[tuple[str, Any]] = []
        for description in config.server.submission:
            self._addListener(description, implicitTLS=False)
        for description in config.server.submissions:
            self._addListener(description, implicitTLS=True)
        self.reinjectFactories = [
            reinjectFactory(config, self.settings, self.portal, self.runner, reactor, self.metrics)
            for _ in config.reinject.listen
        ]
        self._listeners.extend(zip(config.reinject.listen, self.reinjectFactories, strict=True))
        self.ports: list[IListeningPort] = []
        self._listening: Deferred[list[IListeningPort]] | None = None
        #: How a listener is opened: ``(description, factory)`` -> Deferred of
        #: the port. A worker of ``[server] workers`` adopts its supervisor's socket.
        self.listenOn: Callable[[str, Any], Deferred[IListeningPort]] = self._listenOnEndpoint

    def _addBreaker(self, webhookSender: Any) -> Any:
        """The account breaker (docs/breaker.md), hooked into queue and logins; None if off."""
        onDisk = self._spoolThreads is not None
        breaker = makeBreaker(
            self.config.breaker,
            self.reactor,
            self.runner,
            self.settings.hostname,
            self.config.spool.directory if onDisk else None,
            threadRunner(self.reactor, self._spoolThreads) if onDisk else None,
            webhookSender,
        )
        if breaker is not None:
            self.runner.screen, self.runner.bounced = breaker.screen, breaker.bounced
            self.guards.breaker = breaker
            if isinstance(breaker, Service):
                breaker.setServiceParent(self)
        return breaker

    def _watch(self, metrics: Metrics) -> None:
        """Count into ``metrics``; serve them on ``[metrics] listen`` when set."""
        metrics.watchQueue(self.runner, self.reactor)
        self.runner.metrics = metrics
        if self.webhooks is not None:
            self.webhooks.metrics = metrics
        if isinstance(self.relay, Relay):
            self.relay.metrics = metrics
        if self.guards.auth is not None:
            self.guards.auth.metrics = metrics
        if self.sharedCounters is not None:
            self.sharedCounters.metrics = metrics
        if self.config.metrics.listen:
            self.api = makeApi(self.config, self.runner, lambda: self.guards.quota)
            if self.api is not None and self.breaker is not None:
                self.api.accountSections["breaker"] = self.breaker.state
            site = makeSite(metrics.registry, gatewayChecks(self), self.api)
            self.metricsService = MetricsService(self.reactor, self.config.metrics.listen, site)
            self.metricsService.setServiceParent(self)

    def _checkTLS(self, config: Config) -> Any:
        """
        ``config.check()``, then the certificate checks: expired raises
        ConfigError, expiring soon or not valid for the host name is logged.
        """
        contextFactory = config.check(requireAuth=self._ownCheckers)
        report = configuredCertificateReport(config, contextFactory)
        if report.errors:
            raise ConfigError(config.source, "tls.certificate", report.errors[0])
        for warning in report.warnings:
            self.log.warn("{problem}", problem=warning)  # "warning" is a key trial reads
        return contextFactory

    def reload(self, config: Config | None = None) -> bool:
        """
        Apply ``config`` (default: the running one, its files read again):
        certificate and key, auth backends (users files), sender maps, relay
        routes (their password and CA files are read at each connection).
        New sessions get the new certificate, sessions already under TLS
        keep theirs; logins and MAIL from then on use the new backends and
        maps. Listeners, spool, limits, queue and proxy settings need a
        restart: a change to them is logged and left for then.

        Everything is built and checked before anything is swapped: a bad
        new configuration or certificate is refused with one log line and
        the running one stays in force.

        @return: True when applied, False when refused.
        """
        new = config if config is not None else self.config
        checkers: list[ICredentialsChecker] = []
        try:
            contextFactory = self._checkTLS(new)
            checkers = makeCheckers(new) if self._ownCheckers else self.checkers
            if not checkers:
                raise ConfigError(new.source, "auth.backends", "no auth backend")
            policy = makePolicy(new, self.reactor) if self._ownPolicy else self.policy
            signer = makeSigner(new.dkim, new.source)
        except ConfigError as e:
            if self._ownCheckers:
                retireReplaced(checkers, self.checkers)  # made for nothing
            self.log.error(
                "Reload refused, the running configuration stays in force: {error}", error=e
            )
            return False
        for key in restartOnly(self.config, new):
            self.log.warn("Reload: {key} changed; it takes effect at the next restart", key=key)
        self.tlsContext.swap(contextFactory)
        # The old checkers get no new login: their pools close once idle.
        retireReplaced(self.checkers, checkers)
        self.checkers, self.policy = checkers, policy
        self.portal = makePortal(checkers)
        self.settings = serverSettings(new)
        self.milters = makeMilters(new.milter.servers, self.reactor, self.settings)
        for factory in self.factories:
            factory.milters = self.milters
            # The mechanisms offered follow the portal's checkers.
            factory.portal = self.portal
            factory.policy, factory.settings = policy, self.settings
        for factory in self.reinjectFactories:
            factory.settings = self.settings
        self.signer = signer
        if isinstance(self.relay, Relay):
            self.relay.relayConfig, self.relay.signer = new.relay, signer
        self.config = new
        self.log.info("Reloaded the configuration from {source}", source=new.source)
        return True

    def _makeRelay(self, resolver: Any) -> IRelay:
        if resolver is None:
            resolver = _SystemResolver()
        queue = self.config.queue
        return Relay(
            self.reactor,
            self.config.relay,
            resolver,
            self.settings.hostname,
            self.spool.openMessage,
            maxConcurrency=queue.maxConcurrency,
            maxPerHost=queue.maxPerHost,
            signer=self.signer,
            # MTA-STS policies are kept beside a spool on disk (docs/relay.md).
            tlsPolicy=makeTLSPolicy(
                self.reactor,
                resolver,
                self.config.spool.directory if isinstance(self.spool, Spool) else None,
                self._relayThreads().get("runBlocking"),
            ),
            **self._relayThreads(),
        )

    def _relayThreads(self) -> dict[str, Any]:
        # Message bodies are read where the spool's files are written, not
        # in the pool where passwords are hashed.
        if self._spoolThreads is None:
            return {}
        return {"runBlocking": threadRunner(self.reactor, self._spoolThreads)}

    def _addListener(self, description: str, implicitTLS: bool) -> None:
        factory = SubmissionFactory(
            self.settings,
            self.portal,
            filterIntake(self.config, self.runner),
            self.reactor,
            self.tlsContext,
            implicitTLS=implicitTLS,
            policy=self.policy,
            guards=self.guards,
            metrics=self.metrics,
            etrn=makeEtrn(self.config, self.runner),
        )
        factory.milters = self.milters
        self.factories.append(factory)
        # RFC 8314 3.3: on the submissions port TLS starts with the first byte.
        wrapped: Any = factory
        if implicitTLS:
            wrapped = TLSMemoryBIOFactory(self.tlsContext, False, factory)
            wrapped = PlaintextSniffingFactory(wrapped, factory.listenerName)
        proxy = self.config.proxy
        if proxy.trusted:
            # Outermost: the PROXY header comes before TLS, from trusted peers only.
            wrapped = ProxyFactory(wrapped, proxy.trusted, self.reactor, proxy.headerTimeout)
        self._listeners.append((description, wrapped))

    def privilegedStartService(self) -> None:
        # Bind (ports below 1024 included) before twistd drops privileges.
        self._listen()
        super().privilegedStartService()

    def startService(self) -> None:
        if self._spoolThreads is not None and not self._spoolThreads.started:
            self._spoolThreads.start()
        self._listen()
        super().startService()

    def _listen(self) -> None:
        if self._listening is not None:
            return
        waits = []
        for description, factory in self._listeners:
            d = self.listenOn(description, factory)
            d.addCallback(self._listeningOn, description)
            waits.append(d)
        self._listening = gatherResults(waits, consumeErrors=True)
        self._listening.addErrback(self._listenFailed)

    def _listenOnEndpoint(self, description: str, factory: Any) -> Deferred[IListeningPort]:
        return serverFromString(self.reactor, description).listen(factory)

    def _listeningOn(self, port: IListeningPort, description: str) -> IListeningPort:
        self.ports.append(port)
        self.log.info(
            "listening on {description}: {address}", description=description, address=port.getHost()
        )
        return port

    def _listenFailed(self, failure: Any) -> None:
        error = failure.value
        error = getattr(error, "subFailure", failure).value  # FirstError from gatherResults
        self.log.error("Cannot listen: {error}", error=error)
        if self.exitOnListenFailure:
            # twistd: an operator must see this, and the process must not
            # run on without its listeners.
            sys.stderr.write(f"mailgw: cannot listen: {error}\n")
            sys.stderr.flush()
            os._exit(1)

    def whenListening(self) -> Deferred[list[IListeningPort]]:
        """Fires with the listening ports, in the order of the config."""
        if self._listening is None:
            return succeed([])
        d: Deferred[list[IListeningPort]] = Deferred()

        def fire(result: object) -> object:
            d.callback(list(self.ports))
            return result

        self._listening.addBoth(fire)
        return d

    def stopService(self) -> Deferred[Any]:
        """Stop listening, say 421 to connected clients, then stop the rest."""
        stopping = [port.stopListening() for port in self.ports]
        self.ports = []
        self._listening = None
        d: Deferred[Any] = DeferredList([d for d in stopping if d is not None])
        factories = self.factories + self.reinjectFactories
        d.addCallback(lambda _: DeferredList([f.shutdown() for f in factories]))
        d.addCallback(lambda _: super(GatewayService, self).stopService())
        d.addCallback(lambda _: self._closeSpool())
        return d

    def _closeSpool(self) -> None:
        if self._spoolThreads is not None and self._spoolThreads.started:
            self._spoolThreads.stop()  # waits for the steps under way: each is short
        close = getattr(self.spool, "close", None)
        if close is not None:
            close()


class _SystemResolver:
    """
    The system's DNS resolver (``/etc/resolv.conf``), made on first use:
    only MX routes query DNS, and a gateway that relays to smarthosts alone
    never starts twisted.names' periodic re-reading of resolv.conf.
    """

    def __init__(self) -> None:
        self._resolver: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._resolver is None:
            from twisted.names.client import createResolver

            self._resolver = createResolver()
        return getattr(self._resolver, name)


def _webhooks(config: Config, reactor: Any, runner: QueueRunner) -> WebhookSender | None:
    """The sender of ``[webhooks]``, following ``runner``'s messages; None when off."""
    hooks = config.webhooks
    if not hooks.urls:
        return None
    secret = readSecret(config.source, "webhooks.secret_file", hooks.secretFile)
    sender = WebhookSender(
        reactor,
        hooks.urls,
        secret,
        timeout=hooks.timeout,
        retries=hooks.retries,
        retryDelay=hooks.retryDelay,
        backlog=hooks.backlog,
    )
    runner.events.add(WebhookObserver(sender))
    return sender


class _OptionalControl(ControlService):
    """
    The control socket, as a part the gateway can run without: mail keeps
    flowing when it cannot listen (a path too long for a UNIX socket, a
    file in the way); only the `mailgw queue` commands that need the running
    gateway cannot reach it, and the log says so.
    """

    def startService(self) -> None:
        try:
            super().startService()
        except (CannotListenError, OSError) as e:
            self.running = True
            GatewayService.log.error(
                "Control socket unavailable ({error}); `mailgw queue flush`, hold, release "
                "and delete cannot reach this gateway",
                error=e,
            )
