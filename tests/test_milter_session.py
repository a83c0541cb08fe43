"""
The milters in the SMTP session (in memory): each step, each action, the
macros, the negotiated steps, and what a milter that is down, slow or
hostile makes of the session (its default action; never a hang, never a
lost message).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailgw.envelope import Address
from mailgw.interfaces import IEditableWriter, IMilterChain, IMilterSession
from mailgw.milter import codec
from tests.fakemilter import FakeMilter, fakeChain, header, response, text
from tests.helpers import Harness

MESSAGE = b"From: alice@example.com\r\nSubject: hello\r\n\r\nbody line\r\n"


def withMilters(*milters: FakeMilter) -> Harness:
    h = Harness()
    h.factory.milters = fakeChain(h.clock, *milters)
    h.connect()
    return h


def send(
    h: Harness, message: bytes = MESSAGE, rcpts: tuple[bytes, ...] = (b"bob@example.org",)
) -> bytes:
    h.login()
    h.command(b"MAIL FROM:<alice@example.com>")
    for rcpt in rcpts:
        h.command(b"RCPT TO:<" + rcpt + b">")
    data = h.command(b"DATA")
    if not data.startswith(b"354"):
        return data
    h.send(message + b".\r\n")
    return h.take()


def committed(h: Harness) -> bytes:
    [(_, data)] = h.spool.committed.values()
    return data


class InterfaceTests(SynchronousTestCase):
    def test_provides(self) -> None:
        h = Harness()
        chain = fakeChain(h.clock, FakeMilter())
        self.assertTrue(verifyObject(IMilterChain, chain))
        self.assertTrue(verifyObject(IMilterSession, chain.open()))
        writer = h.spool.begin(*_envelopeAndSession())
        self.assertTrue(verifyObject(IEditableWriter, writer))


def _envelopeAndSession() -> tuple:  # type: ignore[type-arg]
    from mailgw.envelope import Envelope, Session

    return Envelope(None, (Address("b", "example.org"),)), Session("192.0.2.1")


class StepTests(SynchronousTestCase):
    """Each SMTP step reaches the milter, and its refusal is that command's reply."""

    def test_everyStepInOrder(self) -> None:
        milter = FakeMilter()
        h = withMilters(milter)
        self.assertIn(b"250 2.0.0 Ok: queued as", send(h))
        codes = [c for c, _ in milter.commands if c != codec.MACRO]
        # EHLO twice: before and after STARTTLS.
        self.assertEqual(
            codes,
            [codec.OPTNEG, codec.CONNECT, codec.HELO, codec.HELO, codec.MAIL,
             codec.RCPT, codec.DATA] + [codec.HEADER] * 5 + [codec.EOH, codec.BODY,
             codec.BODYEOB],
        )  # fmt: skip
        headers = [body.split(b"\0")[0] for body in milter.sent(codec.HEADER)]
        # Our Received: first, then the Date: and Message-ID: we add, then the client's.
        self.assertEqual(headers, [b"Received", b"Date", b"Message-ID", b"From", b"Subject"])
        self.assertEqual(milter.sent(codec.BODY), [b"body line\r\n"])
        self.assertEqual(milter.sent(codec.MAIL), [b"<alice@example.com>\0"])
        self.assertEqual(milter.sent(codec.RCPT), [b"<bob@example.org>\0"])
        self.assertEqual(milter.sent(codec.CONNECT), [b"unknown\x004\x9c\x40192.0.2.7\0"])

    def test_macros(self) -> None:
        milter = FakeMilter()
        h = withMilters(milter)
        send(h)
        queueId = next(iter(h.spool.committed))
        self.assertEqual(
            milter.macros[codec.CONNECT],
            {"j": "mx.test", "{daemon_name}": "submission", "{client_addr}": "192.0.2.7",
             "{client_port}": "40000", "{client_name}": "unknown"},
        )  # fmt: skip
        self.assertEqual(
            milter.macros[codec.MAIL],
            {"{auth_authen}": "alice@example.com", "{auth_type}": "PLAIN",
             "{mail_addr}": "alice@example.com"},
        )  # fmt: skip
        self.assertEqual(milter.macros[codec.RCPT], {"{rcpt_addr}": "bob@example.org"})
        self.assertEqual(milter.macros[codec.DATA], {"i": queueId})
        self.assertEqual(milter.macros[codec.BODYEOB], {"i": queueId})
        self.assertEqual(milter.macros[codec.HELO]["{tls_version}"], "TLSv1.3")

    def test_rejectAtConnect(self) -> None:
        h = withMilters(FakeMilter(replies={codec.CONNECT: [response(codec.REJECT)]}))
        self.assertEqual(h.greeting, b"554 5.7.1 Connection rejected\r\n")
        self.assertTrue(h.closing)

    def test_rejectAtHelo(self) -> None:
        h = withMilters(FakeMilter(replies={codec.HELO: [response(codec.REJECT)]}))
        self.assertEqual(h.command(b"EHLO client.test"), b"550 5.7.1 Command rejected\r\n")
        self.assertTrue(h.command(b"MAIL FROM:<a@b.c>").startswith(b"503"))

    def test_rejectAtMailWithOwnReply(self) -> None:
        reply = text(codec.REPLYCODE, b"553 5.7.1 Sender not welcome")
        h = withMilters(FakeMilter(replies={codec.MAIL: [reply]}))
        h.login()
        self.assertEqual(h.command(b"MAIL FROM:<a@b.c>"), b"553 5.7.1 Sender not welcome\r\n")
        self.assertTrue(h.command(b"RCPT TO:<b@c.d>").startswith(b"503"))

    def test_tempfailAtRcpt(self) -> None:
        milter = FakeMilter(
            replies={codec.RCPT: [response(codec.TEMPFAIL), response(codec.CONTINUE)]}
        )
        h = withMilters(milter)
        h.login()
        h.command(b"MAIL FROM:<a@b.c>")
        self.assertEqual(
            h.command(b"RCPT TO:<x@c.d>"), b"451 4.7.1 Service unavailable - try again later\r\n"
        )
        self.assertEqual(h.command(b"RCPT TO:<y@c.d>"), b"250 2.1.5 Ok\r\n")
        self.assertTrue(h.command(b"DATA").startswith(b"354"))
        h.send(MESSAGE + b".\r\n")
        h.take()
        [(message, _)] = h.spool.committed.values()
        self.assertEqual([str(r) for r in message.envelope.recipients], ["y@c.d"])

    def test_rejectAtData(self) -> None:
        h = withMilters(FakeMilter(replies={codec.DATA: [response(codec.REJECT)]}))
        self.assertEqual(send(h), b"550 5.7.1 Command rejected\r\n")
        self.assertEqual(h.spool.aborted, list(h.spool.aborted))
        self.assertEqual(h.spool.committed, {})
        self.assertEqual(h.spool.writers[0].state, "aborted")

    def test_rejectAtHeaderAnswersTheDot(self) -> None:
        milter = FakeMilter(replies={codec.HEADER: [response(codec.CONTINUE)] * 3 + [
            text(codec.REPLYCODE, b"554 5.7.1 No such From")]})  # fmt: skip
        h = withMilters(milter)
        self.assertEqual(send(h), b"554 5.7.1 No such From\r\n")
        self.assertEqual(h.spool.committed, {})
        # Nothing more of the message was sent to the milter after its refusal.
        self.assertEqual(milter.sent(codec.BODY), [])
        self.assertEqual(milter.sent(codec.BODYEOB), [])

    def test_rejectAtEndOfMessage(self) -> None:
        h = withMilters(FakeMilter(replies={codec.BODYEOB: [response(codec.REJECT)]}))
        self.assertEqual(send(h), b"550 5.7.1 Command rejected\r\n")
        self.assertEqual(h.spool.committed, {})

    def test_tempfailAtEndOfMessage(self) -> None:
        h = withMilters(FakeMilter(replies={codec.BODYEOB: [response(codec.TEMPFAIL)]}))
        self.assertEqual(send(h), b"451 4.7.1 Service unavailable - try again later\r\n")
        self.assertEqual(h.spool.committed, {})

    def test_acceptAtMailLeavesTheMilterOutOfTheMessage(self) -> None:
        milter = FakeMilter(replies={codec.MAIL: [response(codec.ACCEPT)]})
        h = withMilters(milter)
        self.assertIn(b"250 2.0.0 Ok: queued", send(h))
        self.assertEqual(milter.sent(codec.RCPT), [])
        self.assertEqual(milter.sent(codec.BODYEOB), [])

    def test_rsetAbortsTheMilterTransaction(self) -> None:
        milter = FakeMilter()
        h = withMilters(milter)
        h.login()
        h.command(b"MAIL FROM:<a@b.c>")
        h.command(b"RSET")
        self.assertEqual(milter.commands[-1][0], codec.ABORT)

    def test_quitClosesTheMilter(self) -> None:
        milter = FakeMilter()
        h = withMilters(milter)
        h.command(b"QUIT")
        h.hangUp()
        self.assertEqual(milter.commands[-1][0], codec.QUIT)


