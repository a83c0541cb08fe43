"""
Tests for L{mailgw.testing}: the in-memory fakes.
"""

from __future__ import annotations

import attrs
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailgw.envelope import Address, Envelope, QueuedMessage, RecipientState, Session
from mailgw.interfaces import IMessageWriter, ISpool
from mailgw.queue.spool import SpoolError, SpoolFullError, isQueueId
from mailgw.testing import MemoryMessageWriter, MemorySpool

ENVELOPE = Envelope(Address("alice", "example.org"), (Address("bob", "example.com"),))
SESSION = Session("192.0.2.7", user="alice")


class MemorySpoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.spool = MemorySpool(self.clock)

    def test_interfaces(self) -> None:
        """MemorySpool provides ISpool and its writers IMessageWriter."""
        self.assertTrue(verifyObject(ISpool, self.spool))
        writer = self.spool.begin(ENVELOPE, SESSION)
        self.assertIsInstance(writer, MemoryMessageWriter)
        self.assertTrue(verifyObject(IMessageWriter, writer))

    def test_commit(self) -> None:
        """A commit records the message and its bytes; ids are deterministic."""
        writer = self.spool.begin(ENVELOPE, SESSION)
        self.assertEqual(writer.queueId, "00000000000000000001")
        self.assertTrue(isQueueId(writer.queueId))
        writer.write(b"Subject: x\r\n")
        writer.write(b"\r\nbody\r\n")
        self.assertEqual(self.successResultOf(writer.commit()), writer.queueId)
        expected = QueuedMessage(
            queueId=writer.queueId,
            envelope=ENVELOPE,
            session=SESSION,
            arrival=1000,
            size=20,
            recipients=(RecipientState(ENVELOPE.recipients[0]),),
            nextAttempt=1000,
        )
        self.assertEqual(self.spool.committed,
                         {writer.queueId: (expected, b"Subject: x\r\n\r\nbody\r\n")})  # fmt: skip
        self.assertEqual(self.spool.load(writer.queueId), expected)
        self.assertEqual(self.spool.pending(), [expected])
        self.assertEqual(
            self.spool.openMessage(writer.queueId).read(), b"Subject: x\r\n\r\nbody\r\n"
        )
        self.assertEqual(writer.state, "committed")
        writer.abort()
        self.assertIn(writer.queueId, self.spool.committed)
        self.assertEqual(self.spool.begin(ENVELOPE, SESSION).queueId, "00000000000000000002")

    def test_abort(self) -> None:
        writer = self.spool.begin(ENVELOPE, SESSION)
        writer.write(b"x")
        writer.abort()
        writer.abort()
        self.assertEqual(self.spool.aborted, [writer.queueId])
        self.assertEqual(self.spool.committed, {})
        self.assertRaises(RuntimeError, writer.write, b"x")

    def test_failNextCommit(self) -> None:
        """failNextCommit fails one commit, with the error given."""
        for error in (None, SpoolFullError("full")):
            self.spool.failNextCommit(error)
            writer = self.spool.begin(ENVELOPE, SESSION)
            failure = self.failureResultOf(writer.commit(), SpoolError)
            if error is not None:
                self.assertIs(failure.value, error)
            self.assertEqual(writer.state, "failed")
            writer.abort()
        self.assertEqual(self.spool.committed, {})
        writer = self.spool.begin(ENVELOPE, SESSION)
        self.successResultOf(writer.commit())

    def test_failNextWriteAndBegin(self) -> None:
        self.spool.failNextBegin(SpoolFullError())
        self.assertRaises(SpoolFullError, self.spool.begin, ENVELOPE, SESSION)
        writer = self.spool.begin(ENVELOPE, SESSION)
        self.spool.failNextWrite()
        self.assertRaises(SpoolError, writer.write, b"x")
        self.assertRaises(SpoolError, writer.write, b"x")
        self.failureResultOf(writer.commit(), SpoolError)
        self.assertEqual(self.spool.committed, {})

    def test_holdCommits(self) -> None:
        """Held commits fire only when released."""
        self.spool.holdCommits = True
        writer = self.spool.begin(ENVELOPE, SESSION)
        d = writer.commit()
        self.assertNoResult(d)
        self.assertEqual(self.spool.committed, {})
        self.assertEqual(writer.state, "committing")
        self.assertEqual(self.spool.releaseCommits(), [writer.queueId])
        self.assertEqual(self.successResultOf(d), writer.queueId)
        self.assertIn(writer.queueId, self.spool.committed)

    def test_failHeldCommits(self) -> None:
        self.spool.holdCommits = True
        writer = self.spool.begin(ENVELOPE, SESSION)
        d = writer.commit()
        self.spool.failHeldCommits(SpoolFullError())
        self.failureResultOf(d, SpoolFullError)
        self.assertEqual(self.spool.committed, {})

    def test_abortWhileHeld(self) -> None:
        """A writer aborted during its commit is not committed."""
        self.spool.holdCommits = True
        writer = self.spool.begin(ENVELOPE, SESSION)
        d = writer.commit()
        writer.abort()
        self.assertEqual(self.spool.releaseCommits(), [])
        self.failureResultOf(d, SpoolError)
        self.assertEqual(self.spool.committed, {})
        self.assertEqual(self.spool.aborted, [writer.queueId])

    def test_updateRemove(self) -> None:
        writer = self.spool.begin(ENVELOPE, SESSION)
        queueId = self.successResultOf(writer.commit())
        held = attrs.evolve(self.spool.load(queueId), held=True)
        self.assertIs(self.successResultOf(self.spool.update(held)), held)
        self.assertEqual(self.spool.pending(), [held])
        self.successResultOf(self.spool.remove(queueId))
        self.successResultOf(self.spool.remove(queueId))
        self.assertEqual(self.spool.removed, [queueId, queueId])
        self.assertRaises(KeyError, self.spool.load, queueId)
        self.assertRaises(KeyError, self.spool.openMessage, queueId)
        self.failureResultOf(self.spool.update(held), KeyError)
        self.assertEqual(self.spool.pending(), [])
