"""
In-memory tests of the submission server protocol: every reply, pipelining,
STARTTLS, AUTH, DATA and the attack classes that target them.
"""

from __future__ import annotations

import base64
import hmac
from collections.abc import Callable
from pathlib import Path

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.internet.defer import Deferred, fail
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from mailgw.envelope import Address, BodyType
from mailgw.queue.spool import SpoolError, SpoolFullError
from mailgw.replies import SMTPReply
from tests.helpers import PASSWORD, USER, Harness, runDialog

DIALOGS = Path(__file__).parent / "dialogs"


def plain(user: bytes = USER, password: bytes = PASSWORD, authzid: bytes = b"") -> bytes:
    return base64.b64encode(authzid + b"\0" + user + b"\0" + password)


class DialogTests(SynchronousTestCase):
    """
    The transcripts in tests/dialogs/, each against a fresh server built
    from its ``@`` lines: one test per file (``test_<file name>``).
    """

    def test_corpusSize(self) -> None:
        self.assertGreaterEqual(len(list(DIALOGS.glob("*.txt"))), 40)


def _dialogTest(path: Path) -> Callable[[DialogTests], None]:
    def test(self: DialogTests) -> None:
        runDialog(self, path)

    test.__doc__ = path.read_text().splitlines()[0].lstrip("# ")
    return test


for _path in sorted(DIALOGS.glob("*.txt")):
    setattr(DialogTests, "test_" + _path.stem.replace("-", "_"), _dialogTest(_path))


class GreetingAndEHLOTests(SynchronousTestCase):
    def test_greetingHasNoEnhancedCode(self) -> None:
        self.assertEqual(Harness().greeting, b"220 mx.test ESMTP mailgw\r\n")

    def test_implicitTLSOffersAuthNotSTARTTLS(self) -> None:
        h = Harness(implicitTLS=True)
        reply = h.command(b"EHLO c")
        self.assertIn(b"AUTH PLAIN LOGIN CRAM-MD5", reply)
        self.assertNotIn(b"STARTTLS", reply)
        self.assertTrue(h.command(b"STARTTLS").startswith(b"503 5.5.1"))

    def test_noAuthBeforeTLS(self) -> None:
        reply = Harness().command(b"EHLO c")
        self.assertIn(b"STARTTLS", reply)
        self.assertNotIn(b"AUTH", reply)

    def test_legacyAuthLine(self) -> None:
        reply = Harness(implicitTLS=True, legacyAuthLine=True).command(b"EHLO c")
        self.assertIn(b"250-AUTH PLAIN LOGIN CRAM-MD5\r\n", reply)
        self.assertIn(b"AUTH=PLAIN LOGIN CRAM-MD5\r\n", reply)

    def test_cramMD5OnlyWhenCheckable(self) -> None:
        @implementer(ICredentialsChecker)
        class PlainOnly:
            credentialInterfaces = (IUsernamePassword,)

            def requestAvatarId(self, credentials: object) -> Deferred[bytes]:
                return fail(Exception())

        reply = Harness(implicitTLS=True, checkers=[PlainOnly()]).command(b"EHLO c")
        self.assertIn(b"250 AUTH PLAIN LOGIN\r\n", reply)

    def test_ehloNeedsArgument(self) -> None:
        self.assertTrue(Harness().command(b"EHLO").startswith(b"501 5.5.4"))

    def test_heloThenAuthNeedsEHLO(self) -> None:
        h = Harness(implicitTLS=True)
        self.assertEqual(h.command(b"HELO c"), b"250 mx.test\r\n")
        self.assertTrue(h.command(b"AUTH PLAIN " + plain()).startswith(b"503 5.5.1"))

    def test_lowercaseCommands(self) -> None:
        h = Harness(implicitTLS=True)
        h.command(b"ehlo c")
        self.assertTrue(h.command(b"auth plain " + plain()).startswith(b"235"))