class NegotiatedStepTests(SynchronousTestCase):
    """The steps a milter asked to leave out, or not to wait for."""

    def test_noHeadersNoBody(self) -> None:
        milter = FakeMilter(steps=codec.NOHDRS | codec.NOBODY | codec.NOEOH | codec.NORCPT)
        h = withMilters(milter)
        self.assertIn(b"250 2.0.0 Ok: queued", send(h))
        self.assertEqual(milter.sent(codec.HEADER), [])
        self.assertEqual(milter.sent(codec.BODY), [])
        self.assertEqual(milter.sent(codec.EOH), [])
        self.assertEqual(milter.sent(codec.RCPT), [])
        self.assertEqual(len(milter.sent(codec.BODYEOB)), 1)

    def test_noReplySteps(self) -> None:
        # The milter never answers headers (NR_HDR): were we to wait, it would time out.
        milter = FakeMilter(steps=codec.NR_HDR | codec.NR_BODY, hang={codec.HEADER, codec.BODY})
        h = withMilters(milter)
        self.assertIn(b"250 2.0.0 Ok: queued", send(h))
        self.assertEqual(len(milter.sent(codec.HEADER)), 5)

    def test_leadingSpace(self) -> None:
        milter = FakeMilter(steps=codec.HDR_LEADSPC)
        h = withMilters(milter)
        send(h)
        self.assertIn(b"Subject\0 hello\0", milter.sent(codec.HEADER))
        plain = FakeMilter()
        send(withMilters(plain))
        self.assertIn(b"Subject\0hello\0", plain.sent(codec.HEADER))

    def test_skipBody(self) -> None:
        body = (b"x" * 998 + b"\r\n") * 70
        milter = FakeMilter(steps=codec.SKIP_OK, replies={codec.BODY: [response(codec.SKIP)]})
        h = withMilters(milter)
        self.assertIn(b"250 2.0.0 Ok: queued", send(h, b"Subject: s\r\n\r\n" + body))
        self.assertEqual(len(milter.sent(codec.BODY)), 1)  # two chunks, the second skipped


