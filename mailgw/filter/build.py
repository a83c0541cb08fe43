"""
The content path's parts as the gateway builds them from its
configuration: the filter stage in front of the routes, the reinjection
listeners' factories and the ETRN handler. L{mailgw.service.GatewayService}
calls these.
"""

from __future__ import annotations

from typing import Any

from twisted.cred.portal import Portal

from mailgw.config import Config, RelayConfig, Route, Smarthost, TLSMode
from mailgw.filter.reinject import ReinjectIntake
from mailgw.filter.stage import FilterIntake, FilterStage, Hold
from mailgw.interfaces import IQueue, IRelay
from mailgw.policy import AcceptAll
from mailgw.relay.client import RelayTimeouts
from mailgw.relay.filecache import RunBlocking
from mailgw.relay.relay import Relay
from mailgw.server.etrn import Etrn
from mailgw.server.factory import Guards, ServerSettings, SubmissionFactory

__all__ = ["filterIntake", "filterStage", "makeEtrn", "reinjectFactory"]


def filterTimeouts(replyTimeout: float, connectTimeout: float) -> RelayTimeouts:
    """The relay client's timeouts towards the filter: one bound for every reply."""
    t = replyTimeout
    return RelayTimeouts(
        connect=connectTimeout,
        greeting=t,
        ehlo=t,
        command=t,
        mail=t,
        rcpt=t,
        dataInitiation=t,
        dataBlock=t,
        finalDot=t,
        quit=min(t, 30.0),
    )


def filterStage(
    config: Config,
    routes: IRelay,
    reactor: Any,
    hostname: str,
    opener: Any,
    hold: Hold,
    runBlocking: RunBlocking | None = None,
) -> IRelay:
    """
    ``routes`` behind the filter of ``config.filter``, or ``routes`` itself
    when there is no filter.
    """
    f = config.filter
    if not f.enabled:
        return routes
    route = Route(
        smarthosts=(Smarthost(f.host, f.port),),
        tls=TLSMode.NONE,  # a loopback filter (checked when the config was read)
        connectTimeout=f.connectTimeout,
    )
    filterRelay = Relay(
        reactor,
        RelayConfig(default=route),
        None,  # type: ignore[arg-type]  # a smarthost route: no DNS
        hostname,
        opener,
        maxConcurrency=f.maxConnections,
        maxPerHost=f.maxConnections,
        timeouts=filterTimeouts(f.replyTimeout, f.connectTimeout),
        runBlocking=runBlocking,
        lmtp=f.protocol == "lmtp",
    )
    return FilterStage(routes, filterRelay, f.name, holdReplies=f.holdReplies, hold=hold)


def filterIntake(config: Config, queue: IQueue) -> IQueue:
    """Where the submission listeners put messages: marked for the filter, if any."""
    return FilterIntake(queue, config.filter.name) if config.filter.enabled else queue


def makeEtrn(config: Config, runner: Any) -> Etrn | None:
    """ETRN over ``runner`` (the queue) when ``[etrn] enabled``."""
    if not config.etrn.enabled:
        return None
    return Etrn(runner.flushDomain, runner.flush, config.etrn.networks)


def reinjectFactory(
    config: Config,
    settings: ServerSettings,
    portal: Portal,
    queue: IQueue,
    reactor: Any,
    metrics: Any = None,
) -> SubmissionFactory:
    """
    A reinjection listener's factory: our own server, without STARTTLS or
    AUTH, sender ownership off (the filter sends as whoever the original
    sender was), clients from ``[reinject] networks`` only; the size, line
    and end-of-data checks are the submission listeners' own.
    """
    return SubmissionFactory(
        settings,
        portal,
        ReinjectIntake(queue),
        reactor,
        None,  # no STARTTLS: a loopback listener
        policy=AcceptAll(),
        guards=Guards(),
        metrics=metrics,
        reinjectNetworks=config.reinject.networks,
    )