class STARTTLSTests(SynchronousTestCase):
    def test_injectionDiscarded(self) -> None:
        """
        Commands pipelined after STARTTLS were sent in the clear: they are
        dropped, never run inside TLS (CVE-2011-0411 class).
        """
        h = Harness()
        h.command(b"EHLO c")
        h.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<evil@example.com>\r\n")
        self.assertEqual(h.take(), b"220 2.0.0 Ready to start TLS\r\n")
        self.assertTrue(h.transport.tlsStarted)
        self.assertEqual(h.transport.writtenBeforeTLS, b"220 2.0.0 Ready to start TLS\r\n")
        # Nothing more was answered, and the session starts over.
        self.assertTrue(h.command(b"MAIL FROM:<a@b.c>").startswith(b"503 5.5.1 Send EHLO"))

    def test_stateForgottenAfterSTARTTLS(self) -> None:
        h = Harness()
        h.command(b"EHLO c")
        h.command(b"STARTTLS")
        self.assertTrue(h.command(b"AUTH PLAIN " + plain()).startswith(b"503 5.5.1 Send EHLO"))

    def test_notDuringTransaction(self) -> None:
        h = Harness()
        h.login()
        h.command(b"MAIL FROM:<a@b.c>")
        self.assertTrue(h.command(b"STARTTLS").startswith(b"503 5.5.1"))

    def test_noTLSContext(self) -> None:
        h = Harness(tls=False)
        self.assertNotIn(b"STARTTLS", h.command(b"EHLO c"))
        self.assertTrue(h.command(b"STARTTLS").startswith(b"502 5.5.1"))


class AuthTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(implicitTLS=True)
        self.h.command(b"EHLO c")

    def test_plainTwoStep(self) -> None:
        self.assertEqual(self.h.command(b"AUTH PLAIN"), b"334 \r\n")
        self.assertTrue(self.h.command(plain()).startswith(b"235 2.7.0"))

    def test_plainAuthzidRefused(self) -> None:
        reply = self.h.command(b"AUTH PLAIN " + plain(authzid=b"bob@example.com"))
        self.assertTrue(reply.startswith(b"535 5.7.8"))

    def test_plainSameAuthzidAccepted(self) -> None:
        self.assertTrue(self.h.command(b"AUTH PLAIN " + plain(authzid=USER)).startswith(b"235"))

    def test_plainFourthField(self) -> None:
        token = base64.b64encode(b"\0" + USER + b"\0" + PASSWORD + b"\0extra")
        self.assertTrue(self.h.command(b"AUTH PLAIN " + token).startswith(b"501 5.5.2"))

    def test_emptyCredentials(self) -> None:
        self.assertTrue(self.h.command(b"AUTH PLAIN " + plain(b"", b"")).startswith(b"535 5.7.8"))
        self.assertTrue(self.h.command(b"AUTH PLAIN =").startswith(b"501 5.5.2"))

    def test_unknownUserSameAsWrongPassword(self) -> None:
        wrong = self.h.command(b"AUTH PLAIN " + plain(password=b"nope"))
        unknown = self.h.command(b"AUTH PLAIN " + plain(user=b"mallory@example.com"))
        self.assertEqual(wrong, unknown)
        self.assertEqual(wrong, b"535 5.7.8 Authentication credentials invalid\r\n")

    def test_cramMD5(self) -> None:
        reply = self.h.command(b"AUTH CRAM-MD5")
        self.assertTrue(reply.startswith(b"334 "))
        challenge = base64.b64decode(reply[4:].strip())
        self.assertRegex(challenge, rb"^<[0-9a-f]+\.\d+@mx\.test>$")
        digest = hmac.new(PASSWORD, challenge, "md5").hexdigest().encode()
        answer = base64.b64encode(USER + b" " + digest)
        self.assertTrue(self.h.command(answer).startswith(b"235 2.7.0"))

    def test_cramMD5WrongDigest(self) -> None:
        self.h.command(b"AUTH CRAM-MD5")
        answer = base64.b64encode(USER + b" " + b"0" * 32)
        self.assertTrue(self.h.command(answer).startswith(b"535 5.7.8"))

    def test_cramMD5NoInitialResponse(self) -> None:
        self.assertTrue(self.h.command(b"AUTH CRAM-MD5 Zm9v").startswith(b"501 5.5.2"))

    def test_backendFailureIs454(self) -> None:
        @implementer(ICredentialsChecker)
        class Broken:
            credentialInterfaces = (IUsernamePassword,)

            def requestAvatarId(self, credentials: object) -> Deferred[bytes]:
                return fail(OSError("database down"))

        h = Harness(implicitTLS=True, checkers=[Broken()])
        h.command(b"EHLO c")
        reply = h.command(b"AUTH PLAIN " + plain())
        self.assertEqual(reply, b"454 4.7.0 Temporary authentication failure\r\n")
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_hugeResponseRefused(self) -> None:
        self.h.command(b"AUTH LOGIN")
        reply = self.h.command(b"A" * 65536)
        self.assertTrue(reply.startswith(b"500 5.5.6"))
        # The exchange is over: the next line is a command again.
        self.assertEqual(self.h.command(b"NOOP"), b"250 2.0.0 Ok\r\n")

    def test_authDuringTransaction(self) -> None:
        self.h.command(b"AUTH PLAIN " + plain())
        self.h.command(b"MAIL FROM:<a@b.c>")
        self.assertTrue(self.h.command(b"AUTH PLAIN " + plain()).startswith(b"503 5.5.1"))

    def test_pendingLoginHoldsPipelinedCommands(self) -> None:
        """Commands pipelined behind AUTH wait for its answer, in order."""
        d: Deferred[bytes] = Deferred()

        @implementer(ICredentialsChecker)
        class Slow:
            credentialInterfaces = (IUsernamePassword,)

            def requestAvatarId(self, credentials: object) -> Deferred[bytes]:
                return d

        h = Harness(implicitTLS=True, checkers=[Slow()])
        h.command(b"EHLO c")
        h.send(b"AUTH PLAIN " + plain() + b"\r\nMAIL FROM:<a@b.c>\r\nNOOP\r\n")
        self.assertEqual(h.take(), b"")
        d.callback(USER)
        self.assertEqual(
            h.take(),
            b"235 2.7.0 Authentication successful\r\n250 2.1.0 Ok\r\n250 2.0.0 Ok\r\n",
        )


class TransactionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.h.login()

    def submit(self, body: bytes, *recipients: bytes) -> bytes:
        h = self.h
        h.command(b"MAIL FROM:<alice@example.com>")
        for r in recipients or (b"bob@example.org",):
            h.command(b"RCPT TO:<" + r + b">")
        self.assertEqual(h.command(b"DATA"), b"354 End data with <CR><LF>.<CR><LF>\r\n")
        h.send(body)
        return h.take()

    def test_queuedWithEnvelopeAndTrace(self) -> None:
        reply = self.submit(b"Subject: x\r\n\r\nbody\r\n.\r\n", b"bob@example.org", b"c@d.e")
        self.assertRegex(reply, rb"^250 2\.0\.0 Ok: queued as \S+\r\n$")
        [(message, data)] = self.h.spool.committed.values()
        self.assertEqual(message.envelope.sender, Address("alice", "example.com"))
        self.assertEqual(
            message.envelope.recipients, (Address("bob", "example.org"), Address("c", "d.e"))
        )
        self.assertEqual(message.session.user, USER.decode())
        self.assertEqual(message.session.tlsProtocol, "TLSv1.3")
        self.assertEqual(message.session.clientAddress, "192.0.2.7")
        self.assertTrue(data.startswith(b"Received: from client.test ([192.0.2.7])"), data)
        self.assertIn(b"with ESMTPSA", data)
        self.assertIn(message.queueId.encode(), reply)
        self.assertTrue(data.endswith(b"\r\nSubject: x\r\n\r\nbody\r\n"))

    def test_dotUnstuffing(self) -> None:
        self.submit(b"..\r\n...x\r\n.y\r\n.\r\n")
        [(_, data)] = self.h.spool.committed.values()
        self.assertTrue(data.endswith(b"\r\n.\r\n..x\r\ny\r\n"), data)

    def test_bodyType(self) -> None:
        h = self.h
        h.command(b"MAIL FROM:<alice@example.com> BODY=8BITMIME SIZE=10")
        h.command(b"RCPT TO:<b@c.d>")
        h.command(b"DATA")
        h.send("caf\u00e9\r\n.\r\n".encode())
        [(message, data)] = h.spool.committed.values()
        self.assertEqual(message.envelope.body, BodyType.EIGHTBITMIME)
        self.assertEqual(message.envelope.declaredSize, 10)

    def test_noReplyBeforeCommit(self) -> None:
        """No 250 until the spool says the message is on disk."""
        self.h.spool.holdCommits = True
        self.assertEqual(self.submit(b"x\r\n.\r\nNOOP\r\n"), b"")
        self.h.spool.releaseCommits()
        self.assertRegex(self.h.take(), rb"^250 2\.0\.0 Ok: queued as \S+\r\n250 2\.0\.0 Ok\r\n$")

    def test_commitFailure(self) -> None:
        self.h.spool.failNextCommit(SpoolError("disk on fire"))
        self.assertEqual(
            self.submit(b"x\r\n.\r\n"), b"451 4.3.0 Local error in processing; try again later\r\n"
        )
        self.assertEqual(self.h.spool.committed, {})
        self.assertEqual(self.h.command(b"RCPT TO:<b@c.d>")[:3], b"503")

    def test_diskFull(self) -> None:
        self.h.spool.failNextCommit(SpoolFullError("ENOSPC"))
        self.assertTrue(self.submit(b"x\r\n.\r\n").startswith(b"452 4.3.1"))

    def test_tooManyRecipients(self) -> None:
        h = Harness(maxRecipients=2)
        h.login()
        h.command(b"MAIL FROM:<a@b.c>")
        for i in range(2):
            self.assertTrue(h.command(b"RCPT TO:<r%d@b.c>" % i).startswith(b"250"))
        self.assertEqual(h.command(b"RCPT TO:<r9@b.c>"), b"452 4.5.3 Too many recipients\r\n")

    def test_oversizeMessage(self) -> None:
        """Over the limit: 552, never held whole, and the data is read to its end."""
        h = Harness(maxMessageSize=10_000)
        h.login()
        self.h = h
        h.command(b"MAIL FROM:<a@b.c>")
        h.command(b"RCPT TO:<d@e.f>")
        h.command(b"DATA")
        line = b"x" * 998 + b"\r\n"
        for _ in range(50):
            h.send(line)
        self.assertEqual(h.take(), b"")
        h.send(b"MAIL FROM:<smuggled@b.c>\r\n.\r\n")
        self.assertTrue(h.take().startswith(b"552 5.3.4"))
        self.assertEqual(h.spool.committed, {})
        self.assertEqual(len(h.spool.aborted), 1)

    def test_longLinesKeptIntact(self) -> None:
        line = b"y" * 5000
        self.submit(line + b"\r\n.\r\n")
        [(_, data)] = self.h.spool.committed.values()
        self.assertTrue(data.endswith(b"\r\n" + line + b"\r\n"))

    def test_overlongDataLine(self) -> None:
        h = Harness(maxLineLength=1000)
        h.login()
        h.command(b"MAIL FROM:<a@b.c>")
        h.command(b"RCPT TO:<d@e.f>")
        h.command(b"DATA")
        h.send(b"z" * 3000)
        h.send(b"z" * 3000 + b"\r\n.\r\n")
        self.assertEqual(h.take(), b"554 5.6.0 Message has a line longer than 1000 octets\r\n")
        self.assertEqual(h.spool.committed, {})

    def test_pipelinedTransaction(self) -> None:
        """A whole transaction in one write, replies in order."""
        self.h.send(
            b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nRCPT TO:<bad>\r\nDATA\r\n"
            b"hello\r\n.\r\nQUIT\r\n"
        )
        out = self.h.take().split(b"\r\n")
        self.assertEqual(out[0], b"250 2.1.0 Ok")
        self.assertEqual(out[1], b"250 2.1.5 Ok")
        self.assertTrue(out[2].startswith(b"501 5.1.3"))
        self.assertTrue(out[3].startswith(b"354"))
        self.assertTrue(out[4].startswith(b"250 2.0.0 Ok: queued as"))
        self.assertEqual(out[5], b"221 2.0.0 Bye")

    def test_asyncPolicyKeepsOrder(self) -> None:
        pending: list[Deferred[SMTPReply | None]] = []

        class SlowPolicy:
            def checkSender(self, session: object, sender: object) -> Deferred[None]:
                d: Deferred[None] = Deferred()
                pending.append(d)  # type: ignore[arg-type]
                return d

            def checkRecipient(self, session: object, sender: object, rcpt: Address) -> object:
                d: Deferred[SMTPReply | None] = Deferred()
                pending.append(d)
                return d

            def checkMessage(self, session: object, envelope: object, headers: bytes) -> None:
                return None

        self.h.factory.policy = SlowPolicy()
        self.h.send(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nRCPT TO:<g@h.i>\r\n")
        self.assertEqual(len(pending), 1)
        pending[0].callback(None)
        self.assertEqual(len(pending), 2)
        pending[1].callback(SMTPReply(550, "5.7.1", "Not you"))
        pending[2].callback(None)
        self.assertEqual(self.h.take(), b"250 2.1.0 Ok\r\n550 5.7.1 Not you\r\n250 2.1.5 Ok\r\n")

    def test_duplicateRecipientOnce(self) -> None:
        self.submit(b"x\r\n.\r\n", b"d@e.f", b"d@e.f")
        [(message, _)] = self.h.spool.committed.values()
        self.assertEqual(len(message.envelope.recipients), 1)


class SmugglingTests(SynchronousTestCase):
    """
    Only CRLF.CRLF ends the data; messages with bare CR, bare LF or NUL are
    refused whole, so nothing we relay can be read as an end of data.
    """

    VARIANTS = [
        b"\n.\n",
        b"\r.\r",
        b"\r\n.\n",
        b"\n.\r\n",
        b"\r.\r\n",
        b"\r\n.\r",
        b"\r\n\x00.\r\n",
        b"\r\n.\x00\r\n",
    ]

    def attempt(self, separator: bytes, split: int | None = None) -> Harness:
        h = Harness()
        h.login()
        h.command(b"MAIL FROM:<a@b.c>")
        h.command(b"RCPT TO:<d@e.f>")
        h.command(b"DATA")
        payload = (
            b"Subject: one" + separator + b"MAIL FROM:<evil@b.c>\r\nRCPT TO:<victim@x.y>\r\n"
            b"DATA\r\nSubject: two\r\n"
        )
        if split is None:
            h.send(payload)
        else:
            for i in range(0, len(payload), split):
                h.send(payload[i : i + split])
        return h

    def test_variantsNeverEndData(self) -> None:
        for separator in self.VARIANTS:
            for split in (None, 1, 2, 3, 7):
                h = self.attempt(separator, split)
                self.assertEqual(h.take(), b"", (separator, split))
                h.send(b"\r\n.\r\n")
                reply = h.take()
                self.assertTrue(reply.startswith(b"554 5.6.0"), (separator, reply))
                self.assertEqual(h.spool.committed, {})

    def test_endMarkerSplitAcrossWrites(self) -> None:
        for cut in range(1, 5):
            h = Harness()
            h.login()
            h.command(b"MAIL FROM:<a@b.c>")
            h.command(b"RCPT TO:<d@e.f>")
            h.command(b"DATA")
            data = b"line\r\n.\r\n"
            h.send(data[: 4 + cut])
            h.send(data[4 + cut :])
            self.assertTrue(h.take().startswith(b"250 2.0.0"), cut)

    def test_endMarkerAtLongLineBoundary(self) -> None:
        h = Harness(maxLineLength=1000)
        h.login()
        h.command(b"MAIL FROM:<a@b.c>")
        h.command(b"RCPT TO:<d@e.f>")
        h.command(b"DATA")
        h.send(b"q" * 999 + b"\r")
        h.send(b"\n.\r\n")
        self.assertTrue(h.take().startswith(b"250 2.0.0"))


class CommandLineTests(SynchronousTestCase):
    def test_overlongCommand(self) -> None:
        h = Harness()
        h.send(b"NOOP " + b"x" * 20000)
        self.assertTrue(h.take().startswith(b"500 5.5.6"))
        h.send(b"yyy\r\nNOOP\r\n")
        self.assertEqual(h.take(), b"250 2.0.0 Ok\r\n")

    def test_controlCharacters(self) -> None:
        h = Harness()
        for bad in (b"NOOP \x00", b"NO\rOP", b"NOOP \x1b[31m", b"\xff\xfe"):
            self.assertTrue(h.command(bad).startswith(b"500 5.5.2"), bad)

    def test_nonASCIIOutsideAddresses(self) -> None:
        h = Harness()
        self.assertTrue(h.command("EHLO h\u00e9".encode()).startswith(b"500 5.5.2"))

    def test_httpRequest(self) -> None:
        h = Harness()
        h.send(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
        self.assertTrue(h.take().startswith(b"421 4.7.0"))
        self.assertTrue(h.closed)

    def test_tooManyErrors(self) -> None:
        h = Harness(maxErrors=5)
        for _ in range(4):
            h.command(b"BOGUS")
        self.assertFalse(h.closed)
        out = h.command(b"BOGUS")
        self.assertTrue(out.endswith(b"421 4.7.0 Too many errors, closing connection\r\n"))
        self.assertTrue(h.closed)

    def test_bareLFCommands(self) -> None:
        h = Harness()
        h.send(b"NOOP\nNOOP\r\n")
        self.assertEqual(h.take(), b"250 2.0.0 Ok\r\n" * 2)


class TimeoutTests(SynchronousTestCase):
    def test_idleTimeout(self) -> None:
        h = Harness(idleTimeout=60, preAuthTimeout=1000)
        h.clock.advance(59)
        h.command(b"NOOP")
        h.clock.advance(59)
        self.assertFalse(h.closed)
        h.clock.advance(2)
        self.assertEqual(h.take(), b"421 4.4.2 Timeout exceeded, closing connection\r\n")
        self.assertTrue(h.closed)

    def test_connectionLostDuringDataAborts(self) -> None:
        h = Harness()
        h.login()
        h.command(b"MAIL FROM:<a@b.c>")
        h.command(b"RCPT TO:<d@e.f>")
        h.command(b"DATA")
        h.send(b"partial\r\n")
        h.protocol.connectionLost(None)  # type: ignore[arg-type]
        self.assertEqual(len(h.spool.aborted), 1)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_shutdownWaitsForCommit(self) -> None:
        h = Harness()
        h.login()
        h.spool.holdCommits = True
        h.command(b"MAIL FROM:<a@b.c>")
        h.command(b"RCPT TO:<d@e.f>")
        h.command(b"DATA")
        h.send(b"x\r\n.\r\n")
        done = h.factory.shutdown()
        self.assertNoResult(done)
        h.spool.releaseCommits()
        out = h.take()
        self.assertRegex(out, rb"^250 2\.0\.0 Ok: queued as \S+\r\n421 4\.3\.2 ")
        h.protocol.connectionLost(None)  # type: ignore[arg-type]
        self.successResultOf(done)


class MessagePolicyTests(SynchronousTestCase):
    def test_checkMessageSeesHeadersAndCanRefuse(self) -> None:
        seen: list[bytes] = []

        class HeaderPolicy:
            def checkSender(self, session: object, sender: object) -> None:
                return None

            def checkRecipient(self, session: object, sender: object, rcpt: object) -> None:
                return None

            def checkMessage(self, session: object, envelope: object, headers: bytes) -> object:
                seen.append(headers)
                if b"evil" in headers:
                    return SMTPReply(550, "5.7.1", "Header From: not yours")
                return None

        h = Harness()
        h.factory.policy = HeaderPolicy()
        h.login()
        for sender, expect in ((b"evil@x.y", b"550 5.7.1"), (b"me@x.y", b"250 2.0.0")):
            h.command(b"MAIL FROM:<a@b.c>")
            h.command(b"RCPT TO:<d@e.f>")
            h.command(b"DATA")
            h.send(b"From: " + sender + b"\r\nSubject: s\r\n\r\nbody\r\n.\r\n")
            self.assertTrue(h.take().startswith(expect), sender)
        self.assertEqual(seen[1], b"From: me@x.y\r\nSubject: s\r\n")
        self.assertEqual(len(h.spool.committed), 1)
        self.assertEqual(len(h.spool.aborted), 1)

    def test_mailLoop(self) -> None:
        h = Harness(maxReceivedHeaders=2)
        h.login()
        h.command(b"MAIL FROM:<a@b.c>")
        h.command(b"RCPT TO:<d@e.f>")
        h.command(b"DATA")
        h.send(b"Received: a\r\nReceived: b\r\nReceived: c\r\n\r\nx\r\n.\r\n")
        self.assertTrue(h.take().startswith(b"554 5.4.6"))
        self.assertEqual(h.spool.committed, {})

    def test_headerSectionTooBig(self) -> None:
        h = Harness(maxHeaderSize=1000)
        h.login()
        h.command(b"MAIL FROM:<a@b.c>")
        h.command(b"RCPT TO:<d@e.f>")
        h.command(b"DATA")
        h.send(b"X-Junk: " + b"j" * 600 + b"\r\n" + b"X-More: " + b"m" * 600 + b"\r\n\r\n.\r\n")
        self.assertTrue(h.take().startswith(b"552 5.3.4"))


class DeadlineTests(SynchronousTestCase):
    def test_slowDripCommand(self) -> None:
        """One byte every 50 s keeps the idle timer happy but not the line deadline."""
        h = Harness(idleTimeout=300, commandTimeout=60, preAuthTimeout=1000)
        h.send(b"N")
        h.clock.advance(50)
        h.send(b"O")
        h.clock.advance(11)
        self.assertTrue(h.closed)
        self.assertEqual(h.take(), b"421 4.4.2 Timeout exceeded, closing connection\r\n")

    def test_completeLinesResetTheDeadline(self) -> None:
        h = Harness(idleTimeout=300, commandTimeout=60, preAuthTimeout=1000)
        for _ in range(5):
            h.send(b"NO")
            h.clock.advance(50)
            h.send(b"OP\r\n")
        self.assertFalse(h.closed)

    def test_sessionDeadline(self) -> None:
        h = Harness(idleTimeout=300, sessionTimeout=1000, preAuthTimeout=5000)
        for _ in range(10):
            h.clock.advance(99)
            h.command(b"NOOP")
        self.assertFalse(h.closed)
        h.clock.advance(20)
        self.assertTrue(h.closed)
        self.assertIn(b"421 4.4.2 Session time limit exceeded", h.take())
        self.assertEqual(h.clock.getDelayedCalls(), [])


class AuthDelayTests(SynchronousTestCase):
    def test_delayAppliesToRightAndWrongPasswords(self) -> None:
        """
        After the free failures every answer waits, right or wrong, so a
        client cannot tell success early by hanging up.
        """
        from mailgw.config import LimitsConfig
        from mailgw.limits import AuthThrottle

        h = Harness(implicitTLS=True, maxErrors=100)
        limits = LimitsConfig(authFreeFailures=1, authDelay=2.0, authDelayMax=2.0)
        h.factory.guards.auth = AuthThrottle(h.clock, limits)
        h.command(b"EHLO c")
        self.assertTrue(h.command(b"AUTH PLAIN " + plain(password=b"x")).startswith(b"535"))
        self.assertEqual(h.command(b"AUTH PLAIN " + plain(password=b"y")), b"")
        h.clock.advance(2)
        self.assertTrue(h.take().startswith(b"535"))
        self.assertEqual(h.command(b"AUTH PLAIN " + plain()), b"")
        h.clock.advance(1.9)
        self.assertEqual(h.take(), b"")
        h.clock.advance(0.1)
        self.assertTrue(h.take().startswith(b"235"))
