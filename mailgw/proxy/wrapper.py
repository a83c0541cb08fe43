"""
The PROXY protocol (HAProxy, versions 1 and 2), accepted from trusted
proxies only.

Behind a load balancer every connection comes from the balancer; the PROXY
header it sends first names the real client, which limits, logs and the
``Received:`` header must see. A header is believed only from a peer in
the configured trusted networks, and such a peer must send one; a header
from anyone else is refused, since whoever could send it could claim any
address.

L{ProxyFactory} goes outermost, around the factory the listener would
otherwise use (TCP -> ProxyFactory -> TLSMemoryBIOFactory on 465 ->
SubmissionFactory). The header is parsed by L{mailgw.proxy.header}, our
own parser; Twisted's C{twisted.protocols.haproxy} also trusts every peer.

Specification: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt
(cited below as "spec").
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    ILoggingContext,
    IProtocol,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

from mailgw.proxy.header import (
    Network,
    ProxyHeader,
    ProxyHeaderError,
    parseProxyHeader,
    startsHeader,
)


def _hostOf(address: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not isinstance(address, IPv4Address | IPv6Address):
        return None  # UNIX sockets and the like are never trusted
    try:
        return ipaddress.ip_address(address.host.partition("%")[0])
    except ValueError:
        return None


# Connection states.
_AWAIT_HEADER = "await-header"  # trusted peer, header not complete yet
_SNIFF = "sniff"  # untrusted peer, its first octets could still open a header
_PASS = "pass"  # transparent from here on
_REFUSED = "refused"  # closing; nothing more is passed on


class ProxyProtocol(ProtocolWrapper):
    """
    One connection through a L{ProxyFactory}; the transport its wrapped
    protocol sees. After the header it relays everything both ways, and
    STARTTLS works through it: C{startTLS} reaches the TCP transport, which
    then decrypts into this wrapper and encrypts what it writes.
    """

    factory: ProxyFactory
    wrappedProtocol: Any  # None until a trusted peer's header is complete
    # A TCP transport in production (startTLS, abortConnection ...).
    transport: Any
    _log = Logger()

    def __init__(
        self, factory: ProxyFactory, wrappedProtocol: IProtocol | None, trusted: bool
    ) -> None:
        self.factory = factory
        self.wrappedProtocol = wrappedProtocol
        self.trusted = trusted
        self.header: ProxyHeader | None = None
        self._state = _AWAIT_HEADER if trusted else _SNIFF
        self._buffer = b""
        self._timer: IDelayedCall | None = None

    def logPrefix(self) -> str:
        wrapped = self.wrappedProtocol or self.factory.wrappedFactory
        if ILoggingContext.providedBy(wrapped):
            return f"{wrapped.logPrefix()} (PROXY)"
        return f"{type(wrapped).__name__} (PROXY)"

    def makeConnection(self, transport: Any) -> None:
        # Claim what the real transport provides (ITCPTransport,
        # ITLSTransport ...), as ProtocolWrapper does.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)

    def connectionMade(self) -> None:
        self.factory.registerProtocol(self)
        if self.trusted:
            self._startTimer()
        else:
            # The server speaks first (the SMTP greeting), so an untrusted
            # client is connected at once and only its first octets are
            # checked.
            self.wrappedProtocol.makeConnection(self)

    def _startTimer(self) -> None:
        if self._timer is None:
            self._timer = self.factory.clock.callLater(self.factory.headerTimeout, self._timedOut)

    def _stopTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timedOut(self) -> None:
        self._timer = None
        if self._state == _AWAIT_HEADER:
            self._refuse(
                "No complete PROXY header from trusted peer {peer} within {timeout}s; closed",
                warn=True,
                timeout=self.factory.headerTimeout,
            )
        elif self._state == _SNIFF:
            # A few octets that could open a signature ("\r\n", "PRO") and
            # then silence: an odd client waiting for a reply, not a header.
            self._pass()

    def _refuse(self, message: str, warn: bool = False, **fields: object) -> None:
        # A trusted peer getting it wrong is a misconfigured proxy: warn.
        # An untrusted one trying is probing: worth a line, no more.
        self._stopTimer()
        self._state = _REFUSED
        self._buffer = b""
        peer = self.transport.getPeer()
        log = self._log.warn if warn else self._log.info
        log(message, peer=getattr(peer, "host", peer), **fields)
        self.transport.loseConnection()

    def _pass(self) -> None:
        self._stopTimer()
        self._state = _PASS
        data, self._buffer = self._buffer, b""
        if data:
            self.wrappedProtocol.dataReceived(data)

    def dataReceived(self, data: bytes) -> None:
        if self._state == _PASS:
            self.wrappedProtocol.dataReceived(data)
        elif self._state == _AWAIT_HEADER:
            self._buffer += data
            self._readHeader()
        elif self._state == _SNIFF:
            self._buffer += data
            opens = startsHeader(self._buffer)
            if opens is None:
                self._startTimer()
            elif opens:
                self._refuse("PROXY header from untrusted peer {peer} refused")
            else:
                self._pass()

    def _readHeader(self) -> None:
        try:
            header = parseProxyHeader(self._buffer)
        except ProxyHeaderError as e:
            message = "Bad PROXY header from trusted peer {peer}: {reason}; closed"
            self._refuse(message, warn=True, reason=e)
            return
        if header is None:
            return
        self._stopTimer()
        self.header = header
        rest, self._buffer = self._buffer[header.length :], b""
        protocol = self.factory.wrappedFactory.buildProtocol(self.getPeer())
        if protocol is None:
            self._state = _REFUSED
            self.transport.loseConnection()
            return
        self._state = _PASS
        self.wrappedProtocol = protocol
        protocol.makeConnection(self)
        if rest and not self.disconnecting:
            protocol.dataReceived(rest)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stopTimer()
        self._buffer = b""
        self._state = _REFUSED
        self.factory.unregisterProtocol(self)
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.connectionLost(reason)
            self.wrappedProtocol = None

    # -- transport, as the wrapped protocol sees it ------------------------
    # write, writeSequence, loseConnection and the producer methods are
    # ProtocolWrapper's; anything else (setTcpNoDelay, pauseProducing,
    # getHandle ...) reaches the real transport through
    # ProtocolWrapper.__getattr__.

    def startTLS(self, contextFactory: Any, normal: bool = True) -> None:
        # The TCP transport puts TLS between itself and this wrapper: it
        # decrypts into dataReceived and encrypts what write hands it. Then
        # claim ISSLTransport as it now does.
        self.transport.startTLS(contextFactory, normal)
        directlyProvides(self, providedBy(self.transport))

    def abortConnection(self) -> None:
        self.disconnecting = 1
        self.transport.abortConnection()

    def getPeer(self) -> IAddress:
        if self.header is not None and self.header.source is not None:
            return self.header.source
        return self.transport.getPeer()

    def getHost(self) -> IAddress:
        if self.header is not None and self.header.destination is not None:
            return self.header.destination
        return self.transport.getHost()


class ProxyFactory(WrappingFactory):
    """
    Accepts the PROXY protocol from ``trusted`` networks only.

    A peer in ``trusted`` must open with a PROXY header (v1 or v2) within
    ``headerTimeout`` seconds; then the wrapped factory builds its protocol
    for the proxied client, whose address C{getPeer} returns from then on
    (C{getHost}: the address the client connected to). A v1 ``UNKNOWN`` or
    v2 ``LOCAL`` header (health checks) keeps the real peer. A missing,
    malformed or oversized header closes the connection; nothing reaches the
    wrapped protocol.

    Any other peer is passed straight through, except that a connection
    whose first octets are a PROXY signature is closed: an untrusted peer
    must not be able to claim an address.

    @param trusted: networks of the proxies, e.g.
        C{[ipaddress.ip_network("10.0.0.0/8")]}; strings are parsed.
    @raise ValueError: a network is malformed or has host bits set, or
        ``headerTimeout`` is not positive.
    """

    protocol = ProxyProtocol

    def __init__(
        self,
        wrappedFactory: Factory,
        trusted: Sequence[Network | str],
        clock: IReactorTime,
        headerTimeout: float = 5.0,
    ) -> None:
        super().__init__(wrappedFactory)
        self.trusted: tuple[Network, ...] = tuple(ipaddress.ip_network(n) for n in trusted)
        if not headerTimeout > 0:
            raise ValueError(f"headerTimeout must be positive, got {headerTimeout!r}")
        self.clock = clock
        self.headerTimeout = headerTimeout

    def isTrusted(self, address: object) -> bool:
        """Whether ``address`` (a peer's IAddress) is in a trusted network."""
        host = _hostOf(address)
        if host is None:
            return False
        hosts = [host]
        if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None:
            hosts.append(host.ipv4_mapped)  # dual-stack listener, IPv4 proxy
        return any(h in network for h in hosts for network in self.trusted)

    def buildProtocol(self, addr: IAddress | None) -> ProxyProtocol | None:  # type: ignore[override]
        if self.isTrusted(addr):
            return ProxyProtocol(self, None, trusted=True)
        wrapped = self.wrappedFactory.buildProtocol(addr)
        if wrapped is None:
            return None
        return ProxyProtocol(self, wrapped, trusted=False)