class ActionTests(SynchronousTestCase):
    """What a milter may change at the end of message, applied before the 250."""

    def eom(self, *packets: bytes, actions: int = codec.OFFERED_ACTIONS) -> Harness:
        milter = FakeMilter(
            actions=actions, replies={codec.BODYEOB: [b"".join(packets) + response(codec.CONTINUE)]}
        )
        h = withMilters(milter)
        self.reply = send(h)
        return h

    def test_addHeader(self) -> None:
        h = self.eom(header(codec.ADDHEADER, b"X-Spam", b"no\n\tfolded"))
        self.assertIn(b"250 2.0.0 Ok: queued", self.reply)
        data = committed(h)
        self.assertIn(b"Subject: hello\r\nX-Spam: no\r\n\tfolded\r\n\r\nbody line\r\n", data)

    def test_insertHeaderAtTop(self) -> None:
        h = self.eom(header(codec.INSHEADER, b"DKIM-Signature", b"v=1; b=x", index=0))
        self.assertTrue(committed(h).startswith(b"DKIM-Signature: v=1; b=x\r\nReceived: "))

    def test_changeAndDeleteHeader(self) -> None:
        h = self.eom(
            header(codec.CHGHEADER, b"Subject", b"[SPAM] hello", index=1),
            header(codec.CHGHEADER, b"From", b"", index=1),
        )
        data = committed(h)
        self.assertIn(b"\r\nSubject: [SPAM] hello\r\n", data)
        self.assertNotIn(b"From:", data)

    def test_replaceBody(self) -> None:
        h = self.eom(response(codec.REPLBODY, b"new\nbody"), response(codec.REPLBODY, b"\r\n"))
        data = committed(h)
        self.assertTrue(data.endswith(b"Subject: hello\r\n\r\nnew\r\nbody\r\n"), data)
        [(message, _)] = h.spool.committed.values()
        self.assertEqual(message.size, len(data))

    def test_addAndDeleteRecipients(self) -> None:
        h = self.eom(
            text(codec.ADDRCPT, b"<archive@example.org>"),
            text(codec.DELRCPT, b"<BOB@example.org>"),
        )
        [(message, _)] = h.spool.committed.values()
        self.assertEqual([str(r) for r in message.envelope.recipients], ["archive@example.org"])

    def test_deletingEveryRecipientDiscards(self) -> None:
        h = self.eom(text(codec.DELRCPT, b"bob@example.org"))
        self.assertIn(b"250 2.0.0 Ok: queued as", self.reply)
        self.assertEqual(h.spool.committed, {})

    def test_quarantine(self) -> None:
        h = self.eom(text(codec.QUARANTINE, b"looks like spam\r\n"))
        [(message, _)] = h.spool.committed.values()
        self.assertTrue(message.held)
        self.assertEqual(message.holdReason, "looks like spam??")

    def test_discard(self) -> None:
        milter = FakeMilter(replies={codec.BODYEOB: [response(codec.DISCARD)]})
        h = withMilters(milter)
        self.assertIn(b"250 2.0.0 Ok: queued as", send(h))
        self.assertEqual(h.spool.committed, {})
        self.assertEqual(h.spool.writers[0].state, "aborted")

    def test_discardAtRcpt(self) -> None:
        h = withMilters(FakeMilter(replies={codec.RCPT: [response(codec.DISCARD)]}))
        self.assertIn(b"250 2.0.0 Ok: queued as", send(h))
        self.assertEqual(h.spool.committed, {})

    def test_progressKeepsTheDeadline(self) -> None:
        milter = FakeMilter(hang={codec.BODYEOB})
        h = withMilters(milter)
        h.login()
        h.command(b"MAIL FROM:<a@b.c>")
        h.command(b"RCPT TO:<b@c.d>")
        h.command(b"DATA")
        h.send(MESSAGE + b".\r\n")
        for _ in range(2):
            h.clock.advance(100)
            milter.clients[-1].dataReceived(response(codec.PROGRESS))
        milter.clients[-1].dataReceived(response(codec.CONTINUE))
        self.assertIn(b"250 2.0.0 Ok: queued", h.take())

    def test_changesNotNegotiatedAreRefused(self) -> None:
        h = self.eom(header(codec.ADDHEADER, b"X-A", b"b"), actions=codec.QUARANTINE_ACTION)
        # The milter broke the protocol: its default action (tempfail).
        self.assertEqual(self.reply, b"451 4.7.1 Service unavailable - try again later\r\n")
        self.assertEqual(h.spool.committed, {})

    def test_twoMilterChanges(self) -> None:
        first = FakeMilter(
            replies={
                codec.BODYEOB: [
                    header(codec.ADDHEADER, b"X-First", b"1") + response(codec.CONTINUE)
                ]
            }
        )
        second = FakeMilter(replies={codec.BODYEOB: [
            header(codec.ADDHEADER, b"X-Second", b"2") + response(codec.ACCEPT)]})  # fmt: skip
        h = withMilters(first, second)
        send(h)
        self.assertIn(b"X-First: 1\r\nX-Second: 2\r\n", committed(h))

    def test_firstRefusalWins(self) -> None:
        first = FakeMilter(replies={codec.BODYEOB: [response(codec.REJECT)]})
        second = FakeMilter()
        h = withMilters(first, second)
        self.assertEqual(send(h), b"550 5.7.1 Command rejected\r\n")
        self.assertEqual(second.sent(codec.BODYEOB), [])


