"""
The factory that builds one server session per connection of a listener.
It is the sessions' L{mailgw.server.settings.Listener}; the settings and
guards live in L{mailgw.server.settings} (re-exported here).
"""

from __future__ import annotations

from typing import Any

from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory

from mailgw._configparse import Network
from mailgw.interfaces import IQueue, ISubmissionPolicy
from mailgw.policy import AcceptAll
from mailgw.server.protocol import SubmissionServer
from mailgw.server.sasl import portalMechanisms
from mailgw.server.settings import Guards, ServerSettings

__all__ = ["Guards", "ServerSettings", "SubmissionFactory"]


class SubmissionFactory(Factory):
    """
    Builds L{SubmissionServer} protocols for one listener.

    ``implicitTLS`` is true for a submissions (port 465) listener: the
    endpoint is wrapped in TLS by the caller, and STARTTLS is not offered.
    ``tlsContext`` is the server context shared by STARTTLS and implicit TLS.
    The factory is the sessions' L{mailgw.server.settings.Listener}.
    """

    def __init__(
        self,
        settings: ServerSettings,
        portal: Portal,
        spool: IQueue,
        clock: IReactorTime,
        tlsContext: Any,
        implicitTLS: bool = False,
        policy: ISubmissionPolicy | None = None,
        guards: Guards | None = None,
        metrics: Any = None,
        reinjectNetworks: tuple[Network, ...] | None = None,
        etrn: Any = None,
    ) -> None:
        self.settings = settings
        self.portal = portal
        self.spool = spool
        self.clock = clock
        self.tlsContext = tlsContext
        self.implicitTLS = implicitTLS
        self.policy = policy if policy is not None else AcceptAll()
        self.guards = guards if guards is not None else Guards()
        self.connections: set[SubmissionServer] = set()
        #: L{mailgw.metrics.Metrics}, or None: metrics are off.
        self.metrics = metrics
        #: Set: a reinjection listener (docs/content-filter.md): no AUTH,
        #: clients from these networks only, refused at the greeting otherwise.
        self.reinjectNetworks = reinjectNetworks
        self.etrn = etrn  # mailgw.server.etrn.Etrn when ETRN is offered
        #: L{mailgw.interfaces.IMilterChain} ([milter] servers), or None: no milter.
        self.milters: Any = None

    @property
    def mechanisms(self) -> tuple[str, ...]:
        """The SASL mechanisms to offer now (read at each EHLO and AUTH; the checkers cache)."""
        return portalMechanisms(self.portal)

    @property
    def listenerName(self) -> str:
        if self.reinjectNetworks is not None:
            return "reinject"
        return "submissions" if self.implicitTLS else "submission"

    def buildProtocol(self, addr: Any) -> SubmissionServer:  # type: ignore[override]
        return SubmissionServer(self)

    def shutdown(self) -> Deferred[Any]:
        """
        Tell every client that the service is going away (421 4.3.2) and
        close; a command being worked on (a message being checked or
        committed, an AUTH being verified) gets its reply first.

        @return: a Deferred that fires once every connection is gone: at
            the latest ``closeTimeout`` seconds after its close began, since
            a peer that does not finish the close is aborted.
        """
        waits = [connection.shutdown() for connection in list(self.connections)]
        return DeferredList(waits, consumeErrors=True)
