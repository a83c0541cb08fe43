"""
What the relay client is told (L{RelaySettings}, L{RelayTimeouts}, how to
open a message) and what it tells back besides results (L{Attempt}: the
connection they came over).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, BinaryIO

import attrs
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

from mailgw.config import TLSMode
from mailgw.envelope import DeliveryResult
from mailgw.relay.clienttransaction import wireSafe

__all__ = ["Attempt", "MessageOpener", "OnFinished", "RelaySettings", "RelayTimeouts"]

#: Opens a queued message's bytes for reading, given its queue id (e.g.
#: L{mailgw.interfaces.ISpool.openMessage}).
MessageOpener = Callable[[str], BinaryIO]


@attrs.frozen
class Attempt:
    """
    The connection a result came over, for the log: the peer's address and
    port (None when no connection was made) and the TLS version and cipher
    negotiated (None without TLS).
    """

    peer: tuple[str, int] | None = None
    tlsVersion: str | None = None
    tlsCipher: str | None = None
    tlsVerified: bool = False  # the session's TLS authenticated the upstream


#: Called once per message, with its position in the batch, one result per
#: pending recipient and the connection they came over, as soon as every
#: recipient of that message has its result in this session.
OnFinished = Callable[[int, list[DeliveryResult], Attempt], None]


@attrs.frozen
class RelayTimeouts:
    """
    Seconds to wait, RFC 5321 4.5.3.2 defaults. C{command} covers what that
    section does not list (STARTTLS, AUTH, RSET; HELO uses C{ehlo});
    C{quit} bounds the polite goodbye, after every result is already known.
    """

    connect: float = 30.0
    greeting: float = 300.0
    ehlo: float = 300.0
    command: float = 300.0
    mail: float = 300.0
    rcpt: float = 300.0
    dataInitiation: float = 120.0
    dataBlock: float = 180.0
    finalDot: float = 600.0
    quit: float = 30.0


def _hideSecret(auth: tuple[str, str, str] | None) -> str:
    return "None" if auth is None else f"({auth[0]!r}, '***', {auth[2]!r})"


@attrs.frozen
class RelaySettings:
    """
    How to talk to one upstream.

    @ivar hostname: the upstream's name, as given to C{optionsForClientTLS}
        when C{tlsCreator} was built; it is the C{remote} of every result.
    @ivar ehloHostname: our name in EHLO/HELO.
    @ivar tlsMode: STARTTLS (required), OPPORTUNISTIC (when offered, then
        required to succeed), IMPLICIT (L{deliverBatch} wraps the endpoint
        in TLS itself) or NONE (plain text; loopback upstreams only).
    @ivar tlsCreator: verifies the upstream certificate; required unless
        C{tlsMode} is NONE.
    @ivar auth: C{(user, password, "PLAIN" | "LOGIN")} or None.
    @ivar lmtp: speak LMTP (RFC 2033): LHLO, and one reply per accepted
        recipient after the data.
    @ivar peerCheck: run on the TLS connection once the handshake is done
        (L{mailgw.tls.peercheck.PeerCheck}: levels secure, DANE, MTA-STS
        testing), or None.
    @ivar tlsVerifies: C{tlsCreator} itself authenticates the upstream
        (false for the unverified levels may and encrypt).
    @ivar plaintextFallback: level may: when STARTTLS is refused or its
        handshake fails, go on (or connect again) in plain text.
    """

    hostname: str
    ehloHostname: str
    tlsMode: TLSMode = TLSMode.STARTTLS
    tlsCreator: IOpenSSLClientConnectionCreator | None = None
    auth: tuple[str, str, str] | None = attrs.field(default=None, repr=_hideSecret)
    timeouts: RelayTimeouts = RelayTimeouts()
    lmtp: bool = False
    peerCheck: Any = None
    tlsVerifies: bool = True
    plaintextFallback: bool = False

    def __attrs_post_init__(self) -> None:
        if not self.ehloHostname or not wireSafe(self.ehloHostname) or " " in self.ehloHostname:
            raise ValueError(f"bad EHLO host name {self.ehloHostname!r}")
        if self.tlsMode is not TLSMode.NONE and self.tlsCreator is None:
            raise ValueError(f"TLS mode {self.tlsMode.value} needs a tlsCreator")
        if self.auth is not None and self.auth[2] not in ("PLAIN", "LOGIN"):
            raise ValueError(f"unsupported AUTH mechanism {self.auth[2]!r}")
