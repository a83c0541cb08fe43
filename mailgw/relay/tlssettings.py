"""
The relay client's settings for a host whose TLS level is known
(L{mailgw.relay.tlspolicy.PeerSecurity}): the mode, the client TLS creator,
the check run after the handshake, and whether plain text may follow a
failed STARTTLS. The trust stores the checks verify chains against are
built in threads and kept until their file changes.
"""

from __future__ import annotations

import functools
import ssl as stdssl
from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from mailgw import tls
from mailgw.config import TLSLevel, TLSMode
from mailgw.relay.clientsettings import RelaySettings
from mailgw.relay.dane import DaneCheck
from mailgw.relay.filecache import FileCache, RunBlocking
from mailgw.relay.routing import Destination
from mailgw.relay.tlspolicy import PeerSecurity
from mailgw.tls.peercheck import NameCheck

__all__ = ["LevelSettings", "systemTrustPath"]

#: The route's own ``verify`` settings for a destination (the relay's
#: cached, hostname-checking client contexts).
Verified = Callable[[Destination], Awaitable[RelaySettings]]


@attrs.define
class LevelSettings:
    """
    @ivar runBlocking: builds trust stores off the reactor thread.
    @ivar report: told C{(policyDomain, policyType, resultType)} of each
        failed check (TLS-RPT counting).
    """

    runBlocking: RunBlocking
    report: Callable[[str, str, str], None]
    trustStores: FileCache[Any] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.trustStores = FileCache(self.runBlocking, size=16)

    async def settings(
        self,
        destination: Destination,
        security: PeerSecurity,
        plain: RelaySettings,
        verified: Verified,
    ) -> RelaySettings:
        """
        ``plain`` (the settings without TLS) made to meet ``security``;
        ``verified`` gives the route's own ``verify`` settings.

        @raise TLSConfigError: the route's CA file is unusable.
        """
        level, route = security.level, destination.route
        if level is TLSLevel.NONE:
            return plain
        mode = TLSMode.IMPLICIT if route.tls is TLSMode.IMPLICIT else TLSMode.STARTTLS
        if level is TLSLevel.VERIFY and security.policy != "sts":
            # The route's own verify: twisted's hostname-checking context.
            return await verified(attrs.evolve(destination, tls=mode, security=None))
        check: Any = None
        report = self._reporter(security)
        if level is TLSLevel.DANE:
            check = DaneCheck(security.tlsa, security.names, report=report)
        elif level in (TLSLevel.VERIFY, TLSLevel.SECURE) or security.testing:
            # MTA-STS (RFC 8461 4.2: the MX host's name), secure's names; in
            # testing mode the same check, logged and counted, not enforced.
            store = await self._trustStore(route.caFile or None)
            check = NameCheck(store, security.names, enforce=not security.testing, report=report)
        return attrs.evolve(
            plain,
            tlsMode=TLSMode.OPPORTUNISTIC if level is TLSLevel.MAY else mode,
            tlsCreator=tls.PeerTLSCreator(destination.host),
            peerCheck=check,
            tlsVerifies=False,
            plaintextFallback=level is TLSLevel.MAY,
        )

    async def _trustStore(self, caFile: str | None) -> Any:
        return await self.trustStores.get(
            caFile, caFile or systemTrustPath(), lambda: tls.trustStore(caFile)
        )

    def _reporter(self, security: PeerSecurity) -> Callable[[str], None]:
        def report(resultType: str) -> None:
            self.report(security.policyDomain, security.policy, resultType)

        return report


@functools.cache
def systemTrustPath() -> str:
    """The file (or directory) OpenSSL's default trust store is read from,
    whose changes rebuild the cached contexts that use it. Looked up once
    (it stats files): where the store lives does not change while we run."""
    paths = stdssl.get_default_verify_paths()
    # cafile and capath as resolved (SSL_CERT_FILE and SSL_CERT_DIR included),
    # None where nothing exists: then nothing is cached, and every attempt
    # builds its context.
    return paths.cafile or paths.capath or ""
