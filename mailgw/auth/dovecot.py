"""
The C{dovecot:} backend: logins checked by a running Dovecot's auth
service, as Postfix does with C{smtpd_sasl_type = dovecot}, over its UNIX
socket (C{dovecot:/run/dovecot/auth-client}) or TCP
(C{dovecot:tcp:127.0.0.1:12345}).

PLAIN and LOGIN logins are passed to Dovecot as PLAIN, with
C{service=smtp}, C{secured} (mailgw takes AUTH only under TLS) and the
client's address; they are offered only while Dovecot lists PLAIN.
CRAM-MD5 and SCRAM-SHA-256 exchanges are relayed to Dovecot
(L{DovecotConversation}, an L{ISASLConversation}) while its handshake lists
them: Dovecot makes the challenges and checks the answers. One
connection carries every request; it is made when first needed, made
again after a loss (no sooner than a back-off that doubles with each
failed attempt), and every request has a deadline. While Dovecot cannot
answer, logins fail with L{DovecotUnavailable}: 454 4.7.0, never 535.

Dovecot hashes on its side and keeps its own cache, so no
L{mailgw.auth.cache.VerifiedCache} is put in front.
"""

from __future__ import annotations

import base64
import ipaddress
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.auth.dovecotwire import DovecotAnswer, DovecotAuthProtocol, DovecotUnavailable
from mailgw.auth.mechanisms import ISASLMechanisms
from mailgw.auth.relay import (
    IRelayedCredentials,
    ISASLConversation,
    ISASLRelay,
    RelayChallenge,
    RelayVerdict,
)
from mailgw.auth.workers import IRetirable

__all__ = ["DovecotChecker", "DovecotConversation", "DovecotUnavailable", "RELAYED"]

#: The mechanisms whose exchanges are relayed to Dovecot when it lists them.
RELAYED = ("CRAM-MD5", "SCRAM-SHA-256")

_log = Logger()


