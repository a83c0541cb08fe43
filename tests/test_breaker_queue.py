"""
The queue's hooks for the breaker (L{QueueRunner.screen} and
L{QueueRunner.bounced}): a message screened for holding is held before it
is ever scheduled, and its commit fires only once the held state is on
disk; a failing screen holds nothing; refused recipients are reported per
message, expired ones not.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from mailgw.config import QueueConfig
from mailgw.envelope import Envelope, QueuedMessage, Session, splitAddress
from mailgw.queue.runner import QueueRunner
from mailgw.testing import FakeRelay, MemorySpool, permanent, transient

START = 1_700_000_000.0


class HookTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.spool = MemorySpool(clock=self.clock)
        self.relay = FakeRelay()
        self.runner = QueueRunner(
            self.spool, self.relay, self.clock, QueueConfig(retryJitter=0), "mx.example.com"
        )
        self.screened: list[QueuedMessage] = []
        self.bounces: list[tuple[str, int]] = []
        self.runner.startService()

    def submit(self, *rcpts: str, user: str = "alice") -> Any:
        envelope = Envelope(splitAddress("alice@example.com"), tuple(map(splitAddress, rcpts)))
        writer = self.runner.begin(envelope, Session("192.0.2.7", user=user))
        writer.write(b"Subject: x\r\n\r\nx\r\n")
        return writer.commit()

    def test_heldBeforeScheduled(self) -> None:
        def screen(message: QueuedMessage) -> str | None:
            self.screened.append(message)
            return "a test"

        self.runner.screen = screen
        self.spool.holdChanges = True
        with capturedLogs() as events:
            d = self.submit("bob@example.org")
        # Not on disk as held yet: no reply.
        self.assertNoResult(d)
        self.spool.holdChanges = False
        self.spool.releaseChanges()
        queueId = self.successResultOf(d)
        self.assertEqual([m.queueId for m in self.screened], [queueId])
        self.assertTrue(self.spool.committed[queueId][0].held)
        self.assertIn(f"Queue {queueId}: held at intake (a test)", [formatEvent(e) for e in events])
        self.clock.advance(86400)
        self.assertEqual(self.relay.attempts, [])
        self.assertEqual(self.runner.heldOf("alice"), [queueId])
        self.successResultOf(self.runner.release(queueId))
        self.assertEqual(self.relay.attempts, [(queueId, "bob@example.org")])

    def test_notScreenedOut(self) -> None:
        self.runner.screen = lambda message: None
        queueId = self.successResultOf(self.submit("bob@example.org"))
        self.assertEqual(self.relay.attempts, [(queueId, "bob@example.org")])

    def test_failingScreen(self) -> None:
        def screen(message: QueuedMessage) -> str | None:
            raise RuntimeError("bug")

        self.runner.screen = screen
        queueId = self.successResultOf(self.submit("bob@example.org"))
        self.assertEqual(self.relay.attempts, [(queueId, "bob@example.org")])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_heldUpdateFails(self) -> None:
        self.runner.screen = lambda message: "a test"
        self.spool.holdChanges = True
        d = self.submit("bob@example.org")
        [(_, _, change)] = self.spool.heldChanges
        with capturedLogs() as events:
            change.errback(OSError("disk gone"))
        queueId = self.successResultOf(d)  # committed: the 250 goes out all the same
        self.assertTrue(any("cannot record it as held" in formatEvent(e) for e in events))
        self.clock.advance(3600)
        self.assertEqual(self.relay.attempts, [])  # held here
        self.assertEqual(self.runner.heldOf("alice"), [queueId])

    def test_bouncesReported(self) -> None:
        self.runner.bounced = lambda message, count: self.bounces.append((message.queueId, count))
        self.relay.script["gone@example.org"] = [permanent()]
        self.relay.script["slow@example.org"] = [transient()] * 1000
        queueId = self.successResultOf(
            self.submit("bob@example.org", "gone@example.org", "slow@example.org")
        )
        self.assertEqual(self.bounces, [(queueId, 1)])
        # Expiry is no refusal: not reported.
        self.clock.advance(6 * 86400)
        for _ in range(20):
            self.clock.advance(3600)
        self.assertNotIn(queueId, self.spool.committed)
        self.assertEqual(self.bounces, [(queueId, 1)])
