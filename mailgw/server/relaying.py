"""
The AUTH phase's steps for exchanges a backend's service conducts
(L{mailgw.auth.relay}: Dovecot's CRAM-MD5 and SCRAM-SHA-256): each client
response is carried to the service, each challenge of the service's back
as a 334, and the verdict goes to the portal; the throttle counts such an
attempt once, at the first data the client sends. Where local backends
serve CRAM-MD5 too, they check the answer to the service's challenge when
the service refuses it, and take the exchange over when the service
cannot answer.

L{RelayingSteps} is part of L{mailgw.server.authentication.AuthPhase}: it
uses the phase's state and its one mapping from results to outcomes
(C{_settle}).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailgw import replies
from mailgw.auth import MechanismUnavailable
from mailgw.auth.relay import RelayChallenge, RelayedCredentials
from mailgw.interfaces import ISubmitter
from mailgw.limits.auth import AuthAttempt
from mailgw.replies import SMTPReply
from mailgw.server.authsteps import AuthStep, CloseWith, LoginOutcome
from mailgw.server.sasl import Challenge, RelayedExchange, makeExchange
from mailgw.server.settings import Listener

__all__ = ["RelayingSteps"]


class RelayingSteps:
    """The relayed exchanges' steps of the AUTH phase (a base of AuthPhase)."""

    _listener: Listener
    _clientAddress: Callable[[], str]
    _exchange: Any
    _attempt: AuthAttempt | None
    _delayed: Deferred[Any] | None
    _serviceDown: Failure | None
    _log: Logger

    def _endExchange(self) -> None:
        raise NotImplementedError

    def _settle(self, result: Any, attempt: AuthAttempt | None, credentials: Any) -> LoginOutcome:
        raise NotImplementedError

    def _relay(self, exchange: RelayedExchange, data: bytes | None) -> AuthStep:
        """
        One step of an exchange a backend's service conducts: ``data``
        (the client's response; None: no initial response) goes to the
        service, its challenge comes back as a 334 and its verdict goes to
        the portal. The throttle counts the attempt once, at the first
        data the client sends, and it stays in flight until the verdict.
        """
        attempt, delay = self._attempt, 0.0
        throttle = self._listener.guards.auth
        if data is not None:
            exchange.response = data
        if data is not None and not exchange.counted:
            exchange.counted = True
            exchange.claim(data)
            if throttle is not None:
                claimed = exchange.claimed
                login = claimed.decode("utf-8", "replace") if claimed is not None else None
                decision = throttle.begin(self._clientAddress(), login, exchange.mechanism)
                if decision.refuse and decision.reply is not None:
                    self._endExchange()
                    if decision.disconnect:
                        return CloseWith(decision.reply)
                    return decision.reply
                delay, attempt = decision.delay, decision.attempt
                self._attempt = attempt
        conversation = exchange.conversation
        if delay > 0:
            # As for a local login: after a few failures every answer waits.
            def afterDelay() -> Deferred[Any]:
                self._delayed = None
                return conversation.step(data)

            d: Deferred[Any] = deferLater(self._listener.clock, delay, afterDelay)
            self._delayed = d
        else:
            d = conversation.step(data)
        return d.addCallbacks(
            self._relayed,
            self._relayFailed,
            callbackArgs=(exchange, attempt),
            errbackArgs=(exchange, attempt),
        )

    def _relayed(
        self, answer: Any, exchange: RelayedExchange, attempt: AuthAttempt | None
    ) -> LoginOutcome | Deferred[LoginOutcome]:
        if self._exchange is not exchange:
            return LoginOutcome(replies.AUTH_TEMPFAIL)  # the session ended meanwhile
        if isinstance(answer, RelayChallenge):
            exchange.challenge = answer.data
            encoded = base64.b64encode(answer.data).decode("ascii")
            return LoginOutcome(SMTPReply(334, "", encoded))
        self._exchange = None
        portal = self._listener.portal
        local = exchange.localCram(self._listener.settings.hostname)
        if answer.login is None and local is not None:
            # Refused by the service: the local backends check the same answer.
            d = maybeDeferred(portal.login, local, None, ISubmitter).addErrback(_verified)
            return d.addBoth(self._settle, attempt, local)
        credentials = RelayedCredentials(answer.login or exchange.claimed or b"", answer)
        d = maybeDeferred(portal.login, credentials, None, ISubmitter)
        return d.addBoth(self._settle, attempt, credentials)

    def _relayFailed(
        self, failure: Failure, exchange: RelayedExchange, attempt: AuthAttempt | None
    ) -> LoginOutcome | Deferred[LoginOutcome]:
        current = self._exchange is exchange
        if current:
            self._exchange = None
            exchange.conversation.cancel()
        if current and exchange.localFallback and not failure.check(CancelledError):
            # The service cannot answer; CRAM-MD5 users of the local backends
            # are not held up by it.
            self._log.failure("Authentication backend failed", failure)
            hostname = self._listener.settings.hostname
            if exchange.challenge is None:  # no challenge of the service's: ours
                local = makeExchange(exchange.mechanism, hostname)
                self._exchange, self._serviceDown = local, failure
                step = local.start(None)
                assert isinstance(step, Challenge)
                return LoginOutcome(SMTPReply(334, "", base64.b64encode(step.data).decode()))
            credentials = exchange.localCram(hostname)
            if credentials is not None:
                d = maybeDeferred(self._listener.portal.login, credentials, None, ISubmitter)
                # Unless a local backend says yes, the service's failure stands (454).
                d.addErrback(lambda _: failure)
                return d.addBoth(self._settle, attempt, credentials)
        return self._settle(failure, attempt, None)


def _verified(failure: Failure) -> Failure:
    """A local fallback's answer when the service already checked and refused the login."""
    if failure.check(MechanismUnavailable):
        return Failure(UnauthorizedLogin())  # the service's refusal stands, as a guess
    return failure