@implementer(ICredentialsChecker, ISASLMechanisms, ISASLRelay, IRetirable)
class DovecotChecker:
    """
    Checks plain passwords with Dovecot's auth service at ``endpoint``.

    @param timeout: seconds a login may wait for Dovecot (connecting, the
        handshake and the answer); then it fails with
        L{DovecotUnavailable} and the connection is dropped, so that a
        hung Dovecot is reconnected. Keep it above Dovecot's own failure
        delay (C{auth_failure_delay}, 2 s by default, more with its
        penalty for repeated failures).
    @param minBackoff: seconds before the first reconnection attempt
        after a failed one; each further failure doubles it, up to
        ``maxBackoff``. Logins in between fail at once.
    @param idleTimeout: seconds without a login after which the connection
        is closed (made again by the next login), so that a checker
        replaced by a reload, or a quiet night, holds no connection.
    """

    credentialInterfaces = (IUsernamePassword, IRelayedCredentials)

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        clock: IReactorTime,
        timeout: float = 30.0,
        minBackoff: float = 0.5,
        maxBackoff: float = 30.0,
        service: str = "smtp",
        idleTimeout: float = 60.0,
    ) -> None:
        self.endpoint = endpoint
        self.clock = clock
        self.timeout = timeout
        self.minBackoff = minBackoff
        self.maxBackoff = maxBackoff
        self.service = service
        self.idleTimeout = idleTimeout
        self._idle: Any = None
        self._inFlight = 0
        self._retired = False
        self._connection: DovecotAuthProtocol | None = None
        self._connecting: list[Deferred[DovecotAuthProtocol]] | None = None
        self._backoff = 0.0
        self._retryAt = 0.0
        # Until Dovecot has said, what the credential interface allows.
        self._offered: tuple[str, ...] | None = None

    def saslMechanisms(self) -> tuple[str, ...]:
        """
        PLAIN and LOGIN unless Dovecot's last handshake left PLAIN out, and
        the mechanisms of L{RELAYED} it listed. Before any handshake:
        PLAIN and LOGIN, and a connection is started in the background, so
        that the next EHLO offers what Dovecot lists.
        """
        offered = self._offered
        if offered is None:
            self._probe()
            return ("PLAIN", "LOGIN")
        plain = ("PLAIN", "LOGIN") if "PLAIN" in offered else ()
        return plain + tuple(m for m in RELAYED if m in offered)

    def _probe(self) -> None:
        if self._connecting is not None or self.clock.seconds() < self._retryAt:
            return

        def idle(_: object) -> None:
            if self._inFlight == 0 and self._idle is None and self._connection is not None:
                self._idle = self.clock.callLater(self.idleTimeout, self._dropConnection)

        self._connect().addCallbacks(idle, lambda _: None)

    def converse(self, mechanism: str, clientAddress: str) -> DovecotConversation:
        """An exchange of ``mechanism`` (one of L{RELAYED}) relayed to Dovecot."""
        if mechanism not in RELAYED:
            raise ValueError(f"{mechanism} is not relayed to Dovecot")
        self._cancelIdle()
        self._inFlight += 1
        return DovecotConversation(self, mechanism, clientAddress)

    def _params(self, clientAddress: str) -> list[bytes]:
        return [
            b"service=" + self.service.encode("ascii"),
            b"secured",
            b"nologin",
            *_clientAddress(clientAddress),
        ]

    # -- the connection ---------------------------------------------------

    def _connect(self) -> Deferred[DovecotAuthProtocol]:
        """The open connection, or one being made (shared by every waiter)."""
        connection = self._connection
        if connection is not None and not connection.lost:
            return defer.succeed(connection)
        self._connection = None
        waiter: Deferred[DovecotAuthProtocol] = Deferred()
        if self._connecting is not None:
            self._connecting.append(waiter)
            return waiter
        if self.clock.seconds() < self._retryAt:
            return defer.fail(DovecotUnavailable("Dovecot unreachable; waiting to reconnect"))
        self._connecting = [waiter]
        attempt = self.endpoint.connect(Factory.forProtocol(DovecotAuthProtocol))
        made: list[DovecotAuthProtocol] = []

        def connected(protocol: Any) -> Deferred[Any]:
            made.append(protocol)
            return protocol.ready.addCallback(lambda mechanisms: (protocol, mechanisms))

        def done(result: Any) -> None:
            waiting, self._connecting = self._connecting or [], None
            if isinstance(result, Failure):
                for protocol in made:  # connected, but the handshake failed or hung
                    if protocol.transport is not None:
                        protocol.transport.loseConnection()
                self._backoff = min(max(self._backoff * 2, self.minBackoff), self.maxBackoff)
                self._retryAt = self.clock.seconds() + self._backoff
                _log.warn(
                    "Cannot reach Dovecot auth at {endpoint}: {why}; next try in {backoff}s",
                    endpoint=self.endpoint,
                    why=result.getErrorMessage(),
                    backoff=self._backoff,
                )
                failure = Failure(DovecotUnavailable("Dovecot unreachable"))
                for d in waiting:
                    d.errback(failure)
                return
            protocol, mechanisms = result
            self._backoff, self._retryAt = 0.0, 0.0
            self._offered = mechanisms
            self._connection = protocol
            for d in waiting:
                d.callback(protocol)

        attempt.addCallback(connected)
        # A connection or handshake that hangs is given up, so the next
        # login tries again rather than join it.
        attempt.addTimeout(self.timeout, self.clock)
        attempt.addBoth(done)
        return waiter

    def _dropConnection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and connection.transport is not None:
            connection.transport.loseConnection()

    def stop(self) -> None:
        """Close the connection (at shutdown, and in tests)."""
        self._cancelIdle()
        self._dropConnection()

    def retire(self) -> None:
        """Replaced by a reload: close the connection once no login is in flight."""
        self._retired = True
        if self._inFlight == 0:
            self.stop()

    def _cancelIdle(self) -> None:
        idle, self._idle = self._idle, None
        if idle is not None and idle.active():
            idle.cancel()

    def _settled(self, result: Any) -> Any:
        """A login is answered: with none left in flight, close the connection when idle."""
        self._inFlight -= 1
        if self._inFlight == 0 and self._retired:
            self.stop()
        elif self._inFlight == 0 and self._connection is not None:
            self._cancelIdle()
            self._idle = self.clock.callLater(self.idleTimeout, self._dropConnection)
        return result

    # -- logins -----------------------------------------------------------

    def requestAvatarId(self, credentials: Any) -> Deferred[bytes | tuple[()]]:
        """
        @return: a Deferred firing with the login Dovecot vouched for (its
            C{user=}, UTF-8 bytes), or failing with L{UnauthorizedLogin}
            (535) or L{DovecotUnavailable} (454).
        """
        if IRelayedCredentials.providedBy(credentials):
            verdict = credentials.verdict
            if verdict.source is not self:
                return defer.fail(UnhandledCredentials("relayed by another backend"))
            if verdict.login is None:
                return defer.fail(UnauthorizedLogin())
            return defer.succeed(verdict.login)
        if not IUsernamePassword.providedBy(credentials):
            return defer.fail(UnhandledCredentials(f"cannot check {type(credentials).__name__}"))
        user, password = _bytes(credentials.username), _bytes(credentials.password)
        if not user or not password or b"\0" in user or b"\0" in password:
            # Not expressible in PLAIN (a LOGIN exchange may carry a NUL).
            return defer.fail(UnauthorizedLogin())
        params = [
            *self._params(getattr(credentials, "clientAddress", "")),
            b"resp=" + base64.b64encode(b"\0" + user + b"\0" + password),
        ]
        result: Deferred[bytes | tuple[()]] = (
            self._connect()
            .addCallback(lambda protocol: protocol.authenticate("PLAIN", params))
            .addCallback(self._answered, user)
        )
        self._cancelIdle()
        self._inFlight += 1
        result.addTimeout(self.timeout, self.clock, onTimeoutCancel=self._timedOut)
        return result.addBoth(self._settled)

    def _timedOut(self, result: Any, timeout: float) -> Any:
        if isinstance(result, Failure) and result.check(defer.CancelledError):
            _log.warn("Dovecot auth did not answer within {timeout}s", timeout=timeout)
            self._dropConnection()
            return Failure(DovecotUnavailable(f"no answer from Dovecot in {timeout}s"))
        return result

    def _answered(self, answer: DovecotAnswer, user: bytes) -> bytes:
        params = answer.params()
        if answer.kind == "OK":
            return params.get("user") or user
        if answer.kind == "FAIL":
            if "temp" in params:
                raise DovecotUnavailable("Dovecot reported a temporary failure")
            raise UnauthorizedLogin()
        # CONT after a complete PLAIN response: not the protocol we speak.
        raise DovecotUnavailable("unexpected CONT from Dovecot")


