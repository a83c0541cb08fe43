"""
The C{dovecot:} backend: logins checked by a running Dovecot's auth
service, as Postfix does with C{smtpd_sasl_type = dovecot}, over its UNIX
socket (C{dovecot:/run/dovecot/auth-client}) or TCP
(C{dovecot:tcp:127.0.0.1:12345}).

PLAIN and LOGIN logins are passed to Dovecot as PLAIN, with
C{service=smtp}, C{secured} (mailgw takes AUTH only under TLS) and the
client's address; they are offered only while Dovecot lists PLAIN. One
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

__all__ = ["DovecotChecker", "DovecotUnavailable"]

_log = Logger()


@implementer(ICredentialsChecker, ISASLMechanisms)
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

    credentialInterfaces = (IUsernamePassword,)

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
        self._connection: DovecotAuthProtocol | None = None
        self._connecting: list[Deferred[DovecotAuthProtocol]] | None = None
        self._backoff = 0.0
        self._retryAt = 0.0
        # Until Dovecot has said, what the credential interface allows.
        self._offered: tuple[str, ...] | None = None

    def saslMechanisms(self) -> tuple[str, ...]:
        """PLAIN and LOGIN unless Dovecot's last handshake left PLAIN out."""
        if self._offered is None or "PLAIN" in self._offered:
            return ("PLAIN", "LOGIN")
        return ()

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

    def _cancelIdle(self) -> None:
        idle, self._idle = self._idle, None
        if idle is not None and idle.active():
            idle.cancel()

    def _settled(self, result: Any) -> Any:
        """A login is answered: with none left in flight, close the connection when idle."""
        self._inFlight -= 1
        if self._inFlight == 0 and self._connection is not None:
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
        if not IUsernamePassword.providedBy(credentials):
            return defer.fail(UnhandledCredentials(f"cannot check {type(credentials).__name__}"))
        user, password = _bytes(credentials.username), _bytes(credentials.password)
        if not user or not password or b"\0" in user or b"\0" in password:
            # Not expressible in PLAIN (a LOGIN exchange may carry a NUL).
            return defer.fail(UnauthorizedLogin())
        params = [
            b"service=" + self.service.encode("ascii"),
            b"secured",
            b"nologin",
            *_clientAddress(getattr(credentials, "clientAddress", "")),
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


def _bytes(value: bytes | str) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def _clientAddress(address: str) -> list[bytes]:
    """``rip=`` for an IP address; nothing for anything else (never a stray byte)."""
    try:
        return [b"rip=" + str(ipaddress.ip_address(address)).encode("ascii")]
    except ValueError:
        return []
