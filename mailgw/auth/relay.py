"""
SASL exchanges a backend conducts itself: the backend's service (Dovecot)
makes the challenges and checks the answers, and mailgw carries the bytes
between it and the client.

A checker that relays exchanges provides L{ISASLRelay}: for a mechanism it
relays (CRAM-MD5, SCRAM-SHA-256) it opens an L{ISASLConversation}, which
the server's AUTH phase drives one client response at a time. Each step
answers with the service's next challenge (L{RelayChallenge}) or its
verdict (L{RelayVerdict}); the verdict is then handed to the portal as
L{RelayedCredentials}, so that a relayed login ends as every other does
(the realm, the throttle's outcome, the reply).
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.cred.credentials import ICredentials
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface, implementer

__all__ = [
    "IRelayedCredentials",
    "ISASLConversation",
    "ISASLRelay",
    "RelayChallenge",
    "RelayVerdict",
    "RelayedCredentials",
]


@attrs.frozen
class RelayChallenge:
    """The service's next challenge: send ``334 base64(data)``, relay the answer."""

    data: bytes = attrs.field(repr=False)


@attrs.frozen
class RelayVerdict:
    """
    The service's last word: ``login`` (as the service names the user) when
    it accepted, C{None} when it refused; ``final`` is the server's final
    data that comes with an acceptance (RFC 4954 4: a 334 the client
    answers with an empty line before the 235), if any.
    """

    source: Any = attrs.field(repr=False)
    login: bytes | None
    final: bytes | None = attrs.field(default=None, repr=False)


class ISASLConversation(Interface):
    """One exchange conducted by a backend's service."""

    def step(response: bytes | None) -> Deferred[RelayChallenge | RelayVerdict]:
        """
        The first call opens the exchange with the client's initial
        response (C{None}: none was given); every later call carries the
        client's answer to the last challenge.

        @return: a Deferred firing with the next L{RelayChallenge} or the
            L{RelayVerdict}; failing when the service cannot answer
            (unreachable, too slow: transient, 454 4.7.0).
        """

    def cancel() -> None:
        """The client cancelled or left: the service forgets the exchange."""


class ISASLRelay(Interface):
    """A credentials checker whose service conducts some exchanges itself."""

    def converse(mechanism: str, clientAddress: str) -> ISASLConversation:
        """An exchange of ``mechanism`` for the client at ``clientAddress``."""


class IRelayedCredentials(ICredentials):
    """The verdict of a relayed exchange, for the checker whose service gave it."""

    username = Attribute("The login the service vouched for (bytes), or the client's claim.")
    verdict = Attribute("The L{RelayVerdict}.")


@implementer(IRelayedCredentials)
@attrs.frozen
class RelayedCredentials:
    """What a relayed exchange ended with; ``username`` is for logs and the throttle."""

    username: bytes
    verdict: RelayVerdict

    def serverFinal(self) -> bytes | None:
        return self.verdict.final