@implementer(ISASLConversation)
class DovecotConversation:
    """
    One CRAM-MD5 or SCRAM-SHA-256 exchange relayed to Dovecot: the first
    L{step} sends C{AUTH} (with the initial response, if any), each later
    one C{CONT}; Dovecot's C{CONT} becomes a L{RelayChallenge}, its C{OK}
    or C{FAIL} the L{RelayVerdict} (C{FAIL temp}, a loss, a timeout or a
    garbled answer fail with L{DovecotUnavailable}). Every step has the
    checker's deadline; the time the client takes between steps is the
    session's business.
    """

    def __init__(self, checker: DovecotChecker, mechanism: str, clientAddress: str) -> None:
        self._checker = checker
        self._mechanism = mechanism
        self._address = clientAddress
        self._protocol: DovecotAuthProtocol | None = None
        self._requestId = 0
        self._waiting: Deferred[DovecotAnswer] | None = None
        self.finished = False

    def step(self, response: bytes | None) -> Deferred[RelayChallenge | RelayVerdict]:
        checker = self._checker
        if self.finished or self._waiting is not None:
            return defer.fail(DovecotUnavailable("relayed exchange out of step"))
        d: Deferred[Any]
        if self._protocol is None:
            d = checker._connect().addCallback(self._open, response)
        else:
            d = defer.maybeDeferred(
                self._ask, self._protocol.continueRequest, self._requestId, response or b""
            )
        d.addTimeout(checker.timeout, checker.clock, onTimeoutCancel=checker._timedOut)
        result: Deferred[RelayChallenge | RelayVerdict] = d.addCallback(self._answered)
        return result.addErrback(self._failed)

    def _ask(self, send: Any, *args: Any) -> Deferred[DovecotAnswer]:
        waiting = self._waiting = send(*args)

        def arrived(result: Any) -> Any:
            self._waiting = None
            return result

        return waiting.addBoth(arrived)

    def _open(self, protocol: DovecotAuthProtocol, response: bytes | None) -> Any:
        if self.finished:  # cancelled while connecting
            raise DovecotUnavailable("relayed exchange cancelled")
        self._protocol = protocol
        params = self._checker._params(self._address)
        if response is not None:
            params.append(b"resp=" + base64.b64encode(response))

        def send(mechanism: str, params: list[bytes]) -> Deferred[DovecotAnswer]:
            self._requestId, waiting = protocol.request(mechanism, params)
            return waiting

        return self._ask(send, self._mechanism, params)

    def _answered(self, answer: DovecotAnswer) -> RelayChallenge | RelayVerdict:
        if answer.kind == "CONT":
            return RelayChallenge(_decode(answer.fields[0] if answer.fields else b""))
        params = answer.params()
        if answer.kind == "FAIL":
            if "temp" in params:
                raise DovecotUnavailable("Dovecot reported a temporary failure")
            self._finish()
            return RelayVerdict(self._checker, None)
        user = params.get("user")
        if not user:
            raise DovecotUnavailable("OK from Dovecot without user=")
        final = _decode(params["resp"]) if params.get("resp") else None
        self._finish()
        return RelayVerdict(self._checker, user, final)

    def _failed(self, failure: Failure) -> Failure:
        self._finish()
        return failure

    def _finish(self) -> None:
        if not self.finished:
            self.finished = True
            self._checker._settled(None)

    def cancel(self) -> None:
        if self.finished:
            return
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.cancel()  # its canceller sends CANCEL
        elif self._protocol is not None:
            self._protocol.cancelRequest(self._requestId)
        self._finish()


def _decode(data: bytes) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except ValueError:
        raise DovecotUnavailable("Dovecot sent data that is not base64") from None


def _bytes(value: bytes | str) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def _clientAddress(address: str) -> list[bytes]:
    """``rip=`` for an IP address; nothing for anything else (never a stray byte)."""
    try:
        return [b"rip=" + str(ipaddress.ip_address(address)).encode("ascii")]
    except ValueError:
        return []
