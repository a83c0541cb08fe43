"""
The session owns its resources: whatever the client does (hangs up,
pipelines, stalls) and whatever the server does (shutdown, deadlines), the
message writer, the commit and the AUTH outcome each have one owner and one
cleanup path, and every close ends the connection within the close deadline.
"""

from __future__ import annotations

import base64
import os
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from mailgw.config import LimitsConfig
from mailgw.envelope import Session
from mailgw.limits import ConnectionLimiter
from mailgw.queue.spool import Spool, SpoolFullError
from mailgw.replies import SMTPReply
from tests.helpers import CLOSE_DEADLINE, PASSWORD, USER, Harness


def plain(password: bytes = PASSWORD) -> bytes:
    return base64.b64encode(b"\0" + USER + b"\0" + password)


class SlowMessagePolicy:
    """Accepts senders and recipients at once; checkMessage waits for the test."""

    def __init__(self) -> None:
        self.pending: list[Deferred[SMTPReply | None]] = []

    def checkSender(self, session: Session, sender: object) -> None:
        return None

    def checkRecipient(self, session: Session, sender: object, recipient: object) -> None:
        return None

    def checkMessage(self, session: Session, envelope: object, headers: bytes) -> Deferred[Any]:
        d: Deferred[SMTPReply | None] = Deferred()
        self.pending.append(d)
        return d


@implementer(ICredentialsChecker)
class SlowChecker:
    """Every check waits for the test to answer it."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self) -> None:
        self.pending: list[Deferred[bytes]] = []

    def requestAvatarId(self, credentials: object) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        self.pending.append(d)
        return d


def inData(h: Harness) -> None:
    """Logged in, a transaction begun, DATA accepted."""
    h.login()
    h.command(b"MAIL FROM:<alice@example.com>")
    h.command(b"RCPT TO:<bob@example.org>")
    assert h.command(b"DATA").startswith(b"354")


class SilentTLSPeerTests(SynchronousTestCase):
    """D2: a peer that never answers the TLS close cannot hold the connection."""

    def silentPeer(self, **settings: Any) -> tuple[Harness, ConnectionLimiter]:
        h = Harness(implicitTLS=True, limits=LimitsConfig(), **settings)
        limiter = h.factory.guards.connections
        assert limiter is not None
        self.assertEqual(limiter.openConnections, 1)
        return h, limiter

    def test_idleDeadline(self) -> None:
        h, limiter = self.silentPeer(idleTimeout=60, preAuthTimeout=1000)
        h.clock.advance(60)
        self.assertEqual(h.take(), b"421 4.4.2 Timeout exceeded, closing connection\r\n")
        self.assertTrue(h.closing)
        self.assertFalse(h.closed, "a TLS close completes only when the peer answers")
        h.clock.advance(CLOSE_DEADLINE)
        self.assertTrue(h.closed, "the silent peer still holds the connection")
        self.assertTrue(h.transport.aborted)
        self.assertEqual(limiter.openConnections, 0)
        self.assertNotIn(h.protocol, h.factory.connections)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_closeDeadlineIsASetting(self) -> None:
        h, _ = self.silentPeer(closeTimeout=1.5)
        h.command(b"QUIT")
        h.clock.advance(1.4)
        self.assertFalse(h.closed)
        h.clock.advance(0.1)
        self.assertTrue(h.closed)

    def test_peerThatAnswersIsNotAborted(self) -> None:
        h, limiter = self.silentPeer()
        self.assertEqual(h.command(b"QUIT"), b"221 2.0.0 Bye\r\n")
        h.transport.peerClosesTLS()
        self.assertFalse(h.transport.aborted)
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertEqual(limiter.openConnections, 0)

    def test_shutdownEndsWithinDeadline(self) -> None:
        h, limiter = self.silentPeer()
        done = h.factory.shutdown()
        self.assertEqual(h.take(), b"421 4.3.2 Service shutting down, closing connection\r\n")
        self.assertNoResult(done)
        h.clock.advance(CLOSE_DEADLINE)
        self.successResultOf(done)
        self.assertEqual(limiter.openConnections, 0)

    def test_everyCloseHasTheDeadline(self) -> None:
        """Session deadline, too many errors, HTTP refusal, refusal by the limiter."""
        cases: list[tuple[dict[str, Any], bytes, float]] = [
            ({"sessionTimeout": 100, "idleTimeout": 1000, "preAuthTimeout": 1000}, b"", 100),
            ({"preAuthTimeout": 10}, b"", 10),
            ({"maxErrors": 1}, b"BOGUS\r\n", 0),
            ({}, b"GET / HTTP/1.0\r\n", 0),
        ]
        for settings, data, wait in cases:
            h, limiter = self.silentPeer(**settings)
            h.send(data)
            h.clock.advance(wait)
            self.assertIn(b"421 ", h.take(), settings)
            self.assertFalse(h.closed)
            h.clock.advance(CLOSE_DEADLINE)
            self.assertTrue(h.closed, settings)
            self.assertEqual(limiter.openConnections, 0)

    def test_refusedByLimiter(self) -> None:
        h = Harness(implicitTLS=True, limits=LimitsConfig(maxConnectionsPerAddress=1))
        first = h.transport
        h.connect()
        self.assertTrue(h.greeting.startswith(b"421 4.7.0"), h.greeting)
        self.assertFalse(h.closed)
        h.clock.advance(CLOSE_DEADLINE)
        self.assertTrue(h.closed)
        self.assertEqual(h.factory.connections, {first.protocol})

    def test_closeReadsAgain(self) -> None:
        """A close while reading is paused reads again: the peer's close_notify must get in."""
        h = Harness(sessionTimeout=100, preAuthTimeout=1000, maxJunkCommands=10**6)
        h.login()
        policy = SlowMessagePolicy()
        h.factory.policy = policy
        h.command(b"MAIL FROM:<alice@example.com>")
        h.command(b"RCPT TO:<bob@example.org>")
        h.command(b"DATA")
        h.send(b"x\r\n.\r\n" + b"NOOP\r\n" * 20_000)
        self.assertEqual(h.transport.producerState, "paused")
        h.clock.advance(100)
        self.assertTrue(h.closing)
        self.assertEqual(h.transport.producerState, "producing")


