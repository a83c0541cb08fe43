"""
Tests for L{mailgw.testing}: the in-memory fakes.
"""

from __future__ import annotations

import attrs
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailgw.envelope import (
    Address,
    DeliveryResult,
    Envelope,
    QueuedMessage,
    RecipientState,
    RecipientStatus,
    Session,
)
from mailgw.interfaces import IMessageWriter, IRelay, ISpool
from mailgw.queue.spool import SpoolError, SpoolFullError, isQueueId
from mailgw.testing import (
    FakeRelay,
    MemoryMessageWriter,
    MemorySpool,
    permanent,
    success,
    transient,
)

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


BOB = Address("bob", "example.com")
CAROL = Address("carol", "example.net")


def queued(queueId: str, *recipients: RecipientState) -> QueuedMessage:
    envelope = Envelope(Address("alice", "example.org"), tuple(r.address for r in recipients))
    return QueuedMessage(queueId, envelope, SESSION, 0.0, 10, recipients)


class FakeRelayTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.relay = FakeRelay()
        self.message = queued("00000000000000000001", RecipientState(BOB), RecipientState(CAROL))

    def test_interface(self) -> None:
        """FakeRelay provides IRelay, and deliverMany."""
        self.assertTrue(verifyObject(IRelay, self.relay))
        self.assertTrue(callable(self.relay.deliverMany))

    def test_defaultSuccess(self) -> None:
        """Unscripted recipients succeed; every call and recipient is recorded."""
        results = self.successResultOf(self.relay.deliver(self.message))
        self.assertEqual(
            results,
            [
                DeliveryResult(BOB, True, False, 250, "2.0.0", "Ok", "upstream.example"),
                DeliveryResult(CAROL, True, False, 250, "2.0.0", "Ok", "upstream.example"),
            ],
        )
        [call] = self.relay.calls
        self.assertEqual((call.messages, call.many, call.fired), ((self.message,), False, True))
        self.assertEqual(
            self.relay.attempts,
            [(self.message.queueId, str(BOB)), (self.message.queueId, str(CAROL))],
        )

    def test_script(self) -> None:
        """Scripted outcomes are used up one per attempt, then the default answers."""
        self.relay.script[str(BOB)] = [transient("450 4.2.0 busy"), permanent()]
        outcomes = [self.successResultOf(self.relay.deliver(self.message))[0] for _ in range(3)]
        self.assertEqual(
            [(r.success, r.permanent, r.code, r.enhanced, r.text) for r in outcomes],
            [
                (False, False, 450, "4.2.0", "busy"),
                (False, True, 550, "5.1.1", "no such user"),
                (True, False, 250, "2.0.0", "Ok"),
            ],
        )
        self.assertTrue(outcomes[0].transient)
        self.relay.default = transient("connection refused", remote="")
        [result, _] = self.successResultOf(self.relay.deliver(self.message))
        self.assertEqual(
            (result.code, result.enhanced, result.text, result.remote),
            (0, "", "connection refused", ""),
        )
        self.assertEqual(success("250 ok").code, 250)

    def test_onlyPending(self) -> None:
        """Only pending recipients are tried."""
        done = RecipientState(BOB, RecipientStatus.DELIVERED)
        message = queued("00000000000000000002", done, RecipientState(CAROL))
        [result] = self.successResultOf(self.relay.deliver(message))
        self.assertEqual(result.recipient, CAROL)
        self.assertEqual(self.relay.attempts, [(message.queueId, str(CAROL))])

    def test_deliverMany(self) -> None:
        other = queued("00000000000000000002", RecipientState(CAROL))
        self.relay.script[str(CAROL)] = [permanent()]
        results = self.successResultOf(self.relay.deliverMany([self.message, other]))
        self.assertEqual(list(results), [self.message.queueId, other.queueId])
        self.assertEqual([r.permanent for r in results[self.message.queueId]], [False, True])
        self.assertEqual([r.success for r in results[other.queueId]], [True])
        [call] = self.relay.calls
        self.assertEqual((call.many, call.queueIds), (True, list(results)))

    def test_holdResults(self) -> None:
        """Held calls fire only when the test says so."""
        self.relay.holdResults = True
        first, second = self.relay.deliver(self.message), self.relay.deliver(self.message)
        self.assertNoResult(first)
        self.assertEqual(len(self.relay.heldCalls), 2)
        self.relay.calls[1].fire()
        self.assertNoResult(first)
        self.assertEqual(len(self.successResultOf(second)), 2)
        self.relay.releaseAll()
        self.assertEqual(len(self.successResultOf(first)), 2)
        self.assertEqual(self.relay.heldCalls, [])
        third = self.relay.deliver(self.message)
        self.relay.calls[-1].fail(ValueError("x"))
        self.failureResultOf(third, ValueError)

    def test_failNextCall(self) -> None:
        """failNextCall fails one call, also a held one when it fires."""
        self.relay.failNextCall(ValueError("boom"))
        self.failureResultOf(self.relay.deliver(self.message), ValueError)
        self.successResultOf(self.relay.deliver(self.message))
        self.relay.holdResults = True
        self.relay.failNextCall()
        d = self.relay.deliverMany([self.message])
        self.assertNoResult(d)
        self.relay.releaseAll()
        self.failureResultOf(d, RuntimeError)
