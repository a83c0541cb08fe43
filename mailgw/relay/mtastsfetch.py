"""
The HTTPS fetch of an MTA-STS policy (RFC 8461 3.3):
``https://mta-sts.DOMAIN/.well-known/mta-sts.txt`` with Twisted's web
client, the certificate verified for ``mta-sts.DOMAIN``, no redirect
followed, status 200 and ``text/plain`` required, the body at most 64 KiB
and the whole fetch bounded in time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from OpenSSL import crypto
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from zope.interface import implementer

from mailgw.relay.mtasts import MAX_POLICY_SIZE
from mailgw.tls.files import loadCertificates

__all__ = ["FetchError", "PolicyFetcher"]

#: Makes the TCP endpoint for ``(host, port)`` (tests point it at 127.0.0.1).
TCPEndpoint = Callable[[str, int], IStreamClientEndpoint]


class FetchError(Exception):
    """The policy could not be fetched (RFC 8460: sts-policy-fetch-error)."""


@implementer(IAgentEndpointFactory)
class _Endpoints:
    def __init__(self, fetcher: PolicyFetcher) -> None:
        self.fetcher = fetcher

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        creator = ssl.optionsForClientTLS(host, trustRoot=self.fetcher.trustRoot)
        tcp = self.fetcher.tcpEndpoint(host, uri.port)
        return wrapClientTLS(creator, tcp, clock=self.fetcher.reactor)


class _Body(Protocol):
    def __init__(self, done: Deferred[bytes], limit: int) -> None:
        self.done, self.limit, self.size = done, limit, 0
        self.parts: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            if not self.done.called:
                self.done.errback(FetchError(f"policy larger than {self.limit} bytes"))
            self.transport.stopProducing()  # type: ignore[union-attr]
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(FetchError(f"policy body cut short: {reason.getErrorMessage()}"))


class _Discard(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]


class PolicyFetcher:
    """
    Fetches policies (L{mailgw.relay.mtasts.Fetch}).

    @param reactor: connects and times the fetch.
    @param caFile: trust only these certificates (tests); by default the
        system's trust store.
    @param tcpEndpoint: the TCP endpoint for a host and port; by default a
        L{HostnameEndpoint}.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        caFile: str | None = None,
        tcpEndpoint: TCPEndpoint | None = None,
        timeout: float = 60,
        maxSize: int = MAX_POLICY_SIZE,
    ) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self.maxSize = maxSize
        if caFile:
            certificates = [
                ssl.Certificate(crypto.X509.from_cryptography(c)) for c in loadCertificates(caFile)
            ]
            self.trustRoot: Any = ssl.trustRootFromCertificates(certificates)
        else:
            self.trustRoot = ssl.platformTrust()
        self.tcpEndpoint = tcpEndpoint or (
            lambda host, port: HostnameEndpoint(reactor, host, port, timeout=timeout)
        )
        self.agent = Agent.usingEndpointFactory(reactor, _Endpoints(self))

    def __call__(self, domain: str) -> Deferred[bytes]:
        url = f"https://mta-sts.{domain}/.well-known/mta-sts.txt".encode("ascii")
        d = Deferred.fromCoroutine(self._fetch(url))
        timer = self.reactor.callLater(self.timeout, d.cancel)

        def finished(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            elif isinstance(result, Failure):
                return Failure(FetchError("timeout fetching the policy"))
            return result

        return d.addBoth(finished)

    async def _fetch(self, url: bytes) -> bytes:
        try:
            response: IResponse = await self.agent.request(
                b"GET", url, Headers({b"User-Agent": [b"mailgw MTA-STS"]})
            )
        except Exception as e:
            raise FetchError(f"cannot fetch the policy: {type(e).__name__}: {e}") from None
        if response.code != 200:
            # Redirects included: RFC 8461 3.3 forbids following them.
            response.deliverBody(_Discard())
            raise FetchError(f"HTTP status {response.code}")
        kind = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        if kind.split(b";")[0].strip().lower() != b"text/plain":
            response.deliverBody(_Discard())
            raise FetchError("the policy is not text/plain")
        done: Deferred[bytes] = Deferred()
        response.deliverBody(_Body(done, self.maxSize))
        return await done