class HangUpDuringMessageCheckTests(SynchronousTestCase):
    """D4: the transaction owns the writer until its commit starts."""

    def test_writerAbortedWhenClientLeavesDuringCheck(self) -> None:
        h = Harness()
        policy = SlowMessagePolicy()
        h.factory.policy = policy
        inData(h)
        h.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        self.assertEqual(len(policy.pending), 1)
        h.hangUp()
        [writer] = h.spool.writers
        self.assertEqual(writer.state, "aborted", "the writer (and its file) leaked")
        # The check answers later: nothing is committed, nothing raises.
        policy.pending[0].callback(None)
        self.assertEqual(h.spool.committed, {})
        self.assertEqual(h.spool.heldCommits, [])

    def test_noSpoolFileLeftOnDisk(self) -> None:
        """With the real spool: no tmp/ file (and no descriptor) outlives the hang-up."""
        h = Harness()
        directory = self.mktemp()
        spool = Spool(directory, h.clock, maybeDeferred)
        self.addCleanup(spool.close)
        h.factory.spool = spool
        policy = SlowMessagePolicy()
        h.factory.policy = policy
        inData(h)
        h.send(b"Subject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 100 + b".\r\n")
        self.assertEqual(len(policy.pending), 1)
        self.assertNotEqual(os.listdir(os.path.join(directory, "tmp")), [])
        h.hangUp()
        self.assertEqual(os.listdir(os.path.join(directory, "tmp")), [])
        policy.pending[0].callback(None)
        self.assertEqual(os.listdir(os.path.join(directory, "tmp")), [])
        self.assertEqual(spool.pending(), [])

    def test_commitRunningIsNotAborted(self) -> None:
        """A hang-up during the commit leaves the commit alone: it owns the writer."""
        h = Harness()
        inData(h)
        h.spool.holdCommits = True
        h.send(b"x\r\n.\r\n")
        h.hangUp()
        self.assertEqual(h.spool.releaseCommits(), ["00000000000000000001"])
        self.assertEqual(h.spool.aborted, [])

    def test_writerAbortedOnEveryClose(self) -> None:
        for trigger in ("timeout", "shutdown", "rset-like-close"):
            h = Harness(idleTimeout=10)
            inData(h)
            h.send(b"partial line\r\n")
            if trigger == "timeout":
                h.clock.advance(10)
            elif trigger == "shutdown":
                h.factory.shutdown()
            else:
                h.hangUp()
            [writer] = h.spool.writers
            self.assertEqual(writer.state, "aborted", trigger)


class ShutdownDuringMessageCheckTests(SynchronousTestCase):
    """D5: a transaction in flight at shutdown finishes and is answered first."""

    def test_checkThenCommitThenShutdown(self) -> None:
        h = Harness()
        policy = SlowMessagePolicy()
        h.factory.policy = policy
        inData(h)
        h.spool.holdCommits = True
        h.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        done = h.factory.shutdown()
        self.assertEqual(h.take(), b"")
        policy.pending[0].callback(None)
        self.assertEqual(h.take(), b"", "421 sent while the commit runs")
        self.assertFalse(h.closing)
        h.spool.releaseCommits()
        self.assertRegex(
            h.take(),
            rb"^250 2\.0\.0 Ok: queued as 0+1\r\n421 4\.3\.2 Service shutting down",
        )
        self.assertEqual(len(h.spool.committed), 1)
        h.clock.advance(CLOSE_DEADLINE)
        self.successResultOf(done)

    def test_refusedByCheckThenShutdown(self) -> None:
        h = Harness()
        policy = SlowMessagePolicy()
        h.factory.policy = policy
        inData(h)
        h.send(b"x\r\n.\r\n")
        h.factory.shutdown()
        policy.pending[0].callback(SMTPReply(550, "5.7.1", "No"))
        self.assertEqual(
            h.take(), b"550 5.7.1 No\r\n421 4.3.2 Service shutting down, closing connection\r\n"
        )
        self.assertEqual(h.spool.committed, {})
        self.assertEqual(h.spool.writers[0].state, "aborted")


class AuthHangUpTests(SynchronousTestCase):
    """D7: an AUTH attempt whose client leaves before the answer still counts."""

    def test_abandonedAttemptCounts(self) -> None:
        checker = SlowChecker()
        h = Harness(
            implicitTLS=True, checkers=[checker], limits=LimitsConfig(authFailuresPerAddress=1)
        )
        h.command(b"EHLO c")
        h.send(b"AUTH PLAIN " + plain(b"guess") + b"\r\n")
        self.assertEqual(len(checker.pending), 1)
        h.hangUp()
        # The hash finishes after the client left.
        checker.pending[0].errback(UnauthorizedLogin())
        # The same address comes back: its budget is spent.
        h.connect()
        h.command(b"EHLO c")
        reply = h.command(b"AUTH PLAIN " + plain(b"guess2"))
        self.assertTrue(reply.startswith(b"421 4.7.0"), reply)
        self.assertEqual(len(checker.pending), 1, "the second guess was checked")

    def test_hangUpDuringTheDelaySparesTheCheck(self) -> None:
        """Nobody waits for the answer: the password is not checked, the attempt counts."""
        checker = SlowChecker()
        limits = LimitsConfig(authFreeFailures=0, authDelay=2.0, authFailuresPerAddress=1)
        h = Harness(implicitTLS=True, checkers=[checker], limits=limits)
        throttle = h.factory.guards.auth
        assert throttle is not None
        h.command(b"EHLO c")
        h.send(b"AUTH PLAIN " + plain(b"guess") + b"\r\n")
        self.assertEqual(checker.pending, [])
        h.hangUp()
        self.assertTrue(throttle.check("192.0.2.7", USER.decode()).disconnect)
        h.clock.advance(10)
        self.assertEqual(checker.pending, [])
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertEqual(self.flushLoggedErrors(), [])


class OverlongCommandTests(SynchronousTestCase):
    """D10: one over-long command line gets exactly one reply, however it is read."""

    def test_oneReplyPerLongLine(self) -> None:
        for chunk in (1000, 4096, 16384, 65536):
            h = Harness()
            line = b"NOOP " + b"x" * 70_000
            for i in range(0, len(line), chunk):
                h.send(line[i : i + chunk])
            h.send(b"\r\nNOOP\r\n")
            self.assertEqual(h.take(), b"500 5.5.6 Line too long\r\n250 2.0.0 Ok\r\n", chunk)

    def test_pipelinedAfterLongLine(self) -> None:
        h = Harness()
        h.send(b"NOOP " + b"x" * 20000 + b"\r\nHELP\r\nNOOP\r\n")
        out = h.take().split(b"\r\n")
        self.assertEqual([x[:3] for x in out if x], [b"500", b"214", b"250"])


class PreAuthenticationDeadlineTests(SynchronousTestCase):
    """D12: a session that has not authenticated in time is closed."""

    def test_closedWithoutAuth(self) -> None:
        h = Harness(idleTimeout=300, commandTimeout=60, preAuthTimeout=30)
        for _ in range(9):
            h.clock.advance(3)
            h.command(b"NOOP")
        h.clock.advance(3)
        self.assertEqual(
            h.take(), b"421 4.7.0 Authentication required in time, closing connection\r\n"
        )
        self.assertTrue(h.closed)

    def test_defaultIsShort(self) -> None:
        h = Harness()
        h.clock.advance(30)
        self.assertTrue(h.closed)

    def test_authenticatedSessionStays(self) -> None:
        h = Harness(preAuthTimeout=30)
        h.login()
        h.clock.advance(200)
        self.assertFalse(h.closing)


class JunkCommandTests(SynchronousTestCase):
    """D12: commands that do nothing are limited per session."""

    def test_noopDrip(self) -> None:
        h = Harness()
        h.login()
        for _ in range(20):
            self.assertEqual(h.command(b"NOOP"), b"250 2.0.0 Ok\r\n")
        self.assertEqual(
            h.command(b"NOOP"),
            b"421 4.7.0 Too many commands that do nothing, closing connection\r\n",
        )
        self.assertTrue(h.closing)

    def test_mixedJunk(self) -> None:
        h = Harness(maxJunkCommands=5)
        h.command(b"EHLO c")
        for line in (b"RSET", b"HELP", b"VRFY x", b"EHLO c", b"HELO c"):
            self.assertFalse(h.command(line).startswith(b"421"), line)
        self.assertTrue(h.command(b"NOOP").startswith(b"421 4.7.0"))

    def test_progressResetsTheCount(self) -> None:
        h = Harness(maxJunkCommands=3)
        h.login()
        for _ in range(4):
            for _ in range(3):
                h.command(b"NOOP")
            h.command(b"MAIL FROM:<a@b.c>")
            h.command(b"RCPT TO:<d@e.f>")
            h.command(b"DATA")
            self.assertTrue(h.command(b"x\r\n.").startswith(b"250 2.0.0 Ok: queued"))
        self.assertFalse(h.closing)


class SpoolFailureTests(SynchronousTestCase):
    """The transaction's one mapping of spool failures: 451 or 452, the writer aborted."""

    def test_writeFailsMidMessage(self) -> None:
        h = Harness()
        inData(h)
        h.spool.failNextWrite(SpoolFullError("ENOSPC"))
        h.send(b"Subject: x\r\n\r\nbody\r\n.\r\nNOOP\r\n")
        self.assertEqual(
            h.take(),
            b"452 4.3.1 Insufficient system storage; try again later\r\n250 2.0.0 Ok\r\n",
        )
        self.assertEqual(h.spool.writers[0].state, "aborted")
        self.assertEqual(h.spool.committed, {})

    def test_beginFails(self) -> None:
        h = Harness()
        h.login()
        h.command(b"MAIL FROM:<alice@example.com>")
        h.command(b"RCPT TO:<bob@example.org>")
        h.spool.failNextBegin()
        self.assertEqual(
            h.command(b"DATA"), b"451 4.3.0 Local error in processing; try again later\r\n"
        )
        # The transaction is over: the client starts again.
        self.assertTrue(h.command(b"RCPT TO:<bob@example.org>").startswith(b"503 5.5.1"))


class PreAuthenticationDeadlineAndAuthTests(SynchronousTestCase):
    """The pre-authentication deadline counts the client's time, not the server's."""

    def test_standsStillWhileTheAnswerIsDelayed(self) -> None:
        limits = LimitsConfig(authFreeFailures=0, authDelay=16.0, authDelayMax=16.0)
        h = Harness(implicitTLS=True, limits=limits, preAuthTimeout=30, maxErrors=100)
        h.command(b"EHLO c")
        h.clock.advance(20)
        # Two delayed answers (32 s) pass the 30 s deadline: it waits for us.
        h.send(b"AUTH PLAIN " + plain(b"wrong") + b"\r\n")
        h.clock.advance(16)
        self.assertTrue(h.take().startswith(b"535 5.7.8"))
        h.send(b"AUTH PLAIN " + plain() + b"\r\n")
        h.clock.advance(16)
        self.assertTrue(h.take().startswith(b"235 2.7.0"))
        h.clock.advance(100)
        self.assertFalse(h.closing)

    def test_clientTimeStillCounts(self) -> None:
        checker = SlowChecker()
        h = Harness(implicitTLS=True, checkers=[checker], preAuthTimeout=30)
        h.command(b"EHLO c")
        h.clock.advance(20)
        h.send(b"AUTH PLAIN " + plain(b"wrong") + b"\r\n")
        h.clock.advance(100)
        checker.pending[0].errback(UnauthorizedLogin())
        self.assertTrue(h.take().startswith(b"535 5.7.8"))
        h.clock.advance(9.9)
        self.assertFalse(h.closing)
        h.clock.advance(0.1)
        self.assertEqual(
            h.take(), b"421 4.7.0 Authentication required in time, closing connection\r\n"
        )
