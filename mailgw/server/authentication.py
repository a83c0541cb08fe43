"""
The AUTH phase (RFC 4954): the SASL exchange, the throttle's decision and
the outcome of each attempt, and the one mapping from login errors to
replies.

An attempt that the throttle lets through (L{AuthThrottle.begin}) is owned
by L{AuthPhase} from that moment until exactly one outcome is recorded: the
portal's answer settles it in the login Deferred's own callback, whether
the client is still there or not; a close before the answer
(L{AuthPhase.abandon}) settles it as abandoned, and the count stays.
Exchanges a backend's service conducts are driven by
L{mailgw.server.relaying}; the step values are in L{mailgw.server.authsteps}.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Callable
from typing import Any

from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailgw import replies
from mailgw.auth import MechanismUnavailable
from mailgw.auth.relay import IRelayedCredentials
from mailgw.auth.scram import IScramCredentials
from mailgw.interfaces import ISubmitter
from mailgw.limits.auth import AuthAttempt
from mailgw.replies import SMTPReply
from mailgw.server.authsteps import (
    AuthStep,
    ChallengeLine,
    CloseWith,
    LoginOutcome,
    ServerFinal,
    asOutcome,
)
from mailgw.server.relaying import RelayingSteps
from mailgw.server.sasl import (
    Challenge,
    Exchange,
    RelayedExchange,
    SASLFailure,
    fromClient,
    makeExchange,
    relayFor,
    servedLocally,
)
from mailgw.server.scram import NeedKeys, ScramExchange, lookupKeys
from mailgw.server.settings import Listener

__all__ = ["AuthPhase", "AuthStep", "ChallengeLine", "CloseWith", "LoginOutcome", "fingerprint"]


#: The key of L{fingerprint}'s digests: per process, never stored.
_FINGERPRINT_KEY = secrets.token_bytes(32)


def fingerprint(credentials: Any) -> bytes | None:
    """
    A keyed digest of a login and its password (PLAIN, LOGIN), so that the
    throttle can tell identical attempts under way apart from guesses
    without holding the password; None for other credentials (a CRAM-MD5
    or SCRAM answer is unique to its session anyway).
    """
    name, password = getattr(credentials, "username", None), getattr(credentials, "password", None)
    if not isinstance(name, bytes) or not isinstance(password, bytes):
        return None
    return hmac.new(_FINGERPRINT_KEY, name + b"\0" + password, hashlib.sha256).digest()


def username(credentials: Any) -> str | None:
    name = getattr(credentials, "username", None)
    if isinstance(name, bytes):
        return name.decode("utf-8", "replace")
    return name


class AuthPhase(RelayingSteps):
    """
    The AUTH state of one session: an exchange in progress, or an attempt
    waiting for the portal. ``clientAddress`` gives the client's address.
    """

    _log = Logger()

    def __init__(
        self, listener: Listener, clientAddress: Callable[[], str], sessionId: str | None = None
    ) -> None:
        self._listener = listener
        self._clientAddress = clientAddress
        self._sessionId = sessionId
        self._exchange: Exchange | RelayedExchange | ServerFinal | None = None
        self._mechanism = ""
        self._fallbackRelay: Any = None
        # A relay's failure, when a local exchange took over from it.
        self._serviceDown: Failure | None = None
        self._attempt: AuthAttempt | None = None
        # The delay before the check, while it runs: cancelled by abandon().
        self._delayed: Deferred[Any] | None = None

    @property
    def exchanging(self) -> bool:
        """True while the next line is a response to a 334 challenge."""
        return self._exchange is not None

    def start(self, argument: str) -> AuthStep:
        """``AUTH mechanism [initial-response]``; the session checked the sequence."""
        words = argument.split()
        if not 1 <= len(words) <= 2:
            return replies.SYNTAX
        mechanism = words[0].upper()
        if mechanism not in self._listener.mechanisms:
            return replies.AUTH_UNKNOWN_MECHANISM
        initial = None
        if len(words) == 2:
            initial = _decode(words[1].encode("ascii"))
            if initial is None:
                return replies.AUTH_BAD_BASE64
        portal = self._listener.portal
        relay, local = relayFor(portal, mechanism), servedLocally(portal, mechanism)
        # SCRAM: a local exchange, relayed at client-first for a user no
        # local backend has keys for (_lookup); CRAM-MD5: relayed first.
        self._fallbackRelay = relay if mechanism == "SCRAM-SHA-256" else None
        self._serviceDown = None
        if relay is not None and (mechanism == "CRAM-MD5" or not local):
            relayed = RelayedExchange(
                mechanism, relay.converse(mechanism, self._clientAddress()), localFallback=local
            )
            self._exchange, self._mechanism = relayed, mechanism
            return self._relay(relayed, initial)
        exchange = makeExchange(mechanism, self._listener.settings.hostname)
        self._exchange, self._mechanism = exchange, mechanism
        return self._step(mechanism, lambda: exchange.start(initial))

    def respond(self, raw: bytes) -> AuthStep:
        """A line sent in answer to a challenge."""
        exchange = self._exchange
        assert exchange is not None
        if raw.strip() == b"*":
            self._endExchange()
            return replies.AUTH_CANCELLED
        response = _decode(raw.strip())
        if response is None:
            self._endExchange()
            return replies.AUTH_BAD_BASE64
        if isinstance(exchange, ServerFinal):
            self._exchange = None  # RFC 4954 4: the client answers final data with nothing
            return succeed(exchange.outcome) if response == b"" else replies.AUTH_BAD_BASE64
        if isinstance(exchange, RelayedExchange):
            return self._relay(exchange, response)
        return self._step(self._mechanism, lambda: exchange.respond(response))

    def cancel(self) -> None:
        """The exchange ends without an answer (its line was too long)."""
        self._endExchange()

    def _endExchange(self) -> None:
        """
        The exchange is dropped before its end. A relayed one is cancelled
        at its service; once the throttle has counted it, it stays counted
        (abandoned), as a hang-up would.
        """
        exchange, self._exchange = self._exchange, None
        self._serviceDown = None
        if isinstance(exchange, RelayedExchange):
            # The attempt first: cancelling may settle a step at once.
            attempt, self._attempt = self._attempt, None
            exchange.conversation.cancel()
            if attempt is not None:
                attempt.abandoned()

    def abandon(self) -> None:
        """The session ends: an exchange is dropped, an attempt in flight is abandoned."""
        self._endExchange()
        attempt, self._attempt = self._attempt, None
        if attempt is not None:
            attempt.abandoned()
        delayed, self._delayed = self._delayed, None
        if delayed is not None:
            delayed.cancel()  # nobody waits for the answer: spare the check

    def _step(self, mechanism: str, step: Callable[[], Any]) -> AuthStep:
        try:
            result = step()
        except SASLFailure as failure:
            self._exchange = None
            if failure.malformed:
                return replies.AUTH_BAD_BASE64
            self._logFailure(None)
            return replies.AUTH_INVALID
        if isinstance(result, Challenge):
            encoded = base64.b64encode(result.data).decode("ascii")
            return ChallengeLine(f"334 {encoded}\r\n".encode("ascii"))
        if isinstance(result, NeedKeys):
            return self._lookup(result.username)
        self._exchange = None
        return self._login(mechanism, result.credentials)

    def _lookup(self, name: bytes) -> Deferred[LoginOutcome]:
        """
        SCRAM: the user's salt and iterations, from the backends, mid-exchange.
        Nothing is verified yet, so the throttle is not asked.
        """
        exchange = self._exchange
        assert isinstance(exchange, ScramExchange)

        def found(keys: Any) -> LoginOutcome | Deferred[LoginOutcome]:
            if self._exchange is not exchange:
                return LoginOutcome(replies.AUTH_TEMPFAIL)  # the session ended meanwhile
            relay = self._fallbackRelay
            if keys is None and relay is not None:
                # No local backend knows the user: Dovecot takes the exchange over.
                relayed = RelayedExchange(
                    "SCRAM-SHA-256", relay.converse("SCRAM-SHA-256", self._clientAddress())
                )
                self._exchange = relayed
                return asOutcome(self._relay(relayed, exchange.clientFirst()))
            encoded = base64.b64encode(exchange.keysFound(keys).data).decode("ascii")
            return LoginOutcome(SMTPReply(334, "", encoded))

        def failed(failure: Failure) -> LoginOutcome:
            if self._exchange is exchange:
                self._exchange = None
            self._log.failure("Authentication backend failed", failure)
            return LoginOutcome(replies.AUTH_TEMPFAIL)

        return lookupKeys(self._listener.portal, name).addCallbacks(found, failed)

    def _login(self, mechanism: str, credentials: Any) -> AuthStep:
        throttle = self._listener.guards.auth
        address = self._clientAddress()
        credentials = fromClient(credentials, address)
        delay = 0.0
        attempt = None
        if throttle is not None:
            decision = throttle.begin(
                address, username(credentials), mechanism, fingerprint(credentials)
            )
            if decision.disconnect and decision.reply is not None:
                return CloseWith(decision.reply)
            if decision.refuse and decision.reply is not None:
                return decision.reply
            delay, attempt = decision.delay, decision.attempt
        # Shared counts: the user's quota is fetched while the password is checked.
        quota, login = self._listener.guards.quota, username(credentials)
        ready = quota.prefetch(login) if quota is not None and login else None
        self._attempt = attempt
        portal, clock = self._listener.portal, self._listener.clock
        if delay > 0:
            # After a few failures every answer waits, right or wrong: each
            # guess costs the attacker the delay, and a client that gives up
            # early learns nothing (an unknown user costs the same, too).
            d = deferLater(clock, delay, self._afterDelay, credentials)
            self._delayed = d
        else:
            d = maybeDeferred(portal.login, credentials, None, ISubmitter)
        down, self._serviceDown = self._serviceDown, None
        if down is not None:
            # The service that could have said yes was down: no local "no" is final.
            d.addErrback(lambda _: down)
        if ready is not None:  # answer once the user's quota is known (one round trip at most)
            d.addBoth(lambda result: ready.addBoth(lambda _: result))
        return d.addBoth(self._settle, attempt, credentials)

    def _afterDelay(self, credentials: Any) -> Deferred[Any]:
        self._delayed = None
        return maybeDeferred(self._listener.portal.login, credentials, None, ISubmitter)

    def _settle(self, result: Any, attempt: AuthAttempt | None, credentials: Any) -> LoginOutcome:
        """The one place where a login's result becomes its outcome and reply."""
        if self._attempt is attempt:
            self._attempt = None
        if isinstance(result, Failure) and result.check(CancelledError):
            return LoginOutcome(replies.AUTH_TEMPFAIL)  # abandoned during the delay
        # The first outcome recorded wins: after abandon() these do nothing.
        if not isinstance(result, Failure):
            _, avatar, _ = result
            if attempt is not None:
                attempt.succeeded()
            limiter = self._listener.guards.connections
            if limiter is not None:
                limiter.authenticated(self._clientAddress())
            breaker = self._listener.guards.breaker
            if breaker is not None and not breaker.observeLogin(
                avatar.login, self._clientAddress()
            ):
                return LoginOutcome(replies.AUTH_TEMPFAIL)  # tripped: 454 4.7.0 (logged)
            self._log.info(
                "auth ok user={user!r} client={client}",
                user=avatar.login,
                client=self._clientAddress(),
                session=self._sessionId,
                mech=self._mechanism,
                backend=backendName(self._listener.portal, credentials),
            )
            outcome = LoginOutcome(replies.AUTH_OK, avatar.login)
            final = _serverFinal(credentials)
            if final is not None:
                # SMTP has no data on 235: the server's final data goes in a 334.
                self._exchange = ServerFinal(outcome)
                return LoginOutcome(SMTPReply(334, "", base64.b64encode(final).decode("ascii")))
            return outcome
        if result.check(MechanismUnavailable):
            if attempt is not None:
                attempt.notApplicable()
            self._logFailure(credentials)
            return LoginOutcome(replies.AUTH_INVALID)
        if result.check(UnauthorizedLogin, UnhandledCredentials):
            if attempt is not None:
                attempt.failed()
            self._logFailure(credentials)
            return LoginOutcome(replies.AUTH_INVALID)
        if attempt is not None:
            attempt.unavailable()
        self._log.failure("Authentication backend failed", result)
        return LoginOutcome(replies.AUTH_TEMPFAIL)

    def _logFailure(self, credentials: Any) -> None:
        self._log.info(
            "auth failed user={user!r} client={client}",
            user=(username(credentials) or "")[:128],
            client=self._clientAddress(),
            session=self._sessionId,
            mech=self._mechanism,
        )


def _serverFinal(credentials: Any) -> bytes | None:
    """The server's final data of a successful exchange (SCRAM's ``v=``), if any."""
    if IScramCredentials.providedBy(credentials):
        return b"v=" + base64.b64encode(credentials.serverSignature())
    if IRelayedCredentials.providedBy(credentials):
        final: bytes | None = credentials.verdict.final
        return final
    return None


def backendName(portal: Any, credentials: Any) -> str | None:
    """
    The auth backend(s) that check ``credentials`` in ``portal``: a checker's
    class name, or several joined by ``|`` (asked in that order) for a chain.
    """
    for interface, checker in getattr(portal, "checkers", {}).items():
        if interface.providedBy(credentials):
            chain = getattr(checker, "checkers", None)
            checkers = chain if isinstance(chain, list) else [checker]
            return "|".join(type(c).__name__ for c in checkers)
    return None


def _decode(response: bytes) -> bytes | None:
    if response == b"=":
        return b""
    try:
        return base64.b64decode(response, validate=True)
    except (binascii.Error, ValueError):
        return None
