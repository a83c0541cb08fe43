"""
What a session is handed by its listener: the listener's settings, the
shared abuse defences, and the L{Listener} protocol the factory provides,
so the session never imports the factory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import attrs
from twisted.cred.portal import Portal
from twisted.internet.interfaces import IReactorTime

from mailgw._configparse import Network
from mailgw.interfaces import IAccountBreaker, IQueue, ISubmissionPolicy
from mailgw.limits import AuthThrottle, ConnectionLimiter, SubmissionQuota


@attrs.frozen
class ServerSettings:
    """
    What every connection of one listener shares. Sizes are octets, times
    seconds.

    ``preAuthTimeout``: a session not authenticated this long after it
    began is closed (421 4.7.0). ``maxJunkCommands``: commands that do
    nothing (NOOP, RSET, HELP, VRFY, EXPN, a repeated EHLO or HELO) allowed
    until a message is queued; one more closes the session (421 4.7.0).
    ``receivedClientAddress``: name the client's IP address in our
    ``Received:`` header (false: leave it out, for privacy).
    ``closeTimeout``: after the server closes a connection, the peer has
    this long to finish the close (answer the TLS close_notify) before the
    connection is aborted. ``acceptBareLF``: an authenticated client's
    message lines that end in a bare LF are converted to CRLF instead of
    refusing the message (see L{mailgw.server.data}). ``binaryMime``: offer
    BINARYMIME (RFC 3030): such a message comes in BDAT chunks and is stored
    as received (L{mailgw.server.data.BinaryReader}).
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
    receivedClientAddress: bool = True
    maxErrors: int = 20
    legacyAuthLine: bool = False
    preAuthTimeout: float = 30.0
    maxJunkCommands: int = 20
    closeTimeout: float = 5.0
    acceptBareLF: bool = False
    binaryMime: bool = False


@attrs.define
class Guards:
    """
    The abuse defences every listener shares (L{mailgw.limits}); ``None``
    switches one off (tests and embedders).
    """

    connections: ConnectionLimiter | None = None
    auth: AuthThrottle | None = None
    quota: SubmissionQuota | None = None
    #: The account breaker (docs/breaker.md): sees each login, may refuse it.
    breaker: IAccountBreaker | None = None


class Listener(Protocol):
    """
    What a session reads from the listener that accepted it (the
    L{mailgw.server.factory.SubmissionFactory} provides it). Attributes are
    read when used, so a test may swap the policy or a guard.
    """

    settings: ServerSettings
    portal: Portal
    spool: IQueue  # where messages go: committing one schedules it
    clock: IReactorTime
    tlsContext: Any
    implicitTLS: bool
    policy: ISubmissionPolicy
    guards: Guards
    connections: set[Any]
    #: A reinjection listener's client networks (no AUTH, clients from these
    #: only); None for a submission listener.
    reinjectNetworks: tuple[Network, ...] | None
    #: ETRN (L{mailgw.server.etrn.Etrn}) when offered, else None.
    etrn: Any

    @property
    def mechanisms(self) -> Sequence[str]:
        """The SASL mechanisms offered (under TLS) and accepted."""

    @property
    def listenerName(self) -> str:
        """``submission``, ``submissions`` or ``reinject``."""
