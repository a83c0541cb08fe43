"""
Pieces of a reload without restart (docs/operations.md):

- L{SwappableContextFactory}, the server TLS context factory every listener
  holds: each new TLS connection (implicit TLS, or STARTTLS) asks it for the
  current context, so a reload that swaps in a new certificate reaches new
  sessions, while a session already encrypted keeps the context (and the
  certificate) it was built with.
- L{restartOnly}: the settings a reload cannot change in a running gateway.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IOpenSSLContextFactory, IOpenSSLServerConnectionCreator
from zope.interface import implementer

from mailgw.config import Config


@implementer(IOpenSSLContextFactory, IOpenSSLServerConnectionCreator)
class SwappableContextFactory:
    """
    A server context factory (``getContext()``, as Twisted's
    ``CertificateOptions``) that forwards to the one swapped in last,
    connections included: the current one makes each server connection
    (L{mailgw.tls.ServerTLSOptions} makes connections that log a failed
    handshake).
    """

    def __init__(self, current: Any) -> None:
        self.current = current

    def swap(self, new: Any) -> None:
        """Hand ``new`` to every TLS connection from now on."""
        self.current = new

    def getContext(self) -> Any:
        return self.current.getContext()

    def serverConnectionForTLS(self, protocol: Any) -> Any:
        make = getattr(self.current, "serverConnectionForTLS", None)
        if make is not None:
            return make(protocol)
        from OpenSSL.SSL import Connection

        return Connection(self.current.getContext(), None)


#: Dotted keys of the settings a running gateway keeps until restarted:
#: listeners are bound, the spool is open, the limits' counters and the
#: queue runner's timings live in running objects.
_RESTART_ONLY = (
    ("server.submission", lambda c: c.server.submission),
    ("server.submissions", lambda c: c.server.submissions),
    ("server.workers", lambda c: c.server.workers),
    ("spool.directory", lambda c: c.spool.directory),
    ("limits", lambda c: c.limits),
    ("queue", lambda c: c.queue),
    ("proxy", lambda c: c.proxy),
    ("filter", lambda c: c.filter),
    ("reinject", lambda c: c.reinject),
    ("etrn", lambda c: c.etrn),
    ("breaker", lambda c: c.breaker),
)


def restartOnly(old: Config, new: Config) -> list[str]:
    """The restart-only settings that differ between ``old`` and ``new``."""
    return [key for key, get in _RESTART_ONLY if get(old) != get(new)]
