"""
The ESMTP submission server protocol (RFC 5321, RFC 6409): parsing, the
session state machine and replies; nothing else.

Commands are handled strictly one after another. While an answer depends
on a Deferred (AUTH, a policy check, the spool commit) no further input is
processed, so replies to pipelined commands (RFC 2920) always come back in
order; input keeps buffering up to a bound, after which the transport is
paused.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from typing import Any

from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.address import AddressError, ParameterError, parsePath, splitPathAndParameters
from mailgw.envelope import Address, BodyType, Envelope, Session
from mailgw.interfaces import IMessageWriter, ISubmitter
from mailgw.queue.spool import SpoolError, SpoolFullError
from mailgw.server import replies
from mailgw.server.data import DataReader
from mailgw.server.factory import SubmissionFactory
from mailgw.server.received import receivedHeader
from mailgw.server.replies import SMTPReply
from mailgw.server.sasl import Challenge, Exchange, SASLFailure, makeExchange
from mailgw.tls import describeTLS

# RFC 4954 4: an AUTH command line or response may be 12288 octets; no
# other command comes near that.
MAX_COMMAND_LINE = 12288 + 2
# Input buffered while a command waits on a Deferred before reading stops.
MAX_BUFFERED = 64 * 1024
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_HTTP_VERBS = frozenset({"GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS", "DELETE"})


class _NoSender:
    """No MAIL yet (``<>`` is a sender: L{None})."""


NO_SENDER = _NoSender()


@implementer(IPushProducer)
class SubmissionServer(Protocol):
    """One client connection to a submission or submissions listener."""

    factory: SubmissionFactory
    # TCP, TLS or test transports: startTLS, pause/resumeProducing and
    # setTcpNoDelay are used where the transport has them.
    transport: Any
    _log = Logger()

    def __init__(self) -> None:
        # A bytearray: taking a line off its front is O(1) in CPython, so a
        # read full of pipelined commands costs linear time, not quadratic.
        self._buffer = bytearray()
        self._out: list[bytes] = []
        self._busy = False
        # Reading from the transport stops while a command waits with much
        # input buffered, and while the client does not read our replies
        # (the transport pauses us, its producer, when its buffer is full).
        self._reading = True
        self._writeBlocked = False
        self._producing = False
        self._processing = False
        self._closed = False
        self._closing = False
        self._errors = 0
        self._timer: IDelayedCall | None = None
        self._sessionTimer: IDelayedCall | None = None
        self._lineTimer: IDelayedCall | None = None
        self._lost: list[Deferred[None]] = []
        self._session: tuple[tuple[object, ...], Session] | None = None
        # The address the connection limiter counted this connection for.
        self._counted: str | None = None
        self._tls = False
        self._resetSession()
        self._resetTransaction()

    # -- state ---------------------------------------------------------

    def _resetSession(self) -> None:
        self._helo: str | None = None
        self._esmtp = False
        self._user: str | None = None
        self._exchange: Exchange | None = None
        self._skipLine = False

    def _resetTransaction(self) -> None:
        self._sender: Address | None | _NoSender = NO_SENDER
        self._recipients: list[Address] = []
        self._rcptTried = False
        self._body = BodyType.SEVENBIT
        self._smtputf8 = False
        self._declaredSize: int | None = None
        self._reader: DataReader | None = None
        self._writer: IMessageWriter | None = None
        self._envelope: Envelope | None = None

    def session(self) -> Session:
        """What we know of the client now, as the spool and policy see it."""
        key = (self._helo, self._user, self._tls)
        cached = self._session
        if cached is not None and cached[0] == key:
            return cached[1]
        peer = self.transport.getPeer()
        tlsProtocol, tlsCipher = describeTLS(self.transport) if self._tls else (None, None)
        complete = not self._tls or tlsProtocol is not None
        if not complete:
            tlsProtocol = "TLS"  # on, though the handshake details are not at hand yet
        session = Session(
            clientAddress=getattr(peer, "host", "local"),
            clientPort=getattr(peer, "port", None),
            helo=self._helo or "",
            user=self._user,
            tlsProtocol=tlsProtocol,
            tlsCipher=tlsCipher,
            listener=self.factory.listenerName,
        )
        # Asked several times per command: built again only when it changes.
        self._session = (key, session) if complete else None
        return session

    # -- connection ----------------------------------------------------

    def connectionMade(self) -> None:
        self.factory.connections.add(self)
        self._tls = self.factory.implicitTLS
        limiter = self.factory.guards.connections
        if limiter is not None:
            address = self.session().clientAddress
            refusal = limiter.open(address)
            if refusal is not None:
                self._log.info(
                    "connection refused client={client}: {reason}",
                    client=address,
                    reason=refusal.text,
                )
                self._close(refusal)
                return
            self._counted = address
        # A client that sends without reading our replies must not make us
        # buffer them without bound: the transport pauses us when it is full.
        self.transport.registerProducer(self, True)
        self._producing = True
        # Replies are small and come in bursts: do not wait for Nagle.
        setNoDelay = getattr(self.transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            try:
                setNoDelay(True)
            except Exception:
                pass  # not a TCP socket (UNIX socket)
        settings, clock = self.factory.settings, self.factory.clock
        self._timer = clock.callLater(settings.idleTimeout, self._timeout, replies.TIMEOUT)
        self._sessionTimer = clock.callLater(
            settings.sessionTimeout, self._timeout, replies.SESSION_TIMEOUT
        )
        greeting = f"{self.factory.settings.hostname} ESMTP mailgw"
        self._write(SMTPReply(220, "", greeting).toBytes())

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        self.factory.connections.discard(self)
        self._cancelTimers()
        if self._counted is not None and self.factory.guards.connections is not None:
            self.factory.guards.connections.close(self._counted)
            self._counted = None
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        for d in self._lost:
            d.callback(None)
        self._lost = []

    def shutdown(self) -> Deferred[None]:
        """Close with 421 4.3.2 now, or after the reply being worked on."""
        if self._closed:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._lost.append(d)
        self._closing = True
        if not self._busy:
            self._close(replies.SHUTDOWN)
        return d

    def _cancelTimers(self) -> None:
        for timer in (self._timer, self._sessionTimer, self._lineTimer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._sessionTimer = self._lineTimer = None

    def _timeout(self, reply: SMTPReply) -> None:
        self._close(reply)

    def _close(self, reply: SMTPReply | None = None) -> None:
        if self._closed:
            return
        if reply is not None:
            self._out.append(reply.toBytes())
        self._flush()
        self._closed = True
        self._buffer.clear()
        self._cancelTimers()
        if self._producing:
            # A TLS transport closes only once no producer is registered.
            self._producing = False
            self.transport.unregisterProducer()
        self.transport.loseConnection()

    def _write(self, data: bytes) -> None:
        self._out.append(data)
        if not self._processing:
            self._flush()

    def _flush(self) -> None:
        if self._out and not self._closed:
            self.transport.write(b"".join(self._out))
        self._out = []

    def _reply(self, reply: SMTPReply, **fields: str) -> None:
        if fields:
            reply = reply.withText(reply.text.format(**fields))
        self._write(reply.toBytes())
        if reply.isError:
            self._errors += 1
            if self._errors >= self.factory.settings.maxErrors:
                self._close(replies.TOO_MANY_ERRORS)

    # -- input ---------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        if self._timer is not None:
            self._timer.reset(self.factory.settings.idleTimeout)
        self._buffer += data
        self._process()

    def _process(self) -> None:
        """Handle buffered input until it runs out or a command must wait."""
        if self._processing:
            return
        self._processing = True
        try:
            while not self._busy and not self._writeBlocked and not self._closed and self._buffer:
                if self._reader is not None:
                    self._feedData()
                else:
                    line = self._nextLine()
                    if line is None:
                        break
                    self._lineReceived(line)
        finally:
            self._processing = False
        self._flush()
        if self._closed:
            return
        self._watchLine()
        self._updateReading()

    def _updateReading(self) -> None:
        """Read from the transport only while input and output both flow."""
        # Input is only held back, not refused, until it passes the bound:
        # a TLS transport pauses its producer during the handshake, and
        # reading must go on for the handshake to finish.
        backlog = (self._busy or self._writeBlocked) and len(self._buffer) > MAX_BUFFERED
        reading = not self._closed and not backlog
        if reading != self._reading:
            self._reading = reading
            if reading:
                self.transport.resumeProducing()
            else:
                self.transport.pauseProducing()

    # -- IPushProducer: the transport tells us when the client stops reading

    def pauseProducing(self) -> None:
        self._writeBlocked = True
        self._updateReading()

    def resumeProducing(self) -> None:
        self._writeBlocked = False
        if not self._closed:
            self._updateReading()
            self._process()

    def stopProducing(self) -> None:
        pass  # the connection is going away; connectionLost cleans up

    def _watchLine(self) -> None:
        """
        A started command line must end within ``commandTimeout``, however
        the bytes trickle in: a slow drip cannot hold the connection.
        """
        partial = bool(self._buffer) and self._reader is None and not self._busy
        if partial and self._lineTimer is None:
            self._lineTimer = self.factory.clock.callLater(
                self.factory.settings.commandTimeout, self._timeout, replies.TIMEOUT
            )
        elif not partial and self._lineTimer is not None:
            if self._lineTimer.active():
                self._lineTimer.cancel()
            self._lineTimer = None

    def _nextLine(self) -> bytes | None:
        buffer = self._buffer
        end = buffer.find(b"\n")
        if end == -1:
            if len(buffer) > MAX_COMMAND_LINE:
                self._buffer.clear()
                self._skipLine = True
                self._lineTooLong()
            return None
        line = bytes(buffer[:end])
        del buffer[: end + 1]
        if self._skipLine:
            self._skipLine = False
            return None if not self._buffer else self._nextLine()
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > MAX_COMMAND_LINE:
            self._lineTooLong()
            return self._nextLine() if self._buffer else None
        return line

    def _lineTooLong(self) -> None:
        self._exchange = None
        self._reply(replies.LINE_TOO_LONG)

    def _lineReceived(self, raw: bytes) -> None:
        if self._exchange is not None:
            self._authResponse(raw)
            return
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._reply(replies.BAD_COMMAND_BYTES)
            return
        if _CONTROL.search(line):
            self._reply(replies.BAD_COMMAND_BYTES)
            return
        verb, _, argument = line.partition(" ")
        verb = verb.upper()
        if verb in _HTTP_VERBS or verb.endswith(":"):
            self._close(replies.HTTP_REFUSED)
            return
        handler = self._commands.get(verb)
        if handler is None:
            self._reply(replies.UNRECOGNISED)
            return
        if not verb.isascii() or (not argument.isascii() and verb not in ("MAIL", "RCPT")):
            self._reply(replies.BAD_COMMAND_BYTES)
            return
        handler(self, argument.strip(" "))

    def _await(self, d: Deferred[Any], onResult: Callable[[Any], None]) -> None:
        """Stop reading input until ``d`` fires and ``onResult`` replied."""
        self._busy = True

        def done(result: Any) -> None:
            self._busy = False
            if self._closed:
                return
            try:
                onResult(result)
            except Exception:
                self._log.failure("Error handling a command result")
                self._resetTransaction()
                self._reply(replies.LOCAL_ERROR)
            if self._closing:
                self._close(replies.SHUTDOWN)
                return
            self._updateReading()
            self._process()

        d.addBoth(done)

    # -- commands: session ---------------------------------------------

    def do_EHLO(self, argument: str) -> None:
        self._hello(argument, esmtp=True)

    def do_HELO(self, argument: str) -> None:
        self._hello(argument, esmtp=False)

    def _hello(self, argument: str, esmtp: bool) -> None:
        name = argument.split(" ", 1)[0]
        if not name:
            self._reply(replies.SYNTAX)
            return
        self._resetTransaction()
        self._helo = name[:255]
        self._esmtp = esmtp
        settings = self.factory.settings
        if not esmtp:
            self._write(SMTPReply(250, "", settings.hostname).toBytes())
            return
        lines = [
            settings.hostname,
            "PIPELINING",
            f"SIZE {settings.maxMessageSize}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
        ]
        if not self._tls and self.factory.tlsContext is not None:
            lines.append("STARTTLS")
        # RFC 4954 4 and RFC 8314 3.3: credentials travel only under TLS.
        if self._tls and self.factory.mechanisms:
            mechanisms = " ".join(self.factory.mechanisms)
            lines.append(f"AUTH {mechanisms}")
            if settings.legacyAuthLine:
                lines.append(f"AUTH={mechanisms}")
        self._write(SMTPReply(250, "", "\n".join(lines)).toBytes())

    def do_STARTTLS(self, argument: str) -> None:
        if argument:
            self._reply(replies.SYNTAX)
        elif self._tls:
            self._reply(replies.ALREADY_TLS)
        elif self.factory.tlsContext is None:
            self._reply(replies.NO_TLS_HERE)
        elif self._sender is not NO_SENDER:
            self._reply(replies.IN_TRANSACTION)
        else:
            self._reply(replies.READY_TLS)
            self._flush()
            # RFC 3207 4.2 and the 2011 command-injection class: whatever the
            # client sent after STARTTLS was sent in the clear; drop it, and
            # forget everything learnt before TLS.
            self._buffer.clear()
            self._resetSession()
            self._resetTransaction()
            self._tls = True
            self.transport.startTLS(self.factory.tlsContext)

    def do_RSET(self, argument: str) -> None:
        self._resetTransaction()
        self._reply(replies.RESET_OK)

    def do_NOOP(self, argument: str) -> None:
        self._reply(replies.OK)

    def do_HELP(self, argument: str) -> None:
        self._reply(replies.HELP)

    def do_VRFY(self, argument: str) -> None:
        # Reveals nothing about which addresses exist (RFC 5321 3.5.3).
        self._reply(replies.VRFY if argument else replies.SYNTAX)

    def do_QUIT(self, argument: str) -> None:
        self._close(replies.BYE)

    def do_EXPN(self, argument: str) -> None:
        self._reply(replies.NOT_IMPLEMENTED)

    # -- commands: AUTH (RFC 4954) --------------------------------------

    def do_AUTH(self, argument: str) -> None:
        if not self._tls:
            self._reply(replies.AUTH_NEED_TLS)
            return
        if not self._esmtp:
            self._reply(replies.NEED_EHLO)
            return
        if self._user is not None:
            self._reply(replies.ALREADY_AUTHENTICATED)
            return
        if self._sender is not NO_SENDER:
            self._reply(replies.IN_TRANSACTION)
            return
        words = argument.split()
        if not 1 <= len(words) <= 2:
            self._reply(replies.SYNTAX)
            return
        mechanism = words[0].upper()
        if mechanism not in self.factory.mechanisms:
            self._reply(replies.AUTH_UNKNOWN_MECHANISM)
            return
        initial = None
        if len(words) == 2:
            initial = self._decode(words[1].encode("ascii"))
            if initial is None:
                return
        exchange = makeExchange(mechanism, self.factory.settings.hostname)
        self._exchange = exchange
        self._authStep(lambda: exchange.start(initial))

    def _decode(self, response: bytes) -> bytes | None:
        if response == b"=":
            return b""
        try:
            return base64.b64decode(response, validate=True)
        except (binascii.Error, ValueError):
            self._exchange = None
            self._reply(replies.AUTH_BAD_BASE64)
            return None

    def _authResponse(self, raw: bytes) -> None:
        if raw.strip() == b"*":
            self._exchange = None
            self._reply(replies.AUTH_CANCELLED)
            return
        exchange = self._exchange
        assert exchange is not None
        response = self._decode(raw.strip())
        if response is not None:
            self._authStep(lambda: exchange.respond(response))

    def _authStep(self, step: Callable[[], Any]) -> None:
        try:
            result = step()
        except SASLFailure as failure:
            self._exchange = None
            self._reply(replies.AUTH_BAD_BASE64 if failure.malformed else replies.AUTH_INVALID)
            if not failure.malformed:
                self._logAuthFailure(None)
            return
        if isinstance(result, Challenge):
            encoded = base64.b64encode(result.data).decode("ascii")
            self._write(f"334 {encoded}\r\n".encode("ascii"))
            return
        self._exchange = None
        credentials = result.credentials
        throttle = self.factory.guards.auth
        address = self.session().clientAddress
        login = _username(credentials)
        delay = 0.0
        if throttle is not None:
            decision = throttle.check(address, login)
            if decision.disconnect:
                self._close(decision.reply)
                return
            if decision.refuse and decision.reply is not None:
                self._reply(decision.reply)
                return
            delay = decision.delay
        portal = self.factory.portal
        if delay > 0:
            # After a few failures every answer waits, right or wrong: each
            # guess costs the attacker the delay, and a client that gives up
            # early learns nothing (an unknown user costs the same, too).
            d = deferLater(self.factory.clock, delay, portal.login, credentials, None, ISubmitter)
        else:
            d = maybeDeferred(portal.login, credentials, None, ISubmitter)
        self._await(d, lambda outcome: self._loggedIn(outcome, credentials))

    def _loggedIn(self, outcome: Any, credentials: Any) -> None:
        throttle = self.factory.guards.auth
        address, login = self.session().clientAddress, _username(credentials)
        if isinstance(outcome, Failure):
            if outcome.check(UnauthorizedLogin, UnhandledCredentials):
                self._logAuthFailure(credentials)
                if throttle is not None:
                    throttle.failed(address, login)
                self._reply(replies.AUTH_INVALID)
            else:
                self._log.failure("Authentication backend failed", outcome)
                self._reply(replies.AUTH_TEMPFAIL)
            return
        _, avatar, _ = outcome
        if throttle is not None:
            throttle.succeeded(address, login)
        self._user = avatar.login
        self._log.info(
            "auth ok user={user!r} client={client}",
            user=self._user,
            client=self.session().clientAddress,
        )
        self._reply(replies.AUTH_OK)

    def _logAuthFailure(self, credentials: Any) -> None:
        self._log.info(
            "auth failed user={user!r} client={client}",
            user=(_username(credentials) or "")[:128],
            client=self.session().clientAddress,
        )

    # -- commands: the transaction ---------------------------------------

    def do_MAIL(self, argument: str) -> None:
        if self._helo is None:
            self._reply(replies.NEED_HELO)
            return
        if self._user is None:
            self._reply(replies.AUTH_REQUIRED)
            return
        if self._sender is not NO_SENDER:
            self._reply(replies.NESTED_MAIL)
            return
        quota = self.factory.guards.quota
        if quota is not None:
            refusal = quota.checkMessage(self._user)
            if refusal is not None:
                self._reply(refusal)
                return
        if argument[:5].upper() != "FROM:":
            self._reply(replies.SYNTAX)
            return
        try:
            pathText, parameters = splitPathAndParameters(argument[5:].lstrip(" "))
        except AddressError:
            self._reply(replies.BAD_SENDER)
            return
        except ParameterError:
            self._reply(replies.SYNTAX)
            return
        body, smtputf8, size = BodyType.SEVENBIT, False, None
        for name, value in parameters.items():
            if not self._esmtp:
                self._reply(replies.UNKNOWN_PARAMETER, name=name)
                return
            if name == "SIZE":
                if value is None or not value.isdigit() or len(value) > 20:
                    self._reply(replies.BAD_PARAMETER, name=name)
                    return
                size = int(value)
                if size > self.factory.settings.maxMessageSize:
                    self._reply(replies.TOO_BIG)
                    return
            elif name == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    self._reply(replies.BAD_PARAMETER, name=name)
                    return
                body = BodyType(value.upper())
            elif name == "SMTPUTF8" and value is None:
                smtputf8 = True
            elif name == "AUTH" and value is not None:
                pass  # RFC 4954 5: optional; we trust only our own AUTH.
            else:
                self._reply(replies.UNKNOWN_PARAMETER, name=name)
                return
        try:
            sender = parsePath(pathText, utf8=smtputf8, allowNull=True)
        except AddressError:
            needUTF8 = not smtputf8 and not pathText.isascii()
            self._reply(replies.NEED_SMTPUTF8 if needUTF8 else replies.BAD_SENDER)
            return

        def checked(outcome: Any) -> None:
            if self._policyRefused(outcome):
                return
            self._sender = sender
            self._body, self._smtputf8, self._declaredSize = body, smtputf8, size
            self._reply(replies.SENDER_OK)

        d = maybeDeferred(self.factory.policy.checkSender, self.session(), sender)
        self._await(d, checked)

    def _policyRefused(self, outcome: Any) -> bool:
        if isinstance(outcome, Failure):
            self._log.failure("Policy check failed", outcome)
            self._reply(replies.POLICY_ERROR)
            return True
        if isinstance(outcome, SMTPReply):
            self._reply(outcome)
            return True
        return False

    def do_RCPT(self, argument: str) -> None:
        if self._sender is NO_SENDER:
            self._reply(replies.NEED_MAIL)
            return
        if argument[:3].upper() != "TO:":
            self._reply(replies.SYNTAX)
            return
        self._rcptTried = True
        try:
            pathText, parameters = splitPathAndParameters(argument[3:].lstrip(" "))
        except AddressError:
            self._reply(replies.BAD_RECIPIENT)
            return
        except ParameterError:
            self._reply(replies.SYNTAX)
            return
        if parameters:
            self._reply(replies.UNKNOWN_PARAMETER, name=next(iter(parameters)))
            return
        try:
            recipient = parsePath(pathText, utf8=self._smtputf8)
        except AddressError:
            needUTF8 = not self._smtputf8 and not pathText.isascii()
            self._reply(replies.NEED_SMTPUTF8 if needUTF8 else replies.BAD_RECIPIENT)
            return
        assert recipient is not None
        if len(self._recipients) >= self.factory.settings.maxRecipients:
            # RFC 5321 4.5.3.1.10: 452, and the client sends the rest later.
            self._reply(replies.TOO_MANY_RECIPIENTS)
            return
        quota = self.factory.guards.quota
        if quota is not None and self._user is not None:
            refusal = quota.checkRecipient(self._user, len(self._recipients))
            if refusal is not None:
                self._reply(refusal)
                return
        sender = self._sender
        assert not isinstance(sender, _NoSender)

        def checked(outcome: Any) -> None:
            if self._policyRefused(outcome):
                return
            if recipient not in self._recipients:
                self._recipients.append(recipient)
            self._reply(replies.RECIPIENT_OK)

        d = maybeDeferred(self.factory.policy.checkRecipient, self.session(), sender, recipient)
        self._await(d, checked)

    def do_DATA(self, argument: str) -> None:
        if argument:
            self._reply(replies.SYNTAX)
            return
        if self._sender is NO_SENDER:
            self._reply(replies.NEED_MAIL)
            return
        if not self._recipients:
            self._reply(replies.NO_VALID_RECIPIENTS if self._rcptTried else replies.NEED_RCPT)
            return
        sender = self._sender
        assert not isinstance(sender, _NoSender)
        envelope = Envelope(
            sender=sender,
            recipients=tuple(self._recipients),
            body=self._body,
            smtputf8=self._smtputf8,
            declaredSize=self._declaredSize,
        )
        session = self.session()
        try:
            writer = self.factory.spool.begin(envelope, session)
            writer.write(
                receivedHeader(
                    session,
                    envelope,
                    self.factory.settings.hostname,
                    writer.queueId,
                    self.factory.clock.seconds(),
                )
            )
        except SpoolError as e:
            self._spoolFailed(e)
            return
        self._writer = writer
        settings = self.factory.settings
        self._reader = DataReader(
            sink=self._writeData,
            maxSize=settings.maxMessageSize,
            maxLineLength=settings.maxLineLength,
            maxHeaderSize=settings.maxHeaderSize,
            maxReceived=settings.maxReceivedHeaders,
        )
        self._envelope = envelope
        self._reply(replies.START_DATA)

    def _writeData(self, data: bytes) -> None:
        assert self._writer is not None and self._reader is not None
        try:
            self._writer.write(data)
        except SpoolError as e:
            self._log.error("Spool write failed: {error}", error=e)
            self._reader.error = (
                replies.DISK_FULL if isinstance(e, SpoolFullError) else (replies.LOCAL_ERROR)
            )

    def _spoolFailed(self, error: Exception) -> None:
        self._log.error("Spool failed: {error}", error=error)
        self._resetTransaction()
        self._reply(replies.DISK_FULL if isinstance(error, SpoolFullError) else replies.LOCAL_ERROR)

    def _feedData(self) -> None:
        reader, writer = self._reader, self._writer
        assert reader is not None and writer is not None
        data, self._buffer = bytes(self._buffer), bytearray()
        rest = reader.feed(data)
        if rest is None:
            return
        self._buffer = bytearray(rest)
        self._reader = None
        self._writer = None
        if reader.error is not None:
            writer.abort()
            self._resetTransaction()
            self._reply(reader.error)
            return
        envelope = self._envelope
        assert envelope is not None
        session = self.session()

        def checked(outcome: Any) -> None:
            if self._policyRefused(outcome):
                writer.abort()
                self._resetTransaction()
                return
            self._await(maybeDeferred(writer.commit), committed)

        def committed(outcome: Any) -> None:
            self._resetTransaction()
            if isinstance(outcome, Failure):
                writer.abort()
                if outcome.check(SpoolError):
                    self._spoolFailed(outcome.value)
                else:
                    self._log.failure("Spool commit failed", outcome)
                    self._reply(replies.LOCAL_ERROR)
                return
            self._queued(outcome, envelope, reader.size)

        d = maybeDeferred(
            self.factory.policy.checkMessage, session, envelope, bytes(reader.headers)
        )
        self._await(d, checked)

    def _queued(self, queueId: str, envelope: Envelope, size: int) -> None:
        quota = self.factory.guards.quota
        if quota is not None and self._user is not None:
            quota.record(self._user, len(envelope.recipients))
        self._log.info(
            "queued {queueId} from=<{sender}> rcpts={count} size={size} user={user!r} "
            "client={client}",
            queueId=queueId,
            sender=envelope.sender or "",
            count=len(envelope.recipients),
            size=size,
            user=self._user,
            client=self.session().clientAddress,
        )
        self._reply(replies.QUEUED, queueId=queueId)
        if self.factory.onQueued is not None:
            try:
                self.factory.onQueued(queueId)
            except Exception:
                self._log.failure("Queue notification failed for {queueId}", queueId=queueId)

    _commands: dict[str, Callable[[SubmissionServer, str], None]] = {}


def _username(credentials: Any) -> str | None:
    username = getattr(credentials, "username", None)
    if isinstance(username, bytes):
        return username.decode("utf-8", "replace")
    return username


SubmissionServer._commands = {
    name[3:]: method
    for name, method in vars(SubmissionServer).items()
    if name.startswith("do_") and callable(method)
}
