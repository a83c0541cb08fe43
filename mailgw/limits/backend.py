"""
The shared limits as the gateway builds them from ``[limits] backend``:
the engine (Redis), the L{SyncedCounters} the limiters count through, and
the service that starts and stops its syncing with the gateway.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred

from mailgw._configparse import ConfigError
from mailgw.apiconfig import readSecret
from mailgw.config import LimitsConfig
from mailgw.limits.shared import SyncedCounters
from mailgw.sharedconfig import parseBackend


def makeSharedCounters(limits: LimitsConfig, source: str, reactor: Any) -> SyncedCounters | None:
    """
    The site's shared counts as ``limits.backend`` configures them (read
    from the file ``source``), or None when no backend is set.

    @raise ConfigError: the password file cannot be read, or the ``redis``
        package is missing.
    """
    if not limits.backend:
        return None
    address = parseBackend(limits.backend)
    password = None
    if limits.backendPasswordFile:
        secret = readSecret(source, "limits.backend_password_file", limits.backendPasswordFile)
        password = secret.decode("utf-8", "replace")
    try:
        from mailgw.limits.redisengine import RedisCounters

        engine = RedisCounters(reactor, address, limits.namespace, password, limits.backendTimeout)
    except ImportError:
        raise ConfigError(
            source,
            "limits.backend",
            "the redis package is missing: pip install 'mailgw[redis]'",
        ) from None
    return SyncedCounters(
        reactor,
        engine,
        interval=limits.backendSyncInterval,
        staleness=limits.backendStaleness,
        timeout=limits.backendTimeout,
        retry=limits.backendRetry,
        description=f"Redis {engine.description}",
    )


class SharedLimitsService(Service):
    """Syncs ``counters`` with their engine while the gateway runs."""

    def __init__(self, counters: SyncedCounters) -> None:
        self.counters = counters

    def startService(self) -> None:
        super().startService()
        self.counters.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.counters.stop()