class HostileMilterTests(SynchronousTestCase):
    """A milter's bytes are not trusted: bad ones get the default action, never a crash."""

    def test_injectedHeaderLinesAreFolded(self) -> None:
        milter = FakeMilter(replies={codec.BODYEOB: [header(
            codec.ADDHEADER, b"X-A", b"a\r\n\r\nInjected: yes\r\nBcc: x@evil") +
            response(codec.CONTINUE)]})  # fmt: skip
        h = withMilters(milter)
        send(h)
        self.assertIn(b"X-A: a\r\n\tInjected: yes\r\n\tBcc: x@evil\r\n\r\nbody", committed(h))

    def test_badHeaderName(self) -> None:
        milter = FakeMilter(
            replies={
                codec.BODYEOB: [
                    header(codec.ADDHEADER, b"Bad Name:", b"x") + response(codec.CONTINUE)
                ]
            }
        )
        h = withMilters(milter)
        self.assertTrue(send(h).startswith(b"451 4.7.1"))

    def test_replyCodeOutsideItsClass(self) -> None:
        for code in (b"250 2.0.0 fine", b"354 go on", b"999 x", b"hello"):
            milter = FakeMilter(replies={codec.MAIL: [text(codec.REPLYCODE, code)]})
            h = withMilters(milter)
            h.login()
            self.assertEqual(
                h.command(b"MAIL FROM:<a@b.c>"), b"550 5.7.1 Command rejected\r\n", code
            )

    def test_replyCodeCannotInjectLines(self) -> None:
        reply = text(codec.REPLYCODE, b"550 5.7.1 no\r\n250 2.0.0 Ok: queued as X")
        h = withMilters(FakeMilter(replies={codec.MAIL: [reply]}))
        h.login()
        self.assertEqual(h.command(b"MAIL FROM:<a@b.c>"), b"550 5.7.1 no\r\n")

    def test_replyCodeEnhancedClassMismatch(self) -> None:
        reply = text(codec.REPLYCODE, b"450 5.7.1 confused")
        h = withMilters(FakeMilter(replies={codec.MAIL: [reply]}))
        h.login()
        self.assertEqual(
            h.command(b"MAIL FROM:<a@b.c>"), b"451 4.7.1 Service unavailable - try again later\r\n"
        )

    def test_garbage(self) -> None:
        for raw in (
            b"\x00\x00\x00\x00",  # length 0
            b"\xff\xff\xff\xffc",  # far too long
            b"\x00\x00\x00\x01Z",  # unknown response
            b"\x00\x00\x00\x02O\x00",  # short negotiation
            b"\x00\x00\x00\x01c",  # an answer to a question not asked
        ):
            milter = FakeMilter(raw=raw)
            h = withMilters(milter)
            self.assertTrue(h.greeting.startswith(b"220 "), raw)
            h.login()
            self.assertEqual(
                h.command(b"MAIL FROM:<a@b.c>"),
                b"451 4.7.1 Service unavailable - try again later\r\n",
                raw,
            )
            self.assertTrue(milter.transports[0].aborted, raw)

    def test_unexpectedChangeBeforeEndOfMessage(self) -> None:
        reply = header(codec.ADDHEADER, b"X", b"y") + response(codec.CONTINUE)
        h = withMilters(FakeMilter(replies={codec.RCPT: [reply]}))
        h.login()
        h.command(b"MAIL FROM:<a@b.c>")
        self.assertTrue(h.command(b"RCPT TO:<b@c.d>").startswith(b"451 4.7.1"))

    def test_hugeReplacedBody(self) -> None:
        h = Harness(maxMessageSize=100)
        milter = FakeMilter(
            replies={
                codec.BODYEOB: [response(codec.REPLBODY, b"x" * 101) + response(codec.CONTINUE)]
            }
        )
        h.factory.milters = fakeChain(h.clock, milter)
        h.factory.milters.maxMessageSize = 100
        h.connect()
        self.assertTrue(send(h, b"S: x\r\n\r\ny\r\n").startswith(b"451 4.7.1"))
        self.assertEqual(h.spool.committed, {})


