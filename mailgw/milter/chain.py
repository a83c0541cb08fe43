"""
The milters of ``[milter] servers`` applied to one SMTP session in order,
as Postfix applies ``smtpd_milters``: connect, HELO, MAIL, RCPT, DATA, the
header fields, end of headers, the body, end of message.

Each step asks each milter in turn and stops at the first that refuses:
its reply (its own REPLYCODE when sane) answers that SMTP command. A
milter that is down, too slow or broken gets its ``default_action``:
``tempfail`` and ``reject`` answer this command and every later one of the
session with 451 4.7.1 / 550 5.7.1, ``accept`` leaves the milter out for
the rest of the session. No step waits longer than the milter's deadline.

The message (our Received: header, the Date:/Message-ID: we add, then the
client's bytes: exactly what is written to the spool) is sent to each
milter as it arrives, one command in flight per milter; the end of message
is asked of each milter in order once all have read the message, and their
changes are collected into one L{MessageVerdict}.

Macros: ``j``, ``{daemon_name}``, ``{client_addr}``, ``{client_port}``,
``{client_name}`` with the connection; ``{tls_version}``, ``{cipher}`` with
HELO; ``{auth_authen}``, ``{auth_type}``, ``{mail_addr}`` with MAIL;
``{rcpt_addr}`` with RCPT; ``i`` (the queue id, which exists from DATA on)
with DATA, end of headers and end of message.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.endpoints import clientFromString
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw import replies
from mailgw.envelope import Address, Session
from mailgw.interfaces import IMilterChain, IMilterSession
from mailgw.milter import codec
from mailgw.milter.client import MilterClient, Negotiated, connectMilter
from mailgw.milter.edits import Field, fieldForMilter
from mailgw.milter.link import Link, decision, fallback
from mailgw.milter.message import EndOfMessage
from mailgw.milter.settings import MilterServer
from mailgw.milter.stream import HeaderSplitter
from mailgw.milter.verdict import REJECT, MessageVerdict
from mailgw.replies import SMTPReply

_log = Logger(namespace="mailgw.milter")

Step = Deferred[SMTPReply | None]

#: Message octets queued for one milter before the session stops reading
#: the client until that milter has caught up (memory stays bounded).
MAX_QUEUED = 1024 * 1024


@implementer(IMilterChain)
@attrs.define(eq=False)
class MilterChain:
    """The configured milters; L{open} starts one session's use of them."""

    servers: tuple[MilterServer, ...]
    reactor: Any
    hostname: str
    maxMessageSize: int = 36700160
    maxRecipients: int = 1000
    connect: Callable[[MilterServer], Deferred[tuple[MilterClient, Negotiated]]] | None = None

    def _connect(self, server: MilterServer) -> Deferred[tuple[MilterClient, Negotiated]]:
        if self.connect is not None:
            return self.connect(server)
        endpoint = clientFromString(self.reactor, server.endpoint)
        return connectMilter(endpoint, self.reactor, server.connectTimeout, server.commandTimeout)

    def open(self) -> MilterSession:
        return MilterSession(self, [Link(server) for server in self.servers])


