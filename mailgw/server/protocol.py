"""
The ESMTP submission session (RFC 5321, RFC 6409): command parsing and
dispatch, the session state (HELO, TLS, the authenticated user), and the
phases that own resources: L{AuthPhase} (an AUTH attempt and its outcome)
and L{Transaction} (the message writer and its commit).

Connection handling (buffering, back-pressure, deadlines, closing) is
L{mailgw.server.connection.Connection}'s. The listener's settings are
handed in (L{mailgw.server.settings.Listener}).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable

from twisted.internet.defer import Deferred

from mailgw import replies
from mailgw.envelope import Session
from mailgw.networks import inNetworks
from mailgw.replies import SMTPReply
from mailgw.server.authentication import (
    AuthPhase,
    AuthStep,
    ChallengeLine,
    CloseWith,
    LoginOutcome,
)
from mailgw.server.connection import PREAUTH, Connection
from mailgw.server.etrn import etrnAnswer
from mailgw.server.extensions import DSN_KEYWORD, REQUIRETLS_KEYWORD
from mailgw.server.sessionlog import SessionRecord
from mailgw.server.settings import Listener
from mailgw.server.transaction import Stage, Transaction
from mailgw.tls import describeTLS

_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_HTTP_VERBS = frozenset({"GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS", "DELETE"})
# Commands that move nothing forward; RFC 5321 lets a client send them at
# any time, so only their number is limited (maxJunkCommands).
_JUNK = frozenset({"NOOP", "RSET", "HELP", "VRFY", "EXPN"})


class SubmissionServer(Connection):
    """One client connection to a submission or submissions listener."""

    def __init__(self, listener: Listener) -> None:
        super().__init__(listener)
        self._errors = 0
        self._junk = 0
        self._preAuthLeft: float | None = None
        self._session: tuple[tuple[object, ...], Session] | None = None
        # The address the connection limiter counted this connection for.
        self._counted: str | None = None
        self._tls = listener.implicitTLS
        self._helo: str | None = None
        self._esmtp = False
        self._user: str | None = None
        self._loggedInOnce = False
        #: The session's id in its log lines (``session``), for ``mailgw explain``.
        self.sessionId = secrets.token_hex(6)
        self._auth = AuthPhase(listener, self._clientAddress, self.sessionId)
        #: [milter] servers (L{mailgw.interfaces.IMilterChain}), or None: no milter.
        chain = getattr(listener, "milters", None)
        self._milters = chain.open() if chain is not None else None
        self._transaction = self._newTransaction()
        self.record = SessionRecord(listener=listener.listenerName, sessionId=self.sessionId)
        #: L{mailgw.metrics.Metrics}, or None: metrics are off.
        self._metrics = getattr(listener, "metrics", None)

    @property
    def factory(self) -> Listener:
        """The listener (Twisted's name for it)."""
        return self.listener

    # -- state -----------------------------------------------------------

    def _newTransaction(self) -> Transaction:
        record = getattr(self, "record", None)  # not yet while __init__ runs
        mechanism = (record.mechanism if record is not None else None) or ""
        return Transaction(self.listener, self.session, self._user, self._milters, mechanism)

    def _resetTransaction(self) -> None:
        self._transaction.abandon()
        self._transaction = self._newTransaction()

    def _resetSession(self) -> None:
        """RFC 3207 4.2: after STARTTLS nothing learnt before it holds."""
        self._auth.abandon()
        self._auth = AuthPhase(self.listener, self._clientAddress, self.sessionId)
        self._helo, self._esmtp, self._user = None, False, None
        self._resetTransaction()

    def _clientAddress(self) -> str:
        return self.session().clientAddress

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
            listener=self.listener.listenerName,
            sessionId=self.sessionId,
        )
        # Asked several times per command: built again only when it changes.
        self._session = (key, session) if complete else None
        return session

    # -- connection hooks ------------------------------------------------

    def connectionOpened(self) -> None:
        limiter = self.listener.guards.connections
        self.record.client = self._clientAddress()
        trusted = self.listener.reinjectNetworks
        if trusted is not None and not inNetworks(self._clientAddress(), trusted):
            # A reinjection listener takes mail without AUTH: only from its networks.
            self._log.info("reinjection refused client={client}", client=self._clientAddress())
            self.close(replies.REINJECT_REFUSED)
            return
        if limiter is not None:
            address = self._clientAddress()
            refusal = limiter.open(address)
            if refusal is not None:
                self.record.closedWith(refusal, refusedByLimit=True)
                if self._metrics is not None:
                    self._metrics.throttleDecision("connection-limit", "refuse")
                self._log.info(
                    "connection refused client={client}: {reason}",
                    client=address,
                    session=self.sessionId,
                    reason=refusal.text,
                )
                self.close(refusal)
                return
            self._counted = address
        auth = self.listener.guards.auth
        if auth is not None:  # shared counts: ask for this client's failures now
            auth.prefetch(self._clientAddress())
        settings = self.listener.settings
        if trusted is None:  # no AUTH on a reinjection listener: nothing to wait for
            self.startTimer(PREAUTH, settings.preAuthTimeout, replies.PREAUTH_TIMEOUT)
        if self._milters is not None:
            self.wait(self._milters.connect(self.session()), self._greet)
        else:
            self._greet(None)

    def _greet(self, refusal: SMTPReply | None) -> None:
        if refusal is not None:
            self.close(refusal)  # a milter refused the client at connect
            return
        hostname = self.listener.settings.hostname
        self.write(SMTPReply(220, "", f"{hostname} ESMTP mailgw").toBytes())

    def releaseResources(self) -> None:
        self._auth.abandon()
        self._transaction.abandon()
        if self._milters is not None:
            self._milters.close()

    def connectionEnded(self) -> None:
        limiter = self.listener.guards.connections
        if self._counted is not None and limiter is not None:
            limiter.close(self._counted, authenticated=self._loggedInOnce)
            self._counted = None
        self._sawTLS()
        record = self.record
        outcome = record.ended(tlsExpected=self.listener.implicitTLS)
        record.log()
        metrics = self._metrics
        if metrics is not None:
            metrics.connectionClosed(record.listener, outcome)
            if record.tlsVersion is not None:
                metrics.tlsHandshake(record.tlsVersion)
            elif self._tls and outcome != "limit":
                metrics.tlsFailed(record.listener)

    def close(self, reply: SMTPReply | None = None) -> None:
        if not self.closing:
            self.record.closedWith(reply)
        super().close(reply)

    def _sawTLS(self) -> None:
        """Note the TLS version and cipher once the handshake has finished."""
        if self._tls and self.record.tlsVersion is None:
            self.record.tlsVersion, self.record.tlsCipher = describeTLS(self.transport)

    def internalError(self) -> None:
        self._resetTransaction()
        self.reply(replies.LOCAL_ERROR)

    # -- replies ---------------------------------------------------------

    def reply(self, reply: SMTPReply) -> None:
        self.write(reply.toBytes())
        if reply.isError:
            self._errors += 1
            if self._errors >= self.listener.settings.maxErrors:
                self.close(replies.TOO_MANY_ERRORS)

    def _answer(
        self, answer: SMTPReply | Deferred[SMTPReply], then: Callable[[SMTPReply], None]
    ) -> None:
        """Send ``answer`` now, or once its Deferred fires, through ``then``."""
        if isinstance(answer, Deferred):
            self.wait(answer, then)
        else:
            then(answer)

    def _junkCommand(self) -> bool:
        """Count a command that does nothing; True when it closed the session."""
        self._junk += 1
        if self._junk > self.listener.settings.maxJunkCommands:
            self.close(replies.TOO_MANY_JUNK)
            return True
        return False

    # -- input -------------------------------------------------------------

    def lineTooLong(self) -> None:
        self._auth.cancel()
        self.reply(replies.LINE_TOO_LONG)

    def lineReceived(self, raw: bytes) -> None:
        if self._auth.exchanging:
            self._authStep(self._auth.respond(raw))
            return
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.reply(replies.BAD_COMMAND_BYTES)
            return
        if _CONTROL.search(line):
            self.reply(replies.BAD_COMMAND_BYTES)
            return
        verb, _, argument = line.partition(" ")
        verb = verb.upper()
        self.record.command(verb)
        self._sawTLS()
        if verb in _HTTP_VERBS or verb.endswith(":"):
            self.close(replies.HTTP_REFUSED)
            return
        handler = self._commands.get(verb)
        if handler is None:
            self.reply(replies.UNRECOGNISED)
            return
        if not verb.isascii() or (not argument.isascii() and verb not in ("MAIL", "RCPT")):
            self.reply(replies.BAD_COMMAND_BYTES)
            return
        if verb in _JUNK and self._junkCommand():
            return
        handler(self, argument.strip(" "))

    # -- commands: session -------------------------------------------------

    def do_EHLO(self, argument: str) -> None:
        self._hello(argument, esmtp=True)

    def do_HELO(self, argument: str) -> None:
        self._hello(argument, esmtp=False)

    def _hello(self, argument: str, esmtp: bool) -> None:
        name = argument.split(" ", 1)[0]
        if not name:
            self.reply(replies.SYNTAX)
            return
        if self._helo is not None and self._junkCommand():
            return
        self._resetTransaction()
        previous, self._helo = self._helo, name[:255]
        self._esmtp = esmtp
        if self._milters is not None:
            self.wait(self._milters.helo(self.session()), lambda r: self._helloed(r, previous))
        else:
            self._helloed(None, previous)

    def _helloed(self, refusal: SMTPReply | None, previous: str | None) -> None:
        if refusal is not None:
            self._helo = previous
            self.reply(refusal)
            return
        esmtp = self._esmtp
        settings = self.listener.settings
        if not esmtp:
            self.write(SMTPReply(250, "", settings.hostname).toBytes())
            return
        lines = [
            settings.hostname,
            "PIPELINING",
            f"SIZE {settings.maxMessageSize}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            "CHUNKING",
            DSN_KEYWORD,
        ]
        if settings.binaryMime:
            lines.insert(lines.index("CHUNKING") + 1, "BINARYMIME")
        if self._tls:
            lines.append(REQUIRETLS_KEYWORD)  # RFC 8689 4.1: only under TLS
        if not self._tls and self.listener.tlsContext is not None:
            lines.append("STARTTLS")
        if self.listener.etrn is not None:
            lines.append("ETRN")  # RFC 1985
        # RFC 4954 4 and RFC 8314 3.3: credentials travel only under TLS.
        mechanisms = self.listener.mechanisms
        if self._tls and mechanisms:
            offered = " ".join(mechanisms)
            lines.append(f"AUTH {offered}")
            if settings.legacyAuthLine:
                lines.append(f"AUTH={offered}")
        self.write(SMTPReply(250, "", "\n".join(lines)).toBytes())

    def do_STARTTLS(self, argument: str) -> None:
        if argument:
            self.reply(replies.SYNTAX)
        elif self._tls:
            self.reply(replies.ALREADY_TLS)
        elif self.listener.tlsContext is None:
            self.reply(replies.NO_TLS_HERE)
        elif self._transaction.started:
            self.reply(replies.IN_TRANSACTION)
        else:
            self.reply(replies.READY_TLS)
            # RFC 3207 4.2 and the 2011 command-injection class: whatever the
            # client sent after STARTTLS was sent in the clear; drop it, and
            # forget everything learnt before TLS.
            self.dropInput()
            self._resetSession()
            self._tls = True
            self.transport.startTLS(self.listener.tlsContext)

    def do_RSET(self, argument: str) -> None:
        self._resetTransaction()
        self.reply(replies.RESET_OK)

    def do_NOOP(self, argument: str) -> None:
        self.reply(replies.OK)

    def do_HELP(self, argument: str) -> None:
        self.reply(replies.HELP)

    def do_VRFY(self, argument: str) -> None:
        # Reveals nothing about which addresses exist (RFC 5321 3.5.3).
        self.reply(replies.VRFY if argument else replies.SYNTAX)

    def do_QUIT(self, argument: str) -> None:
        self.close(replies.BYE)

    def do_EXPN(self, argument: str) -> None:
        self.reply(replies.NOT_IMPLEMENTED)

    # -- commands: AUTH (RFC 4954) -----------------------------------------

    def do_AUTH(self, argument: str) -> None:
        if not self._tls:
            self.reply(replies.AUTH_NEED_TLS)
        elif not self._esmtp:
            self.reply(replies.NEED_EHLO)
        elif self._user is not None:
            self.reply(replies.ALREADY_AUTHENTICATED)
        elif self._transaction.started:
            self.reply(replies.IN_TRANSACTION)
        else:
            mechanism = argument.split(" ", 1)[0].upper()
            if mechanism in self.listener.mechanisms:
                self.record.mechanism = mechanism
            self._authStep(self._auth.start(argument))

    def _authStep(self, step: AuthStep) -> None:
        if isinstance(step, SMTPReply):
            self.reply(step)
        elif isinstance(step, ChallengeLine):
            self.write(step.line)
        elif isinstance(step, CloseWith):
            self.close(step.reply)
        else:
            # The pre-authentication deadline counts the client's time, not
            # ours: it stands still while the password is checked (and while
            # the throttle's delay runs).
            self._preAuthLeft = self.pauseTimer(PREAUTH)
            self.wait(step, self._loggedIn)

    def _loggedIn(self, outcome: LoginOutcome) -> None:
        if outcome.close:
            self.close(outcome.reply)
            return
        left, self._preAuthLeft = self._preAuthLeft, None
        if self._metrics is not None and outcome.reply.code != 334:  # 334: mid-exchange
            code = outcome.reply.code
            result = "success" if outcome.user else "failure" if code >= 500 else "tempfail"
            self._metrics.authAttempt(self.record.mechanism or "unknown", result)
        if outcome.user is not None:
            self.record.user, self.record.authOK = outcome.user, self.record.authOK + 1
            self._user = outcome.user
            self._loggedInOnce = True  # the limiter moved this connection (authenticated())
            self._resetTransaction()
        elif left is not None:
            self.startTimer(PREAUTH, left, replies.PREAUTH_TIMEOUT)
        self.reply(outcome.reply)

    def do_ETRN(self, argument: str) -> None:
        etrn = self.listener.etrn
        if etrn is None:
            self.reply(replies.UNRECOGNISED)
        elif not self._esmtp:
            self.reply(replies.NEED_EHLO)  # an ESMTP extension (RFC 1985 4)
        elif self._transaction.started:
            self.reply(replies.IN_TRANSACTION)
        elif not self._junkCommand():  # it moves no mail of this session
            self._answer(etrnAnswer(etrn, argument, self._user, self._clientAddress()), self.reply)

    # -- commands: the transaction -----------------------------------------

    def do_MAIL(self, argument: str) -> None:
        if self._helo is None:
            self.reply(replies.NEED_HELO)
        elif not self._mayMail:
            self.reply(replies.AUTH_REQUIRED)
        else:
            self._answer(self._transaction.mail(argument, self._esmtp), self.reply)

    @property
    def _mayMail(self) -> bool:
        """Logged in, or on a reinjection listener (no AUTH there)."""
        return self._user is not None or self.listener.reinjectNetworks is not None

    def do_RCPT(self, argument: str) -> None:
        self._answer(self._transaction.rcpt(argument), self.reply)

    def do_DATA(self, argument: str) -> None:
        self._answer(self._transaction.data(argument), self._dataAnswered)

    def _dataAnswered(self, answer: SMTPReply) -> None:
        transaction = self._transaction
        if transaction.stage is Stage.DATA:
            self.rawSink = self._messageData
        elif transaction.stage is not Stage.ENVELOPE:
            self._resetTransaction()
        self.reply(answer)

    def do_BDAT(self, argument: str) -> None:
        # RFC 3030: "BDAT size [LAST]". The chunk's bytes follow the line
        # whatever we answer: they are read, and dropped when the command is
        # refused, never taken for commands. Without a size nothing tells
        # where they end: close.
        sizeText, _, flag = argument.partition(" ")
        last = flag.upper() == "LAST"
        if not sizeText.isdigit() or len(sizeText) > 18 or (flag and not last):
            self.close(replies.BAD_CHUNK_SIZE)
            return
        size = int(sizeText)
        if self._helo is None:
            self._readChunk(size, last, replies.NEED_HELO)
        elif not self._mayMail:
            self._readChunk(size, last, replies.AUTH_REQUIRED)
        else:
            # The milters may look at a new message first: its bytes wait
            # (input is not read while a command waits).
            answer = self._transaction.chunk()
            if isinstance(answer, Deferred):
                self.wait(answer, lambda refusal: self._readChunk(size, last, refusal))
            else:
                self._readChunk(size, last, answer)

    def _readChunk(self, size: int, last: bool, refusal: SMTPReply | None) -> None:
        """Read the chunk into the message, or drop it when refused; then answer."""
        transaction = self._transaction
        consume = transaction.feedChunk if refusal is None else _drop

        def read() -> None:
            self.rawSink = None
            self._chunkRead(size, last, refusal)

        def behind() -> None:
            backlog = transaction.backlog() if refusal is None else None
            if backlog is not None:
                self.wait(backlog, lambda _: None)  # a slow milter: read on once it caught up

        if size:
            self.rawSink = _Chunk(size, consume, last, read, behind)
        else:
            consume(b"", last)
            read()

    def _chunkRead(self, size: int, last: bool, refusal: SMTPReply | None) -> None:
        if refusal is not None:
            if self._transaction.stage is not Stage.ENVELOPE:
                self._resetTransaction()
            self.reply(refusal)
            return
        answer = self._transaction.chunkEnded(size, last)
        if last:
            self._answer(answer, self._messageAnswered)
        elif isinstance(answer, SMTPReply) and answer.isError:
            # RFC 3030 2: a failed chunk fails the transaction; the chunks
            # already pipelined after it are read and refused (503).
            self._resetTransaction()
            self.reply(answer)
        else:
            self._answer(answer, self.reply)

    def _messageData(self, data: bytes) -> bytes | None:
        transaction = self._transaction
        rest = transaction.feed(data)
        if rest is None:
            backlog = transaction.backlog()
            if backlog is not None:
                self.wait(backlog, lambda _: None)  # a slow milter: read on once it caught up
            return None
        self.rawSink = None
        self._answer(transaction.finish(), self._messageAnswered)
        return rest

    def _messageAnswered(self, reply: SMTPReply) -> None:
        if reply.code == 250:
            self._junk = 0  # a message queued: the session does work
        if self._metrics is not None:
            transaction = self._transaction
            if reply.code == 250:
                self._metrics.messageAccepted(transaction.size, transaction.commitSeconds)
            else:
                self._metrics.messageRefused(reply.code)
        self._resetTransaction()
        self.reply(reply)

    _commands: dict[str, Callable[[SubmissionServer, str], None]] = {}


def _drop(data: bytes, last: bool) -> None:
    """The bytes of a refused chunk."""


class _Chunk:
    """
    The raw sink that reads one BDAT chunk: exactly ``size`` bytes to
    ``consume`` (``last`` with its final bytes when the chunk is LAST),
    then ``read``; ``behind`` after each read that leaves bytes to come
    (it may hold further reading back).
    """

    def __init__(
        self,
        size: int,
        consume: Callable[[bytes, bool], None],
        last: bool,
        read: Callable[[], None],
        behind: Callable[[], None],
    ) -> None:
        self._left, self._consume, self._last = size, consume, last
        self._read, self._behind = read, behind

    def __call__(self, data: bytes) -> bytes | None:
        take = data[: self._left]
        self._left -= len(take)
        self._consume(take, self._last and not self._left)
        if self._left:
            self._behind()
            return None
        self._read()
        return data[len(take) :]


SubmissionServer._commands = {
    name[3:]: method
    for name, method in vars(SubmissionServer).items()
    if name.startswith("do_") and callable(method)
}