class DefaultActionTests(SynchronousTestCase):
    """A milter that is down or too slow: its default_action, never a hang."""

    def test_downTempfail(self) -> None:
        h = withMilters(FakeMilter(down=True))
        self.assertTrue(h.greeting.startswith(b"220 "))
        h.login()
        self.assertEqual(
            h.command(b"MAIL FROM:<a@b.c>"), b"451 4.7.1 Service unavailable - try again later\r\n"
        )

    def test_downReject(self) -> None:
        h = withMilters(FakeMilter(down=True, defaultAction="reject"))
        h.login()
        self.assertEqual(h.command(b"MAIL FROM:<a@b.c>"), b"550 5.7.1 Command rejected\r\n")

    def test_downAccept(self) -> None:
        h = withMilters(FakeMilter(down=True, defaultAction="accept"))
        self.assertIn(b"250 2.0.0 Ok: queued", send(h))
        self.assertEqual(len(h.spool.committed), 1)

    def test_timeoutAtMail(self) -> None:
        milter = FakeMilter(hang={codec.MAIL})
        h = withMilters(milter)
        h.login()
        self.assertEqual(h.command(b"MAIL FROM:<a@b.c>"), b"")
        h.clock.advance(29)
        self.assertEqual(h.take(), b"")
        h.clock.advance(1)
        self.assertEqual(h.take(), b"451 4.7.1 Service unavailable - try again later\r\n")
        self.assertTrue(milter.transports[0].aborted)

    def test_timeoutAtEndOfMessageAccept(self) -> None:
        milter = FakeMilter(hang={codec.BODYEOB}, defaultAction="accept")
        h = withMilters(milter)
        h.login()
        h.command(b"MAIL FROM:<a@b.c>")
        h.command(b"RCPT TO:<b@c.d>")
        h.command(b"DATA")
        h.send(MESSAGE + b".\r\n")
        self.assertEqual(h.take(), b"")
        h.clock.advance(119)
        self.assertEqual(h.take(), b"")
        h.clock.advance(1)
        self.assertIn(b"250 2.0.0 Ok: queued", h.take())
        self.assertEqual(len(h.spool.committed), 1)

    def test_timeoutDuringHeaders(self) -> None:
        milter = FakeMilter(hang={codec.HEADER})
        h = withMilters(milter)
        h.login()
        h.command(b"MAIL FROM:<a@b.c>")
        h.command(b"RCPT TO:<b@c.d>")
        h.command(b"DATA")
        h.send(MESSAGE + b".\r\n")
        self.assertEqual(h.take(), b"")
        h.clock.advance(120)
        self.assertEqual(h.take(), b"451 4.7.1 Service unavailable - try again later\r\n")
        self.assertEqual(h.spool.committed, {})

    def test_negotiationTimeout(self) -> None:
        milter = FakeMilter(raw=b"")
        h = Harness(preAuthTimeout=100)
        h.factory.milters = fakeChain(h.clock, milter)
        h.connect()
        self.assertEqual(h.greeting, b"")
        h.clock.advance(29)
        self.assertEqual(h.take(), b"")
        h.clock.advance(1)
        self.assertTrue(h.take().startswith(b"220 "))

    def test_clientLeavesWhileMilterDecides(self) -> None:
        milter = FakeMilter(hang={codec.BODYEOB})
        h = withMilters(milter)
        h.login()
        h.command(b"MAIL FROM:<a@b.c>")
        h.command(b"RCPT TO:<b@c.d>")
        h.command(b"DATA")
        h.send(MESSAGE + b".\r\n")
        h.hangUp()
        self.assertEqual(h.spool.writers[0].state, "aborted")
        milter.clients[-1].dataReceived(response(codec.CONTINUE))
        self.assertEqual(h.spool.committed, {})


