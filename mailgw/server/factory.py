"""
Per-listener settings and the factory that builds one server protocol per
connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory

from mailgw.interfaces import ISpool, ISubmissionPolicy
from mailgw.limits import AuthThrottle, ConnectionLimiter, SubmissionQuota
from mailgw.policy import AcceptAll
from mailgw.server.sasl import portalMechanisms

if TYPE_CHECKING:
    from mailgw.server.protocol import SubmissionServer


@attrs.frozen
class ServerSettings:
    """
    What every connection of one listener shares. Sizes are octets, times
    seconds.
    """

    hostname: str
    maxMessageSize: int = 36700160
    maxRecipients: int = 100
    maxLineLength: int = 65536
    idleTimeout: float = 300.0
    commandTimeout: float = 60.0
    sessionTimeout: float = 1800.0
    maxHeaderSize: int = 262144
    maxReceivedHeaders: int = 50
    maxErrors: int = 20
    legacyAuthLine: bool = False


@attrs.define
class Guards:
    """
    The abuse defences every listener shares (L{mailgw.limits}); ``None``
    switches one off (tests and embedders).
    """

    connections: ConnectionLimiter | None = None
    auth: AuthThrottle | None = None
    quota: SubmissionQuota | None = None


class SubmissionFactory(Factory):
    """
    Builds L{SubmissionServer} protocols for one listener.

    ``implicitTLS`` is true for a submissions (port 465) listener: the
    endpoint is wrapped in TLS by the caller, and STARTTLS is not offered.
    ``tlsContext`` is the server context shared by STARTTLS and implicit TLS.
    ``onQueued`` is called with the queue id of every committed message
    (the queue runner's L{mailgw.interfaces.IQueueControl.notify}).
    """

    def __init__(
        self,
        settings: ServerSettings,
        portal: Portal,
        spool: ISpool,
        clock: IReactorTime,
        tlsContext: Any,
        implicitTLS: bool = False,
        policy: ISubmissionPolicy | None = None,
        onQueued: Callable[[str], object] | None = None,
        guards: Guards | None = None,
    ) -> None:
        self.settings = settings
        self.portal = portal
        self.spool = spool
        self.clock = clock
        self.tlsContext = tlsContext
        self.implicitTLS = implicitTLS
        self.policy = policy if policy is not None else AcceptAll()
        self.onQueued = onQueued
        self.guards = guards if guards is not None else Guards()
        self.connections: set[SubmissionServer] = set()

    @property
    def mechanisms(self) -> tuple[str, ...]:
        """The SASL mechanisms to offer now (read at each EHLO and AUTH; the checkers cache)."""
        return portalMechanisms(self.portal)

    @property
    def listenerName(self) -> str:
        return "submissions" if self.implicitTLS else "submission"

    def buildProtocol(self, addr: Any) -> SubmissionServer:  # type: ignore[override]
        from mailgw.server.protocol import SubmissionServer

        protocol = SubmissionServer()
        protocol.factory = self
        return protocol

    def shutdown(self) -> Deferred[Any]:
        """
        Tell every client that the service is going away (421 4.3.2) and
        close; a message being committed gets its reply first.

        @return: a Deferred that fires once every connection is closed.
        """
        waits = [connection.shutdown() for connection in list(self.connections)]
        return DeferredList(waits, consumeErrors=True)
