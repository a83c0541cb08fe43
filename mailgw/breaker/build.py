"""
The breaker a gateway runs with, made from ``[breaker]``: kept in the spool
directory when the spool is on disk (else in memory), its alerts the log
line, the admin message (``admin_address``) and the webhook (``webhook``,
through the sender the gateway was given).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mailgw.breaker.alerts import AdminMessageAlert, WebhookAlert
from mailgw.breaker.breaker import AccountBreaker
from mailgw.breaker.config import BreakerConfig
from mailgw.breaker.store import PersistentBreaker
from mailgw.interfaces import IBreakerAlert, IQueue

_log = Logger(namespace="mailgw.breaker")


def makeBreaker(
    config: BreakerConfig,
    clock: Any,
    queue: IQueue,
    hostname: str,
    directory: str | None,
    runInThread: Callable[..., Deferred[Any]] | None,
    webhookSender: Any = None,
) -> AccountBreaker | None:
    """
    The breaker of ``config`` (None when it is off). ``directory``: where
    its state is kept (None: in memory only); ``runInThread`` writes it.
    """
    if not config.enabled:
        return None
    alerts: list[IBreakerAlert] = []
    if config.adminAddress:
        alerts.append(AdminMessageAlert(queue, config.adminAddress, hostname, clock))
    if config.webhook:
        if webhookSender is None:
            _log.warn("breaker: webhook = true, but this gateway has no webhook sender")
        else:
            alerts.append(WebhookAlert(webhookSender))
    if directory is None or runInThread is None:
        return AccountBreaker(clock, config, alerts)
    return PersistentBreaker(clock, config, directory, runInThread, alerts)
