"""
One contract for every L{ISpool}: the same tests run against the real
L{Spool} (its file operations held in a queue the test runs, as its thread
pool would) and against L{MemorySpool} (its changes held the same way), so
that the fake cannot hide the races the real one has.
"""

from __future__ import annotations

import os
from typing import Any

import attrs
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailgw.envelope import Address, BodyType, Envelope, QueuedMessage, Session
from mailgw.interfaces import IMessageWriter, ISpool, SpoolError
from mailgw.queue.spool import Spool
from mailgw.testing import MemorySpool
from tests.test_spool import DeferredRunner

ENVELOPE = Envelope(
    sender=Address("alice", "example.org"),
    recipients=(Address("bob", "example.com"), Address("carol", "example.net")),
)
SESSION = Session(clientAddress="192.0.2.7", helo="client.example.org", user="alice")
BODY = b"Subject: hi\r\n\r\nbody\r\n"


class ContractMixin:
    """The contract; subclasses make the spool and say how its work is done."""

    spool: Any

    def makeSpool(self) -> Any:
        raise NotImplementedError

    def settle(self) -> None:
        """Do every piece of work the spool has queued (its thread's)."""
        raise NotImplementedError

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.spool = self.makeSpool()

    def commit(self, data: bytes = BODY, envelope: Envelope = ENVELOPE) -> str:
        writer = self.spool.begin(envelope, SESSION)
        writer.write(data)
        d = writer.commit()
        self.settle()
        return self.successResultOf(d)  # type: ignore[attr-defined,no-any-return]

    # -- the contract ------------------------------------------------------

    def test_interfaces(self) -> None:
        self.assertTrue(verifyObject(ISpool, self.spool))  # type: ignore[attr-defined]
        writer = self.spool.begin(ENVELOPE, SESSION)
        self.assertTrue(verifyObject(IMessageWriter, writer))  # type: ignore[attr-defined]
        writer.abort()
        self.settle()

    def test_roundTrip(self) -> None:
        """What is committed is pending, loadable and readable byte for byte."""
        writer = self.spool.begin(ENVELOPE, SESSION)
        self.assertIsNone(writer.message)
        writer.write(BODY[:5])
        writer.write(BODY[5:])
        d = writer.commit()
        self.settle()
        queueId = self.successResultOf(d)  # type: ignore[attr-defined]
        message = self.spool.load(queueId)
        self.assertEqual(writer.message, message)  # type: ignore[attr-defined]
        self.assertEqual(message.envelope, ENVELOPE)  # type: ignore[attr-defined]
        self.assertEqual(message.size, len(BODY))  # type: ignore[attr-defined]
        self.assertEqual(self.spool.pending(), [message])  # type: ignore[attr-defined]
        with self.spool.openMessage(queueId) as f:
            self.assertEqual(f.read(), BODY)  # type: ignore[attr-defined]

    def test_eightBit(self) -> None:
        """Bytes that are not ASCII make the stored body type 8BITMIME."""
        queueId = self.commit(b"Subject: \xe2\x82\xac\r\n\r\n")
        body = self.spool.load(queueId).envelope.body
        self.assertIs(body, BodyType.EIGHTBITMIME)  # type: ignore[attr-defined]

    def test_abortDuringCommit(self) -> None:
        """An abort during the commit fails it, and nothing stays queued."""
        writer = self.spool.begin(ENVELOPE, SESSION)
        writer.write(BODY)
        d = writer.commit()
        writer.abort()
        self.settle()
        self.failureResultOf(d, SpoolError)  # type: ignore[attr-defined]
        self.settle()
        self.assertEqual(self.spool.pending(), [])  # type: ignore[attr-defined]

    def test_updateThenRemove(self) -> None:
        """
        An update and a remove in flight together: the remove wins, and
        nothing of the message stays (no state comes back from a cache).
        """
        queueId = self.commit()
        changed = attrs.evolve(self.spool.load(queueId), held=True)
        updated = self.spool.update(changed)
        removed = self.spool.remove(queueId)
        self.settle()
        self.assertEqual(self.successResultOf(updated), changed)  # type: ignore[attr-defined]
        self.successResultOf(removed)  # type: ignore[attr-defined]
        self.assertRaises(KeyError, self.spool.load, queueId)  # type: ignore[attr-defined]
        self.assertEqual(self.spool.pending(), [])  # type: ignore[attr-defined]

    def test_removeThenUpdate(self) -> None:
        """An update called after a remove fails with KeyError and leaves nothing."""
        queueId = self.commit()
        message: QueuedMessage = self.spool.load(queueId)
        removed = self.spool.remove(queueId)
        updated = self.spool.update(attrs.evolve(message, held=True))
        self.settle()
        self.successResultOf(removed)  # type: ignore[attr-defined]
        self.failureResultOf(updated, KeyError)  # type: ignore[attr-defined]
        self.assertRaises(KeyError, self.spool.load, queueId)  # type: ignore[attr-defined]
        self.assertEqual(self.spool.pending(), [])  # type: ignore[attr-defined]

    def test_updatesInOrder(self) -> None:
        """Updates land in call order: the last one called is what is stored."""
        queueId = self.commit()
        message = self.spool.load(queueId)
        first = self.spool.update(attrs.evolve(message, held=True))
        second = self.spool.update(attrs.evolve(message, held=False, warned=True))
        self.settle()
        self.successResultOf(first)  # type: ignore[attr-defined]
        self.successResultOf(second)  # type: ignore[attr-defined]
        stored = self.spool.load(queueId)
        self.assertEqual((stored.held, stored.warned), (False, True))  # type: ignore[attr-defined]

    def test_removeIdempotent(self) -> None:
        queueId = self.commit()
        self.spool.remove(queueId)
        d = self.spool.remove(queueId)
        self.settle()
        self.successResultOf(d)  # type: ignore[attr-defined]

    def test_unknown(self) -> None:
        """An id the spool does not hold: KeyError from load, openMessage, update."""
        queueId = self.commit()
        message = self.spool.load(queueId)
        self.spool.remove(queueId)
        self.settle()
        self.assertRaises(KeyError, self.spool.load, queueId)  # type: ignore[attr-defined]
        self.assertRaises(KeyError, self.spool.openMessage, queueId)  # type: ignore[attr-defined]
        d = self.spool.update(message)
        self.settle()
        self.failureResultOf(d, KeyError)  # type: ignore[attr-defined]

    def test_uncommittedInvisible(self) -> None:
        """A message being written is not pending, loadable or readable."""
        writer = self.spool.begin(ENVELOPE, SESSION)
        writer.write(BODY * 5000)
        self.settle()
        self.assertEqual(self.spool.pending(), [])  # type: ignore[attr-defined]
        self.assertRaises(KeyError, self.spool.load, writer.queueId)  # type: ignore[attr-defined]
        writer.abort()
        self.settle()


class RealSpoolContractTests(ContractMixin, SynchronousTestCase):
    def makeSpool(self) -> Spool:
        self.runner = DeferredRunner()
        spool = Spool(os.path.abspath(self.mktemp()), self.clock, self.runner)
        self.addCleanup(spool.close)
        return spool

    def settle(self) -> None:
        self.runner.runAll()


class MemorySpoolContractTests(ContractMixin, SynchronousTestCase):
    def makeSpool(self) -> MemorySpool:
        return MemorySpool(self.clock, holdCommits=True, holdChanges=True)

    def settle(self) -> None:
        while self.spool.heldCommits or self.spool.heldChanges:
            self.spool.releaseCommits()
            self.spool.releaseChanges()
