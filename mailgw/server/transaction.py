"""
The mail transaction phase (RFC 5321 3.3): MAIL, RCPT and DATA, the
message writer, the message check and the commit, and the one mapping from
their errors to replies.

The writer has one owner at a time. L{Transaction} owns it from DATA until
the commit starts: whatever ends the transaction before that (an error in
the data, a refusal by the policy, RSET, a close, a hang-up while the
policy is still checking) aborts it through L{Transaction.abandon}. From
then on the commit owns it: the commit's own callback aborts it when the
commit fails, and a commit that succeeded has handed the message to the
queue. The session only sends the reply the transaction's Deferred gives.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailgw import replies
from mailgw.address import AddressError, ParameterError, parsePath, splitPathAndParameters
from mailgw.dsnparams import RecipientDSN
from mailgw.envelope import Address, BodyType, Envelope, Session
from mailgw.interfaces import IEditableWriter, IMessageWriter, IMilterSession
from mailgw.queue.spool import SpoolError, SpoolFullError
from mailgw.replies import SMTPReply
from mailgw.server.data import BinaryReader, DataReader
from mailgw.server.extensions import MAIL_PARAMETERS, MailOptions, recipientDSN
from mailgw.server.headers import HeaderHold, messageId, missingFields
from mailgw.server.received import receivedHeader
from mailgw.server.settings import Listener

Answer = SMTPReply | Deferred[SMTPReply]


class Stage(enum.Enum):
    ENVELOPE = "envelope"  # before DATA
    DATA = "data"  # reading the message
    CHECKING = "checking"  # the policy's checkMessage runs
    COMMITTING = "committing"  # the commit runs: it owns the writer
    DONE = "done"  # answered; a new transaction follows
    ABANDONED = "abandoned"  # ended before its commit


class _NoSender:
    """No MAIL yet (``<>`` is a sender: L{None})."""


NO_SENDER = _NoSender()


def _format(reply: SMTPReply, **fields: str) -> SMTPReply:
    return reply.withText(reply.text.format(**fields))


class Transaction:
    """
    One mail transaction. ``session`` gives what the policy and the spool
    see of the client; ``user`` is the login that sends.
    """

    _log = Logger()

    def __init__(
        self,
        listener: Listener,
        session: Callable[[], Session],
        user: str | None,
        milters: IMilterSession | None = None,
        authType: str = "",
    ):
        self._listener = listener
        self._session = session
        self._user = user
        # [milter] servers: asked at each step (None: no milter, nothing asked).
        self._milters, self._authType = milters, authType
        self.stage = Stage.ENVELOPE
        self.sender: Address | None | _NoSender = NO_SENDER
        self.recipients: list[Address] = []
        self._dsn: list[RecipientDSN] = []  # one per recipient (RFC 3461)
        self._options = MailOptions()
        self._esmtp = False
        self._rcptTried = False
        self._body = BodyType.SEVENBIT
        self._smtputf8 = False
        self._declaredSize: int | None = None
        self._writer: IMessageWriter | None = None
        self._reader: DataReader | BinaryReader | None = None
        self._hold: HeaderHold | None = None
        self._envelope: Envelope | None = None
        #: The message's size and the seconds its commit took, once queued.
        self.size, self.commitSeconds = 0, 0.0
        #: The message's Message-ID (printable, bounded), once the data ended.
        self.messageId = ""
        #: The message comes in BDAT chunks (RFC 3030), not after DATA.
        self.chunked = False

    @property
    def started(self) -> bool:
        """MAIL was accepted."""
        return self.sender is not NO_SENDER

    def abandon(self) -> None:
        """End the transaction without a commit; a commit already running goes on."""
        if self.stage in (Stage.COMMITTING, Stage.DONE, Stage.ABANDONED):
            return
        self.stage = Stage.ABANDONED
        self._reader = None
        self._dropWriter()
        if self._milters is not None and self.started:
            self._milters.abort()

    def _dropWriter(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.abort()

    # -- MAIL ----------------------------------------------------------------

    def mail(self, argument: str, esmtp: bool) -> Answer:
        if self.started:
            return replies.NESTED_MAIL
        quota = self._listener.guards.quota
        if quota is not None and self._user is not None:
            refusal = quota.checkMessage(self._user)
            if refusal is not None:
                return refusal
        if argument[:5].upper() != "FROM:":
            return replies.SYNTAX
        try:
            pathText, parameters = splitPathAndParameters(argument[5:].lstrip(" "))
        except AddressError:
            return replies.BAD_SENDER
        except ParameterError:
            return replies.SYNTAX
        body, smtputf8, size = BodyType.SEVENBIT, False, None
        options = MailOptions()
        for name, value in parameters.items():
            if not esmtp:
                return _format(replies.UNKNOWN_PARAMETER, name=name)
            if name == "SIZE":
                if value is None or not value.isdigit() or len(value) > 20:
                    return _format(replies.BAD_PARAMETER, name=name)
                size = int(value)
                if size > self._listener.settings.maxMessageSize:
                    return replies.TOO_BIG
            elif name == "BODY":
                allowed: tuple[str, ...] = ("7BIT", "8BITMIME", "BINARYMIME")
                if not self._listener.settings.binaryMime:
                    allowed = allowed[:2]
                if value is None or value.upper() not in allowed:
                    return _format(replies.BAD_PARAMETER, name=name)
                body = BodyType(value.upper())
            elif name == "SMTPUTF8" and value is None:
                smtputf8 = True
            elif name == "AUTH" and value is not None:
                pass  # RFC 4954 5: optional; we trust only our own AUTH.
            elif name in MAIL_PARAMETERS:
                refusal = options.take(name, value, self._session().tlsProtocol is not None)
                if refusal is not None:
                    return refusal
            else:
                return _format(replies.UNKNOWN_PARAMETER, name=name)
        try:
            sender = parsePath(pathText, utf8=smtputf8, allowNull=True)
        except AddressError:
            needUTF8 = not smtputf8 and not pathText.isascii()
            return replies.NEED_SMTPUTF8 if needUTF8 else replies.BAD_SENDER

        def accepted(refusal: SMTPReply | None) -> SMTPReply:
            if refusal is not None:
                return refusal
            self.sender = sender
            self._body, self._smtputf8, self._declaredSize = body, smtputf8, size
            self._options, self._esmtp = options, esmtp
            return replies.SENDER_OK

        def checked(outcome: Any) -> Answer:
            refusal = self._policyReply(outcome)
            if refusal is not None or self._milters is None:
                return accepted(refusal)
            d = self._milters.mail(self._session(), sender, self._authType)
            return d.addCallback(accepted)

        policy = self._listener.policy
        return maybeDeferred(policy.checkSender, self._session(), sender).addBoth(checked)

    # -- RCPT ----------------------------------------------------------------

    def rcpt(self, argument: str) -> Answer:
        sender = self.sender
        if isinstance(sender, _NoSender):
            return replies.NEED_MAIL
        if self.stage is not Stage.ENVELOPE:
            return replies.IN_TRANSACTION
        if argument[:3].upper() != "TO:":
            return replies.SYNTAX
        self._rcptTried = True
        try:
            pathText, parameters = splitPathAndParameters(argument[3:].lstrip(" "))
        except AddressError:
            return replies.BAD_RECIPIENT
        except ParameterError:
            return replies.SYNTAX
        if parameters and not self._esmtp:
            return _format(replies.UNKNOWN_PARAMETER, name=next(iter(parameters)))
        dsn = recipientDSN(parameters)
        if isinstance(dsn, SMTPReply):
            return dsn
        try:
            recipient = parsePath(pathText, utf8=self._smtputf8)
        except AddressError:
            needUTF8 = not self._smtputf8 and not pathText.isascii()
            return replies.NEED_SMTPUTF8 if needUTF8 else replies.BAD_RECIPIENT
        assert recipient is not None
        if len(self.recipients) >= self._listener.settings.maxRecipients:
            # RFC 5321 4.5.3.1.10: 452, and the client sends the rest later.
            return replies.TOO_MANY_RECIPIENTS
        quota = self._listener.guards.quota
        if quota is not None and self._user is not None:
            refusal = quota.checkRecipient(self._user, len(self.recipients))
            if refusal is not None:
                return refusal

        def accepted(refusal: SMTPReply | None) -> SMTPReply:
            if refusal is not None:
                return refusal
            if recipient not in self.recipients:
                self.recipients.append(recipient)
                self._dsn.append(dsn)
            return replies.RECIPIENT_OK

        def checked(outcome: Any) -> Answer:
            refusal = self._policyReply(outcome)
            if refusal is not None or self._milters is None:
                return accepted(refusal)
            return self._milters.rcpt(recipient).addCallback(accepted)

        policy = self._listener.policy
        d = maybeDeferred(policy.checkRecipient, self._session(), sender, recipient)
        return d.addBoth(checked)

    # -- DATA ----------------------------------------------------------------

    def data(self, argument: str) -> Answer:
        """DATA: 354 and the message is read (L{feed}), or an error."""
        if argument:
            return replies.SYNTAX
        if self.stage is Stage.DATA:
            # RFC 3030 3: DATA after BDAT fails the transaction.
            self.abandon()
            return replies.DATA_AFTER_BDAT
        if self._body is BodyType.BINARYMIME:
            return replies.BINARYMIME_NEEDS_BDAT  # RFC 3030 3
        return self._begin()

    def chunk(self) -> SMTPReply | None | Deferred[SMTPReply | None]:
        """
        A BDAT command (RFC 3030) whose size parsed: None when its chunk
        is read into the message (L{feedChunk}, then L{chunkEnded}), or
        the error to answer once the chunk has been read and dropped; a
        Deferred of either while the milters look at the new message.
        """
        if self.stage is Stage.ENVELOPE:
            answer = self._begin()
            if isinstance(answer, Deferred):
                return answer.addCallback(self._chunking)
            return self._chunking(answer)
        if self.stage is Stage.DATA and self.chunked:
            return None
        return replies.NEED_MAIL

    def _chunking(self, answer: SMTPReply) -> SMTPReply | None:
        """The message begun (354 for DATA): read it in chunks; or the error."""
        if answer.code != 354:
            return answer
        assert self._reader is not None
        self._reader.stuffed = False
        self.chunked = True
        return None

    def feedChunk(self, data: bytes, last: bool) -> None:
        """Bytes of the current chunk; ``last`` with the last of a LAST chunk."""
        assert self._reader is not None
        self._reader.feedChunk(data, last)

    def chunkEnded(self, size: int, last: bool) -> Answer:
        """
        A chunk was read: 250 for a chunk that does not end the message,
        the outcome of L{finish} for the last one, an error at once (the
        transaction then fails: RFC 3030 2).
        """
        reader = self._reader
        assert reader is not None
        if last:
            return self.finish()
        if reader.error is not None:
            self.abandon()
            return reader.error
        return _format(replies.CHUNK_OK, size=str(size))

    def _begin(self) -> Answer:
        """Start the message: the writer, the trace header, the reader: 354; or the error."""
        sender = self.sender
        if self.stage is not Stage.ENVELOPE:
            return replies.NEED_MAIL
        if isinstance(sender, _NoSender):
            return replies.NEED_MAIL
        if not self.recipients:
            return replies.NO_VALID_RECIPIENTS if self._rcptTried else replies.NEED_RCPT
        envelope = Envelope(
            sender=sender,
            recipients=tuple(self.recipients),
            body=self._body,
            smtputf8=self._smtputf8,
            declaredSize=self._declaredSize,
            ret=self._options.ret,
            envid=self._options.envid,
            requireTLS=self._options.requireTLS,
            dsn=self._dsn,
        )
        session, settings = self._session(), self._listener.settings
        try:
            writer = self._listener.spool.begin(envelope, session)
        except Exception as e:
            self.stage = Stage.DONE
            return self._spoolReply(Failure(e))
        self._writer = writer
        try:
            received = receivedHeader(
                session,
                envelope,
                settings.hostname,
                writer.queueId,
                self._listener.clock.seconds(),
                settings.receivedClientAddress,
            )
            writer.write(received)
        except Exception as e:
            self.abandon()
            return self._spoolReply(Failure(e))
        # RFC 6409 8.2, 8.3: Date: and Message-ID: when the client left them out.
        clock, hostname, queueId = self._listener.clock, settings.hostname, writer.queueId
        self._hold = HeaderHold(
            prefix=b"",
            extra=lambda headers: missingFields(headers, queueId, hostname, clock.seconds()),
            limit=settings.maxHeaderSize,
        )
        self._reader = DataReader(
            sink=self._write,
            maxSize=settings.maxMessageSize,
            maxLineLength=settings.maxLineLength,
            maxHeaderSize=settings.maxHeaderSize,
            maxReceived=settings.maxReceivedHeaders,
            acceptBareLF=settings.acceptBareLF and self._user is not None,
        )
        if self._body is BodyType.BINARYMIME:
            self._reader = BinaryReader(
                sink=self._write,
                maxSize=settings.maxMessageSize,
                maxHeaderSize=settings.maxHeaderSize,
                maxReceived=settings.maxReceivedHeaders,
            )
        self._envelope = envelope
        if self._milters is not None:
            # The milters see the message as the spool stores it, trace header first.
            d = self._milters.data(writer.queueId, settings.maxHeaderSize * 2)
            self._milters.feed(received)
            return d.addCallback(self._dataChecked)
        self.stage = Stage.DATA
        return replies.START_DATA

    def _dataChecked(self, refusal: SMTPReply | None) -> SMTPReply:
        if self.stage is not Stage.ENVELOPE or self._writer is None:
            return replies.LOCAL_ERROR  # abandoned meanwhile
        if refusal is not None:
            self.abandon()
            return refusal
        self.stage = Stage.DATA
        return replies.START_DATA

    def _write(self, data: bytes) -> None:
        assert self._hold is not None
        self._writeOut(self._hold.feed(data))

    def _writeOut(self, data: bytes) -> None:
        assert self._writer is not None and self._reader is not None
        if not data:
            return
        if self._milters is not None:
            self._milters.feed(data)
        try:
            self._writer.write(data)
        except Exception as e:
            self._reader.error = self._spoolReply(Failure(e))

    def feed(self, data: bytes) -> bytes | None:
        """Message bytes; once the data ends, the bytes after it (see L{finish})."""
        assert isinstance(self._reader, DataReader)  # DATA: never BINARYMIME
        return self._reader.feed(data)

    def backlog(self) -> Deferred[None] | None:
        """A Deferred to wait for before reading more of the message (slow milters), or None."""
        return self._milters.backlog() if self._milters is not None else None

    def finish(self) -> Answer:
        """
        The data has ended: check the message, then commit it. The answer
        is the reply to send (250 with the queue id once the commit fired).
        """
        reader, envelope, hold = self._reader, self._envelope, self._hold
        assert reader is not None and envelope is not None and hold is not None
        if reader.error is None:
            self._writeOut(hold.finish())  # a message of headers only
        self._reader = None
        self.messageId = messageId(hold.added + (hold.headers or b""))
        if reader.error is not None:
            self.abandon()
            return reader.error
        self.stage = Stage.CHECKING
        policy = self._listener.policy
        d = maybeDeferred(policy.checkMessage, self._session(), envelope, bytes(reader.headers))
        return d.addBoth(self._checked, envelope, reader.size)

    def _checked(self, outcome: Any, envelope: Envelope, size: int) -> Answer:
        if self.stage is not Stage.CHECKING:
            # Abandoned while the policy checked (the client left, the
            # session closed): the writer is aborted, nothing is committed.
            if isinstance(outcome, Failure):
                self._log.failure("Message check failed", outcome)
            return replies.LOCAL_ERROR
        refusal = self._policyReply(outcome)
        if refusal is not None:
            self.abandon()
            return refusal
        if self._milters is not None:
            d = self._milters.endOfMessage()
            return d.addCallback(self._milterVerdict, envelope, size)
        return self._commit(envelope, size)

    def _milterVerdict(self, verdict: Any, envelope: Envelope, size: int) -> Answer:
        """What the milters made of the message: refuse, discard, or commit it changed."""
        writer = self._writer
        if self.stage is not Stage.CHECKING or writer is None:
            return replies.LOCAL_ERROR  # abandoned while the milters decided
        queueId = writer.queueId
        if verdict.reply is None and not verdict.discard and verdict.recipients == ():
            verdict = attrs.evolve(verdict, discard=True)  # every recipient deleted
        if verdict.reply is not None or verdict.discard:
            self.abandon()
            what = "discarded" if verdict.discard else f"refused ({verdict.reply.code})"
            self._log.info(
                "milter {by} {what} {queueId} from=<{sender}> user={user!r}",
                by=verdict.by or "-",
                what=what,
                queueId=queueId,
                sender=str(envelope.sender or ""),
                user=self._user,
            )
            return verdict.reply or _format(replies.QUEUED, queueId=queueId)
        edits, recipients, hold = verdict.edits, verdict.recipients, verdict.holdReason
        if edits or recipients is not None or hold is not None:
            if not IEditableWriter.providedBy(writer):
                self._log.error("Milter changes, but the spool cannot apply them")
                self.abandon()
                return replies.LOCAL_ERROR
            writer.amend(edits.rewrite if edits else None, recipients, hold)
            if recipients is not None:
                envelope = attrs.evolve(envelope, recipients=recipients)
            if hold is not None:
                self._log.info(
                    "milter {by} quarantined {queueId}: {reason}",
                    by=verdict.by, queueId=queueId, reason=hold,
                )  # fmt: skip
        return self._commit(envelope, size)

    def _commit(self, envelope: Envelope, size: int) -> Answer:
        writer, self._writer = self._writer, None
        assert writer is not None
        self.stage = Stage.COMMITTING
        self.size, began = size, self._listener.clock.seconds()
        d = maybeDeferred(writer.commit)
        d.addBoth(self._timed, began)
        return d.addBoth(self._committed, writer, envelope, size)

    def _timed(self, result: Any, began: float) -> Any:
        self.commitSeconds = self._listener.clock.seconds() - began
        return result

    def _committed(
        self, result: Any, writer: IMessageWriter, envelope: Envelope, size: int
    ) -> SMTPReply:
        self.stage = Stage.DONE
        if isinstance(result, Failure):
            writer.abort()
            return self._spoolReply(result)
        queueId = str(result)
        quota = self._listener.guards.quota
        if quota is not None and self._user is not None:
            quota.record(self._user, len(envelope.recipients))
        recipients = [str(r) for r in envelope.recipients]
        session = self._session()
        self._log.info(
            "queued {queueId} from=<{sender}> to=<{to}> rcpts={count} size={size} "
            "msgid={messageId} user={user!r} client={client}",
            queueId=queueId,
            sender=str(envelope.sender or ""),
            to=">,<".join(recipients),
            recipients=recipients,
            count=len(recipients),
            size=size,
            messageId=self.messageId or "none",
            user=self._user,
            client=session.clientAddress,
            # For `mailgw explain`: what decided, linked to the session's lines.
            session=session.sessionId,
            listener=session.listener,
            tls=f"{session.tlsProtocol}/{session.tlsCipher}" if session.tlsProtocol else "none",
            policy=type(self._listener.policy).__name__,
            quota=quota.usage(self._user) if quota is not None and self._user else None,
        )
        return _format(replies.QUEUED, queueId=queueId)

    # -- errors → replies ------------------------------------------------------

    def _policyReply(self, outcome: Any) -> SMTPReply | None:
        """A policy check's outcome: None to go on, or the reply that refuses."""
        if isinstance(outcome, Failure):
            self._log.failure("Policy check failed", outcome)
            return replies.POLICY_ERROR
        if isinstance(outcome, SMTPReply):
            return outcome
        return None

    def _spoolReply(self, failure: Failure) -> SMTPReply:
        """
        A spool failure: 452 when the disk is full, else 451 (a bug in the
        spool too); the text is logged only, never sent.
        """
        if failure.check(SpoolFullError):
            self._log.error("Spool full: {error}", error=failure.value)
            return replies.DISK_FULL
        if failure.check(SpoolError):
            self._log.error("Spool failed: {error}", error=failure.value)
        else:
            self._log.failure("Spool commit failed", failure)
        return replies.LOCAL_ERROR