class NoMilterTests(SynchronousTestCase):
    def test_nothingAskedWithoutMilters(self) -> None:
        h = Harness()
        self.assertIsNone(h.factory.milters)
        self.assertIn(b"250 2.0.0 Ok: queued", send(h))


class AbandonedMessageTests(SynchronousTestCase):
    """A message refused while a milter still reads it: ABORT after its answer, then MAIL."""

    def test_tooBigWhileTheMilterReadsTheBody(self) -> None:
        milter = FakeMilter(hang={codec.BODY})
        h = Harness(maxMessageSize=200)
        h.factory.milters = fakeChain(h.clock, milter)
        h.connect()
        h.login()
        h.command(b"MAIL FROM:<alice@example.com>")
        h.command(b"RCPT TO:<bob@example.org>")
        h.command(b"DATA")
        h.send(b"Subject: s\r\n\r\nfirst\r\n")
        self.assertEqual(milter.sent(codec.BODY), [b"first\r\n"])  # unanswered
        h.send(b"x" * 300 + b"\r\n.\r\n")
        reply = h.take()
        self.assertTrue(reply.startswith(b"552"), reply)
        client = milter.clients[-1]
        self.assertEqual(h.command(b"MAIL FROM:<a@b.c>"), b"")  # waits for the milter
        client.dataReceived(response(codec.REJECT))  # its stale answer to the body chunk
        self.assertEqual(h.take(), b"250 2.1.0 Ok\r\n")
        codes = [c for c, _ in milter.commands if c != codec.MACRO]
        self.assertEqual(codes[-3:], [codec.BODY, codec.ABORT, codec.MAIL])
        # The stale REJECT did not stick to the next message.
        milter.hang.clear()
        h.command(b"RCPT TO:<b@c.d>")
        h.command(b"DATA")
        h.send(MESSAGE + b".\r\n")
        self.assertIn(b"250 2.0.0 Ok: queued", h.take())