@implementer(IMilterSession)
class MilterSession:
    """See L{IMilterSession}."""

    def __init__(self, chain: MilterChain, links: list[Link]) -> None:
        self._chain, self._links = chain, links
        self._splitter: HeaderSplitter | None = None
        self._queueId = ""
        self._recipients: list[Address] = []
        self._discarded = self._discardAll = False
        self._closed = False

    # -- the session's steps ------------------------------------------------

    def connect(self, session: Session) -> Step:
        macros = {
            "j": self._chain.hostname,
            "{daemon_name}": session.listener,
            "{client_addr}": session.clientAddress,
            "{client_port}": "" if session.clientPort is None else str(session.clientPort),
            "{client_name}": "unknown",
        }
        packet = codec.connect("unknown", session.clientAddress, session.clientPort)
        return self._each(self._connectOne, macros, packet)

    def _connectOne(self, link: Link, macros: dict[str, str], packet: bytes) -> Step:
        d = self._chain._connect(link.server)

        def connected(result: tuple[MilterClient, Negotiated]) -> Step | None:
            link.client, link.options = result
            result[0].maxCollected = self._chain.maxMessageSize + 16 * 1024 * 1024
            if self._closed:  # the client left while we connected
                result[0].quit()
                return None
            return self._ask(link, codec.CONNECT, macros, packet, codec.NOCONNECT, codec.NR_CONN)

        def failed(failure: Failure) -> SMTPReply | None:
            fallback(link, failure.getErrorMessage())
            return None  # the greeting goes out; MAIL gets the default action's reply

        return d.addCallbacks(connected, failed)

    def helo(self, session: Session) -> Step:
        macros = {"{tls_version}": session.tlsProtocol or "", "{cipher}": session.tlsCipher or ""}
        packet = codec.strings(codec.HELO, session.helo)
        return self._all(codec.HELO, macros, packet, codec.NOHELO, codec.NR_HELO)

    def mail(self, session: Session, sender: Address | None, authType: str) -> Step:
        self.abort()
        self._discarded = self._discardAll
        for link in self._links:
            link.messageOff, link.skipBody, link.outcome = False, False, None
            link.inMessage = link.usable
        path = f"<{sender or ''}>"
        macros = {
            "{auth_authen}": session.user or "",
            "{auth_type}": authType if session.user else "",
            "{mail_addr}": str(sender or ""),
        }
        return self._all(codec.MAIL, macros, codec.strings(codec.MAIL, path), codec.NOMAIL,
                         codec.NR_MAIL)  # fmt: skip

    def rcpt(self, recipient: Address) -> Step:
        macros = {"{rcpt_addr}": str(recipient)}
        packet = codec.strings(codec.RCPT, f"<{recipient}>")
        d = self._all(codec.RCPT, macros, packet, codec.NORCPT, codec.NR_RCPT)

        def added(reply: SMTPReply | None) -> SMTPReply | None:
            if reply is None and recipient not in self._recipients:
                self._recipients.append(recipient)
            return reply

        return d.addCallback(added)

    def data(self, queueId: str, headerLimit: int) -> Step:
        self._queueId = queueId
        self._splitter = HeaderSplitter(limit=headerLimit)
        return self._all(codec.DATA, {"i": queueId}, codec.packet(codec.DATA), codec.NODATA,
                         codec.NR_DATA)  # fmt: skip

    # -- the message --------------------------------------------------------

    def feed(self, data: bytes) -> None:
        splitter = self._splitter
        if splitter is None:
            return
        fields, body = splitter.feed(data)
        if fields is not None:
            self._headers(fields)
        if body:
            self._body(body)

    def _headers(self, fields: list[Field]) -> None:
        for link in self._content():
            if not link.has(codec.NOHDRS):
                for field in fields:
                    name, value = fieldForMilter(field, link.has(codec.HDR_LEADSPC))
                    self._enqueue(link, codec.header(name, value), not link.has(codec.NR_HDR))
            if not link.has(codec.NOEOH):
                packet = codec.macros(codec.EOH, {"i": self._queueId})
                packet += codec.packet(codec.EOH)
                self._enqueue(link, packet, not link.has(codec.NR_EOH))

    def _body(self, data: bytes) -> None:
        for link in self._content():
            if link.has(codec.NOBODY) or link.skipBody:
                continue
            for start in range(0, len(data), codec.CHUNK):
                if link.skipBody or link.outcome is not None or not link.usable:
                    break  # its answer to an earlier chunk came already
                packet = codec.packet(codec.BODY, data[start : start + codec.CHUNK])
                self._enqueue(link, packet, not link.has(codec.NR_BODY))

    def _content(self) -> list[Link]:
        return [
            link
            for link in self._links
            if link.usable and link.inMessage and not link.messageOff and link.outcome is None
        ]

    def _enqueue(self, link: Link, packet: bytes, reply: bool) -> None:
        link.queue.append((packet, reply))
        link.queuedBytes += len(packet)
        if not link.busy:
            self._pump(link)

    def _pump(self, link: Link) -> None:
        """
        Send what is queued, one command in flight; a loop, not a recursion,
        however many answers come back before ``ask`` returns.
        """
        if link.pumping:
            return  # an answer within ask(): the loop below goes on
        link.pumping = True
        try:
            while link.queue and not link.busy and self._wanted(link):
                packet, reply = link.queue.popleft()
                link.queuedBytes -= len(packet)
                client = link.client
                assert client is not None
                if not reply:
                    client.send(packet)
                    continue
                link.busy = True
                d = client.ask(packet, link.server.contentTimeout)
                d.addCallbacks(
                    self._contentAnswered,
                    self._contentFailed,
                    callbackArgs=(link,),
                    errbackArgs=(link,),
                )
        finally:
            link.pumping = False
        if not link.busy:
            self._idle(link)

    @staticmethod
    def _wanted(link: Link) -> bool:
        return link.usable and link.outcome is None and not link.messageOff

    def _idle(self, link: Link) -> None:
        """Nothing in flight: drop what is no longer wanted, then wake the waiters."""
        if link.queue and self._wanted(link):
            return
        link.queue.clear()
        link.queuedBytes = 0
        if link.aborting:
            link.aborting = False
            if link.usable and link.client is not None:
                link.client.send(codec.packet(codec.ABORT))
        waiters, link.drained = link.drained, []
        for waiter in waiters:
            waiter.callback(None)

    def _contentAnswered(self, responses: list[codec.Response], link: Link) -> None:
        link.busy = False
        final = responses[-1]
        if link.aborting:
            pass  # an answer about a message that is gone
        elif len(responses) > 1:
            fallback(link, "changes before end of message")
        elif final.code == codec.SKIP and link.has(codec.SKIP_OK):
            link.skipBody = True
            link.queue = deque(p for p in link.queue if p[0][4:5] != codec.BODY)
            link.queuedBytes = sum(len(p[0]) for p in link.queue)
        elif final.code == codec.ACCEPT:
            link.messageOff = True
        elif final.code != codec.CONTINUE:
            link.outcome = decision(final, REJECT)
        self._pump(link)

    def _contentFailed(self, failure: Failure, link: Link) -> None:
        link.busy = False
        fallback(link, failure.getErrorMessage())
        self._pump(link)

    def backlog(self) -> Deferred[None] | None:
        late = [link for link in self._links if link.queuedBytes > MAX_QUEUED]
        if not late:
            return None
        return gatherResults([self._drained(link) for link in late]).addCallback(lambda _: None)

    def _drained(self, link: Link) -> Deferred[None]:
        if not link.busy:
            return succeed(None)
        d: Deferred[None] = Deferred()
        link.drained.append(d)
        return d

    def endOfMessage(self) -> Deferred[MessageVerdict]:
        splitter = self._splitter
        if splitter is not None:
            fields, _ = splitter.finish()
            if fields is not None:
                self._headers(fields)
        self._splitter = None
        end = EndOfMessage(self, self._links, list(self._recipients))
        return end.run()

    def abort(self) -> None:
        """The transaction ended before its end of message: SMFIC_ABORT where one began."""
        self._splitter = None
        self._recipients = []
        for link in self._links:
            if link.busy:
                link.aborting = True  # ABORT once the command in flight is answered
            elif link.inMessage and link.client is not None:
                link.client.send(codec.packet(codec.ABORT))
            link.inMessage = False
            link.queue.clear()
            link.queuedBytes = 0

    def close(self) -> None:
        self._closed = True
        for link in self._links:
            if link.client is not None:
                if link.busy:
                    link.client.abortConnection()
                else:
                    link.client.quit()

    # -- asking every milter in turn -------------------------------------------

    def _all(self, place: bytes, macros: dict[str, str], packet: bytes, no: int, nr: int) -> Step:
        return self._each(lambda link, m, p: self._ask(link, place, m, p, no, nr), macros, packet)

    def _each(
        self, one: Callable[[Link, dict[str, str], bytes], Step], macros: dict[str, str],
        packet: bytes,
    ) -> Step:  # fmt: skip
        links = iter(self._links)

        def next_(reply: SMTPReply | None) -> Step | SMTPReply | None:
            if reply is not None:
                return reply
            for link in links:
                return one(link, macros, packet).addCallback(next_)
            return None

        return succeed(None).addCallback(next_)

    def _ask(
        self, link: Link, place: bytes, macros: dict[str, str], packet: bytes, no: int, nr: int
    ) -> Step:
        if link.busy:
            # The end of an abandoned message is still being read: after it.
            d = self._drained(link)
            return d.addCallback(lambda _: self._ask(link, place, macros, packet, no, nr))
        if link.stuck is not None:
            return succeed(_stuck(link, place))
        inMessage = place in (codec.RCPT, codec.DATA)
        if not link.usable or link.has(no) or (inMessage and link.messageOff):
            return succeed(None)
        client = link.client
        assert client is not None
        client.send(codec.macros(place, macros))
        if link.has(nr):
            client.send(packet)
            return succeed(None)
        timeout = link.server.commandTimeout

        def answered(responses: list[codec.Response]) -> SMTPReply | None:
            final = responses[-1]
            if len(responses) > 1:
                fallback(link, "changes before end of message")
                return _stuck(link, place)
            if final.code == codec.ACCEPT:
                if place in (codec.CONNECT, codec.HELO):
                    link.off = True
                elif place != codec.RCPT:
                    link.messageOff = True
                return None
            if final.code in (codec.CONTINUE, codec.SKIP):
                return None
            if final.code == codec.DISCARD:
                if place in (codec.CONNECT, codec.HELO):
                    self._discardAll = True  # every message of the session
                self._discarded = True
                return None
            refusal = replies.MILTER_REJECT_CONNECT if place == codec.CONNECT else REJECT
            return decision(final, refusal)[1]

        def failed(failure: Failure) -> SMTPReply | None:
            fallback(link, failure.getErrorMessage())
            return _stuck(link, place)

        return client.ask(packet, timeout).addCallbacks(answered, failed)

    @property
    def discarded(self) -> bool:
        """A milter said DISCARD before the end of message."""
        return self._discarded


def _stuck(link: Link, place: bytes) -> SMTPReply | None:
    """
    The default action's reply for a command at ``place``: none at connect
    and HELO (Postfix too greets and answers EHLO, so the client can log in
    and gets the 4xx/5xx at MAIL, where it knows to retry or bounce).
    """
    return None if place in (codec.CONNECT, codec.HELO) else link.stuck


def makeMilters(
    servers: tuple[MilterServer, ...], reactor: Any, settings: Any
) -> MilterChain | None:
    """The chain for ``[milter] servers`` (None when there is none: nothing is asked)."""
    if not servers:
        return None
    return MilterChain(
        servers,
        reactor,
        settings.hostname,
        maxMessageSize=settings.maxMessageSize,
        maxRecipients=max(settings.maxRecipients, 1000),
    )


__all__ = ["MilterChain", "MilterSession", "makeMilters"]
