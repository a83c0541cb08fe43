"""
mailgw's outbound ESMTP client: one session with one upstream host that
delivers several queued messages, with TLS that is never downgraded, AUTH
only under TLS, RFC 5321 4.5.3.2 timeouts and every outcome turned into a
L{DeliveryResult} per pending recipient.

L{deliverBatch} never fails: network, TLS, timeout and protocol problems are
transient results; replies are classified as docs/relay-client.md tabulates.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any, BinaryIO, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import (
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailgw.config import TLSMode
from mailgw.envelope import BodyType, DeliveryResult, QueuedMessage
from mailgw.relay.clientprotocol import (
    BODY_CHUNK,
    ConnectionFailed,
    LocalError,
    ProtocolError,
    RelayError,
    Reply,
    SMTPClientProtocol,
    describeFailure,
)
from mailgw.relay.clientsettings import (
    Attempt,
    MessageOpener,
    OnFinished,
    RelaySettings,
    RelayTimeouts,
)
from mailgw.relay.clienttls import checkPeer, withoutTLS
from mailgw.relay.clienttransaction import Capabilities, Outcome, Transaction, classify
from mailgw.relay.filecache import RunBlocking, runInline
from mailgw.tls import describeTLS

__all__ = [
    "Attempt",
    "MessageOpener",
    "OnFinished",
    "RelaySettings",
    "RelayTimeouts",
    "TLSMode",
    "deliverBatch",
]

log = Logger()


def deliverBatch(
    reactor: IReactorTime,
    endpoint: IStreamClientEndpoint,
    settings: RelaySettings,
    messages: Sequence[tuple[QueuedMessage, MessageOpener]],
    *,
    runBlocking: RunBlocking = runInline,
    onFinished: OnFinished | None = None,
) -> Deferred[list[list[DeliveryResult]]]:
    """
    Deliver C{messages} over one connection made with C{endpoint} (a plain
    TCP endpoint; for IMPLICIT mode this wraps it with C{wrapClientTLS}).

    Each message is opened with its opener, read in L{BODY_CHUNK} pieces
    and closed through C{runBlocking} (a thread pool in production; the
    default runs them inline, for tests). C{onFinished} is called once per
    message, from the reactor thread, as soon as the message's results are
    known: after the upstream's reply to its final dot, not at the end of
    the session; a failure of C{onFinished} is logged and ignored.

    @return: a Deferred that never fails and fires, once the connection is
        closed, with one list per message of one L{DeliveryResult} per
        I{pending} recipient, in the message's order. Successes are 2xx to
        the final dot; 5xx to MAIL, RCPT, DATA or the final dot are
        permanent for the recipients concerned, and so is a message the
        upstream cannot take (8-bit, SMTPUTF8, too big); everything else
        (4xx, network, TLS, certificate, timeout, protocol errors, AUTH
        refused, 530) is transient.
    """
    return Deferred.fromCoroutine(
        _deliverBatch(reactor, endpoint, settings, messages, runBlocking, onFinished)
    )


class _ClientFactory(Factory):
    noisy = False  # no "Starting factory" line per relay connection

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock

    def buildProtocol(self, addr: object) -> SMTPClientProtocol:
        return SMTPClientProtocol(self.clock)


async def _connect(
    reactor: IReactorTime, endpoint: IStreamClientEndpoint, settings: RelaySettings
) -> SMTPClientProtocol:
    if settings.tlsMode is TLSMode.IMPLICIT:
        assert settings.tlsCreator is not None  # RelaySettings checks it
        endpoint = wrapClientTLS(settings.tlsCreator, endpoint, clock=reactor)
    connecting = endpoint.connect(_ClientFactory(reactor))
    timer = reactor.callLater(settings.timeouts.connect, connecting.cancel)
    try:
        protocol = cast(SMTPClientProtocol, await connecting)
    except Exception as e:
        if not timer.active():
            raise ConnectionFailed("timeout connecting to upstream") from e
        raise ConnectionFailed(describeFailure(Failure(e))) from e
    finally:
        if timer.active():
            timer.cancel()
    return protocol


async def _deliverBatch(
    reactor: IReactorTime,
    endpoint: IStreamClientEndpoint,
    settings: RelaySettings,
    messages: Sequence[tuple[QueuedMessage, MessageOpener]],
    runBlocking: RunBlocking,
    onFinished: OnFinished | None,
) -> list[list[DeliveryResult]]:
    transactions = [Transaction.forMessage(m, settings.hostname) for m, _ in messages]
    reporter = _Reporter(transactions, onFinished)
    work = list(zip(transactions, (o for _, o in messages), strict=True))
    protocol: SMTPClientProtocol | None = None
    session: _Session | None = None
    try:
        if not all(t.finished for t in transactions):
            protocol = await _connect(reactor, endpoint, settings)
            reporter.protocol = protocol
            session = _Session(protocol, settings, runBlocking, reporter)
            await session.run(work)
    except Exception as e:
        if isinstance(e, RelayError) and session is not None and session.fallBack():
            # Level may (Postfix's too): a failed handshake is tried again
            # in plain text, on a new connection; nothing was sent yet.
            assert protocol is not None
            log.info(
                "TLS with {remote} failed ({why}); trying again without TLS (tls level may)",
                remote=settings.hostname,
                why=str(e),
            )
            protocol.fail(e)
            await protocol.whenClosed()
            plain = withoutTLS(settings)
            return await _deliverBatch(reactor, endpoint, plain, messages, runBlocking, onFinished)
        if not isinstance(e, RelayError):
            log.failure("relay client bug; every unfinished recipient is deferred")
            e = RelayError("internal error in the relay client")
        log.info("relay to {remote} ended: {why}", remote=settings.hostname, why=str(e))
        for t in transactions:
            t.failUnfinished(e)
        reporter.report()
        if protocol is not None and e.polite:
            await _Session(protocol, settings, runBlocking, reporter).quit()
        elif protocol is not None:
            protocol.fail(e)  # abort: the connection is out of step or hostile
    reporter.report()
    if protocol is not None:
        protocol.close(settings.timeouts.quit)
        await protocol.whenClosed()
    return [t.results() for t in transactions]


class _Reporter:
    """Calls C{onFinished} once for each transaction, once it is finished."""

    def __init__(self, transactions: list[Transaction], onFinished: OnFinished | None) -> None:
        self.transactions = transactions
        self.onFinished = onFinished
        # Indices not reported yet: each report looks at these alone.
        self.unreported = list(range(len(transactions)))
        self.protocol: SMTPClientProtocol | None = None
        self._tls: tuple[str | None, str | None] = (None, None)
        self.tlsVerified = False

    def attempt(self) -> Attempt:
        if self.protocol is None or self.protocol.transport is None:
            return Attempt()
        transport: Any = self.protocol.transport
        peer = transport.getPeer()
        host, port = getattr(peer, "host", None), getattr(peer, "port", None)
        version, cipher = describeTLS(transport)
        if version is not None:
            self._tls = (version, cipher)  # still known once the connection is gone
        address = (str(host), int(port)) if host is not None and port is not None else None
        return Attempt(address, *self._tls, tlsVerified=self.tlsVerified)

    def report(self) -> None:
        if self.onFinished is None:
            return
        done: list[int] = []
        rest: list[int] = []
        for index in self.unreported:
            (done if self.transactions[index].finished else rest).append(index)
        self.unreported = rest
        for index in done:
            try:
                self.onFinished(index, self.transactions[index].results(), self.attempt())
            except Exception:
                log.failure("error reporting a relay result")


class _Body:
    """
    A message being read for relaying: the first chunk read when the file
    was opened, then the rest (``file`` is None once it is all read and
    closed).
    """

    def __init__(self, file: BinaryIO | None, first: bytes) -> None:
        self.file = file
        self._first: bytes | None = first

    def read(self, runBlocking: RunBlocking) -> Deferred[bytes]:
        """The next chunk, b"" at the end."""
        if self._first is not None:
            first, self._first = self._first, None
            return succeed(first)
        if self.file is None:
            return succeed(b"")
        return runBlocking(self.file.read, BODY_CHUNK)  # type: ignore[no-any-return]


def _openBody(opener: MessageOpener, queueId: str) -> _Body:
    """In a thread: open ``queueId``, read its first chunk, close it if that was all."""
    file = opener(queueId)
    try:
        first = file.read(BODY_CHUNK)
    except BaseException:
        file.close()
        raise
    if len(first) < BODY_CHUNK:
        file.close()
        return _Body(None, first)
    return _Body(file, first)


class _Session:
    """The dialogue with one upstream, from greeting to QUIT."""

    def __init__(
        self,
        protocol: SMTPClientProtocol,
        settings: RelaySettings,
        runBlocking: RunBlocking,
        reporter: _Reporter,
    ) -> None:
        self.protocol = protocol
        self.settings = settings
        self.runBlocking = runBlocking
        self.reporter = reporter
        self.timeouts = settings.timeouts
        self.capabilities = Capabilities()
        self.tls = settings.tlsMode is TLSMode.IMPLICIT
        #: TLS is on and authenticated the upstream: its certificate was
        #: verified (levels verify, secure, DANE, MTA-STS). REQUIRETLS needs it.
        self.tlsVerified = False
        self._handshaking = False  # STARTTLS answered 220, TLS not yet working

    async def command(self, line: str, timeout: float, waitingFor: str) -> Reply:
        self.protocol.send(line.encode("utf-8") + b"\r\n", 1)
        return await self.protocol.nextReply(timeout, waitingFor)

    async def run(self, work: list[tuple[Transaction, MessageOpener]]) -> None:
        greeting = await self.protocol.nextReply(self.timeouts.greeting, "greeting")
        if greeting.code != 220:
            raise _refused("the session", greeting)
        if self.tls:
            self.checkPeer()
        await self.hello()
        await self.secure()
        await self.authenticate()
        for transaction, opener in work:
            if not transaction.finished:
                await self.deliver(transaction, opener)
            self.reporter.report()
        await self.quit()

    async def hello(self) -> None:
        verb = "LHLO" if self.settings.lmtp else "EHLO"  # RFC 2033 4.1
        reply = await self.command(
            f"{verb} {self.settings.ehloHostname}", self.timeouts.ehlo, f"reply to {verb}"
        )
        if reply.positive:
            self.capabilities = Capabilities.fromEHLO(reply)
            return
        # HELO only where nothing EHLO alone offers is needed (RFC 5321 3.2).
        mayHELO = self.settings.tlsMode is not TLSMode.STARTTLS and self.settings.auth is None
        if not (500 <= reply.code < 600 and mayHELO) or self.settings.lmtp:
            raise _refused(verb, reply)
        reply = await self.command(
            f"HELO {self.settings.ehloHostname}", self.timeouts.ehlo, "reply to HELO"
        )
        if not reply.positive:
            raise _refused("HELO", reply)
        self.capabilities = Capabilities()

    async def secure(self) -> None:
        mode = self.settings.tlsMode
        if mode not in (TLSMode.STARTTLS, TLSMode.OPPORTUNISTIC):
            return
        check = self.settings.peerCheck
        if not self.capabilities.offers("STARTTLS"):
            if check is not None and check.report is not None:
                check.report("starttls-not-supported")
            if mode is TLSMode.STARTTLS:
                raise RelayError("TLS required but upstream did not offer STARTTLS", polite=True)
            return
        reply = await self.command("STARTTLS", self.timeouts.command, "reply to STARTTLS")
        if reply.code != 220:
            if self.settings.plaintextFallback and reply.code != 421:
                # Level may: unauthenticated TLS protects from nobody who
                # can refuse it; plain text it is (RFC 3207 4.1).
                log.info(
                    "upstream {remote} refused STARTTLS ({reply}); going on without TLS",
                    remote=self.settings.hostname,
                    reply=str(reply),
                )
                return
            # Otherwise, once offered, TLS is required to work: never fall
            # back to plain text (an attacker could provoke the refusal).
            raise _refused("STARTTLS", reply)
        self.protocol.startTLS(self.settings.tlsCreator)
        self.tls = True
        self._handshaking = True
        # RFC 3207 4.2: forget what was learnt before TLS, and ask again.
        self.capabilities = Capabilities()
        await self.hello()
        self._handshaking = False
        self.checkPeer()

    def fallBack(self) -> bool:
        """Did TLS fail at the handshake, where level may goes on in plain text?"""
        return self._handshaking and self.settings.plaintextFallback

    def checkPeer(self) -> None:
        """After the handshake: the settings' peer check; sets L{tlsVerified}."""
        self.tlsVerified = checkPeer(self.settings, self.protocol.transport)
        self.reporter.tlsVerified = self.tlsVerified

    async def authenticate(self) -> None:
        if self.settings.auth is None:
            return
        user, password, mechanism = self.settings.auth
        if not self.tls and self.settings.tlsMode is not TLSMode.NONE:
            raise RelayError(
                "refusing to send AUTH credentials without TLS (upstream did not offer STARTTLS)",
                polite=True,
            )
        if mechanism not in self.capabilities.authMechanisms:
            raise RelayError(f"upstream does not offer AUTH {mechanism}", polite=True)
        if mechanism == "PLAIN":
            token = _b64(b"\0" + user.encode("utf-8") + b"\0" + password.encode("utf-8"))
            reply = await self.command(f"AUTH PLAIN {token}", self.timeouts.command, "AUTH reply")
        else:
            reply = await self.command("AUTH LOGIN", self.timeouts.command, "AUTH reply")
            for secret in (user, password):
                if reply.code != 334:
                    break
                reply = await self.command(
                    _b64(secret.encode("utf-8")), self.timeouts.command, "AUTH reply"
                )
        if reply.code == 235:
            return
        if reply.code == 334:
            # A challenge we have no answer for: cancel (RFC 4954 4).
            reply = await self.command("*", self.timeouts.command, "AUTH reply")
        if reply.code == 535:
            raise RelayError(
                f"upstream rejected our AUTH credentials ({reply}); check the relay configuration",
                polite=True,
            )
        raise _refused("AUTH", reply)

    async def deliver(self, transaction: Transaction, opener: MessageOpener) -> None:
        if transaction.refuse(self.capabilities, self.tls and self.tlsVerified):
            return
        try:
            # One trip to a thread opens the file and reads its first
            # chunk, and closes it too when that is all there is: most
            # messages cost one thread hop, not four (open, read, EOF, close).
            body = await self.runBlocking(_openBody, opener, transaction.message.queueId)
        except Exception as e:
            # OSError, KeyError (gone), or whatever the spool raises for a
            # local failure (its SpoolError): transient for this message.
            if not isinstance(e, OSError | KeyError):
                log.failure("cannot open {queueId}", queueId=transaction.message.queueId)
            why = f"cannot open the message in the spool: {e}"
            transaction.finishAll(Outcome(False, False, 0, "", why))
            return
        try:
            await self.transaction(transaction, body)
            self.reporter.report()  # before the close: that is a thread's round trip
        finally:
            if body.file is not None:
                await self.runBlocking(body.file.close)

    async def transaction(self, transaction: Transaction, body: _Body) -> None:
        protocol, timeouts = self.protocol, self.timeouts
        mail = transaction.mailCommand(self.capabilities)
        toSend = transaction.unfinished()
        rcpts = [transaction.rcptCommand(address, self.capabilities) for _, address in toSend]
        pipelining = self.capabilities.offers("PIPELINING")
        # RFC 3030 3: a BINARYMIME message goes in BDAT chunks, never DATA.
        chunked = transaction.message.envelope.body is BodyType.BINARYMIME
        if pipelining:
            # RFC 2920 3.1: MAIL, every RCPT and DATA in one group.
            lines = [mail, *rcpts] if chunked else [mail, *rcpts, "DATA"]
            protocol.send("".join(f"{line}\r\n" for line in lines).encode("utf-8"), len(lines))
            mailReply = await protocol.nextReply(timeouts.mail, "reply to MAIL")
        else:
            mailReply = await self.command(mail, timeouts.mail, "reply to MAIL")
        _check(mailReply)
        if not mailReply.positive:
            transaction.finishAll(classify(mailReply))
        accepted = 0
        acceptedAt: list[int] = []  # LMTP answers for each of these, in order
        if mailReply.positive or pipelining:
            # Replies to a pipelined group are read whatever MAIL got.
            for rcpt, (index, _) in zip(rcpts, toSend, strict=True):
                if pipelining:
                    reply = await protocol.nextReply(timeouts.rcpt, "reply to RCPT")
                else:
                    reply = await self.command(rcpt, timeouts.rcpt, "reply to RCPT")
                _check(reply)
                if mailReply.positive and reply.positive:
                    accepted += 1
                    acceptedAt.append(index)
                elif mailReply.positive:
                    transaction.finish(index, classify(reply))
        if chunked:
            if accepted:
                await self.chunks(transaction, body)
            elif mailReply.positive:
                await self.reset()
            return
        dataReply: Reply | None = None
        if pipelining:
            dataReply = await protocol.nextReply(timeouts.dataInitiation, "reply to DATA")
        elif accepted:
            dataReply = await self.command("DATA", timeouts.dataInitiation, "reply to DATA")
        if dataReply is not None:
            _check(dataReply, intermediate=True)
        if not accepted:
            if dataReply is not None and dataReply.code == 354:
                # RFC 2920 3.1: DATA accepted with no recipient: end it empty.
                protocol.send(b".\r\n", 1)
                _check(await protocol.nextReply(timeouts.finalDot, "reply to the final dot"))
            elif mailReply.positive:
                await self.reset()
            return
        assert dataReply is not None
        if dataReply.code != 354:
            if dataReply.positive:
                raise ProtocolError(f"protocol error: DATA answered with {dataReply}")
            transaction.finishAll(classify(dataReply))
            await self.reset()
            return
        replies = len(acceptedAt) if self.settings.lmtp else 1
        await protocol.sendBody(lambda: body.read(self.runBlocking), timeouts.dataBlock, replies)
        if self.settings.lmtp:
            # RFC 2033 4.2: one reply per accepted recipient, in RCPT order.
            for index in acceptedAt:
                final = await protocol.nextReply(timeouts.finalDot, "reply to the final dot")
                _check(final)
                transaction.finish(index, classify(final))
            return
        final = await protocol.nextReply(timeouts.finalDot, "reply to the final dot")
        _check(final)
        transaction.finishAll(classify(final))

    async def chunks(self, transaction: Transaction, body: _Body) -> None:
        """
        The message in BDAT chunks (RFC 3030), each answered before the next
        is sent, then an empty LAST chunk; a refused chunk ends the
        transaction with its reply.
        """
        protocol, timeouts = self.protocol, self.timeouts
        while True:
            try:
                chunk = await body.read(self.runBlocking)
            except (OSError, ValueError) as e:
                raise LocalError(f"cannot read the message from the spool: {e}") from None
            last = not chunk
            protocol.send(b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if last else b"") + chunk, 1)
            waitingFor = "reply to the last BDAT" if last else "reply to BDAT"
            reply = await protocol.nextReply(timeouts.finalDot if last else timeouts.dataBlock,
                                             waitingFor)  # fmt: skip
            _check(reply)
            if last or not reply.positive:
                transaction.finishAll(classify(reply))
                if not last:
                    await self.reset()
                return

    async def reset(self) -> None:
        """RSET after a transaction that failed midway (RFC 5321 4.1.1.5)."""
        reply = await self.command("RSET", self.timeouts.command, "reply to RSET")
        if not reply.positive:
            raise _refused("RSET", reply)

    async def quit(self) -> None:
        """Say goodbye; every result is known by now, so failures are ignored."""
        try:
            await self.command("QUIT", self.timeouts.quit, "reply to QUIT")
        except RelayError:
            pass


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _refused(what: str, reply: Reply) -> RelayError:
    # 421 means the upstream is closing the connection (RFC 5321 3.8).
    return RelayError(f"upstream refused {what}: {reply}", reply, polite=reply.code != 421)


def _check(reply: Reply, intermediate: bool = False) -> None:
    """
    Refuse replies that make no sense at this point, and end the session
    on 421 (RFC 5321 3.8: the upstream is closing).
    """
    if reply.code == 421:
        raise RelayError(f"upstream is closing the connection: {reply}", reply)
    if 300 <= reply.code < 400 and not (intermediate and reply.code == 354):
        raise ProtocolError(f"protocol error: unexpected reply {reply}")