class ClientLeavesDuringConnectTests(SynchronousTestCase):
    def test_milterConnectionClosedWhenItCompletes(self) -> None:
        from twisted.internet.defer import Deferred

        milter = FakeMilter()
        h = Harness()
        chain = fakeChain(h.clock, milter)
        pending: list[Deferred[object]] = []

        def slowConnect(server: object) -> Deferred[object]:
            d: Deferred[object] = Deferred()
            pending.append(d)
            return d

        realConnect, chain.connect = chain.connect, slowConnect  # type: ignore[assignment]
        h.factory.milters = chain
        h.connect()
        h.hangUp()
        assert realConnect is not None
        realConnect(chain.servers[0]).addCallback(pending[0].callback)
        self.assertEqual(milter.commands[-1][0], codec.QUIT)
        self.assertNotIn(codec.CONNECT, [c for c, _ in milter.commands])


class SlowMilterBackPressureTests(SynchronousTestCase):
    def test_readingStopsWhileTheMilterIsBehind(self) -> None:
        from mailgw.milter.chain import MAX_QUEUED

        milter = FakeMilter(hang={codec.BODY})
        h = withMilters(milter)
        h.login()
        h.command(b"MAIL FROM:<a@b.c>")
        h.command(b"RCPT TO:<b@c.d>")
        h.command(b"DATA")
        h.send(b"Subject: big\r\n\r\n")
        line = b"y" * 998 + b"\r\n"
        for _ in range(3000):  # 3 MB, as fast as the client can
            h.send(line * 1)
        link = h.protocol._milters._links[0]  # type: ignore[union-attr]
        self.assertLessEqual(link.queuedBytes, MAX_QUEUED + 70000)
        self.assertEqual(h.transport.producerState, "paused")
        milter.hang.clear()
        milter.clients[-1].dataReceived(response(codec.CONTINUE))
        h.send(b".\r\n")
        self.assertIn(b"250 2.0.0 Ok: queued", h.take())
        [(message, data)] = h.spool.committed.values()
        self.assertTrue(data.endswith(line * 3000))
        self.assertEqual(b"".join(milter.sent(codec.BODY)), line * 3000)


def sendChunked(h: Harness, message: bytes = MESSAGE) -> bytes:
    """The message in two pipelined BDAT chunks (RFC 3030), in one write."""
    h.login()
    h.command(b"MAIL FROM:<alice@example.com>")
    h.command(b"RCPT TO:<bob@example.org>")
    first, rest = message[:20], message[20:]
    h.send(b"BDAT %d\r\n" % len(first) + first + b"BDAT %d LAST\r\n" % len(rest) + rest)
    return h.take()


class ChunkingTests(SynchronousTestCase):
    """BDAT goes through the milters as DATA does."""

    def test_chunkedMessageReachesTheMilter(self) -> None:
        milter = FakeMilter(
            replies={codec.BODYEOB: [header(codec.ADDHEADER, b"X-Seen", b"yes")
                                     + response(codec.CONTINUE)]}
        )  # fmt: skip
        h = withMilters(milter)
        self.assertRegex(
            sendChunked(h), rb"^250 2\.0\.0 20 octets received\r\n250 2\.0\.0 Ok: queued as "
        )
        self.assertIn(b"Subject: hello\r\nX-Seen: yes\r\n\r\nbody line\r\n", committed(h))
        self.assertEqual(b"".join(milter.sent(codec.BODY)), b"body line\r\n")

    def test_refusedAtDataDropsTheChunks(self) -> None:
        """A milter's refusal of the new message answers the first chunk; none is a command."""
        h = withMilters(FakeMilter(replies={codec.DATA: [response(codec.REJECT)]}))
        reply = sendChunked(h, b"QUIT\r\n" * 4 + b"RSET\r\n")
        self.assertEqual(reply, b"550 5.7.1 Command rejected\r\n503 5.5.1 Send MAIL first\r\n")
        self.assertEqual(h.spool.committed, {})
        self.assertFalse(h.closing)

    def test_rejectAtEndOfMessage(self) -> None:
        h = withMilters(FakeMilter(replies={codec.BODYEOB: [response(codec.REJECT)]}))
        self.assertEqual(
            sendChunked(h), b"250 2.0.0 20 octets received\r\n550 5.7.1 Command rejected\r\n"
        )
        self.assertEqual(h.spool.committed, {})
