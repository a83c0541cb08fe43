"""
The metrics listener (docs/metrics.md): ``GET /metrics`` in the Prometheus
text format and ``GET /healthz``, 200 ``ok`` while the gateway can take and
queue mail, 503 with the reasons otherwise. It is a twisted.web site on its
own endpoint (``[metrics] listen``), off unless configured; bind it to
loopback or a management network: it needs no authentication and tells
nothing but counts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

_log = Logger()

#: Checks: each returns None when well, else why not (one short line).
Check = Callable[[], str | None]


class MetricsPage(Resource):
    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.registry)


class HealthPage(Resource):
    """200 ``ok`` when every check passes, else 503 and one line per failed check."""

    isLeaf = True

    def __init__(self, checks: list[Check]) -> None:
        super().__init__()
        self.checks = checks

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        problems = [p for p in (check() for check in self.checks) if p]
        if problems:
            request.setResponseCode(503)
            return ("\n".join(problems) + "\n").encode("utf-8")
        return b"ok\n"


#: The longest request body the listener reads (the API's requests carry
#: none): twisted.web would otherwise store any body, in memory or a
#: temporary file, before a resource could look at the token.
MAX_BODY = 64 * 1024


class BoundedRequest(Request):
    """
    A request whose body may not pass L{MAX_BODY}: past it, the client gets
    ``413`` and the connection is closed, before any more is read or stored.
    """

    _seen = 0
    _refused = False

    def gotLength(self, length: int | None) -> None:
        super().gotLength(length)
        if length is not None and length > MAX_BODY:
            self._refuse()

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._seen += len(data)
        if self._seen > MAX_BODY:
            self._refuse()
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        if not self._refused:
            super().process()

    def _refuse(self) -> None:
        self._refused = True
        transport: Any = self.channel.transport  # type: ignore[union-attr]
        transport.write(
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        transport.loseConnection()


def makeSite(registry: CollectorRegistry, checks: list[Check], api: Resource | None = None) -> Site:
    """The site; ``api``: the queue API (docs/api.md) under ``/api``, when configured."""
    root = Resource()
    root.putChild(b"metrics", MetricsPage(registry))
    root.putChild(b"healthz", HealthPage(checks))
    if api is not None:
        root.putChild(b"api", api)
    site = Site(root, requestFactory=BoundedRequest)
    site.displayTracebacks = False
    return site


def gatewayChecks(gateway: Any) -> list[Check]:
    """The health of a L{mailgw.service.GatewayService}: listeners, spool, queue runner."""

    def listeners() -> str | None:
        wanted = len(gateway.factories)
        up = len(gateway.ports)
        if up < wanted:
            return f"listeners: {up} of {wanted} listening"
        return None

    def spool() -> str | None:
        directory = getattr(gateway.spool, "directory", None)
        if directory is None:
            return None  # not the on-disk spool (tests, embedders)
        for sub in ("tmp", "queue"):
            path = os.path.join(directory, sub)
            if not os.access(path, os.W_OK | os.X_OK):
                return f"spool: {sub} directory not writable"
        return None

    def runner() -> str | None:
        return None if gateway.runner.running else "queue runner: not running"

    return [listeners, spool, runner]


class MetricsService(Service):
    """
    Serves ``site`` on the endpoint ``description`` while running. It binds
    in L{privilegedStartService} (before twistd drops privileges); a failure
    to listen is logged, and mail goes on flowing without metrics.
    """

    def __init__(self, reactor: Any, description: str, site: Site) -> None:
        self.reactor, self.description, self.site = reactor, description, site
        self.port: IListeningPort | None = None
        self._listening: Deferred[IListeningPort | None] | None = None

    def privilegedStartService(self) -> None:
        self._listen()
        super().privilegedStartService()

    def startService(self) -> None:
        self._listen()
        super().startService()

    def _listen(self) -> None:
        if self._listening is not None:
            return
        d = serverFromString(self.reactor, self.description).listen(self.site)
        self._listening = d.addCallbacks(self._listeningOn, self._failed)

    def _listeningOn(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        _log.info("metrics and health on {address}", address=port.getHost())
        return port

    def _failed(self, failure: Failure) -> None:
        _log.error(
            "Cannot listen for metrics on {description}: {error}",
            description=self.description,
            error=failure.value,
        )

    def whenListening(self) -> Deferred[IListeningPort | None]:
        """Fires with the listening port (None: listening failed)."""
        d: Deferred[IListeningPort | None] = Deferred()
        if self._listening is None:
            d.callback(None)
            return d

        def fire(result: Any) -> Any:
            d.callback(self.port)
            return result

        self._listening.addBoth(fire)
        return d

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        port, self.port, self._listening = self.port, None, None
        if port is None:
            return None
        return port.stopListening()  # type: ignore[no-any-return]
