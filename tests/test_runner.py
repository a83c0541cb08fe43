"""
Tests for L{mailgw.queue.runner}: scheduling, retries with backoff, bounces,
delay warnings, restarts and operator control, in memory (L{MemorySpool},
L{FakeRelay}, L{Clock}).
"""

from __future__ import annotations

import random
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailgw.config import QueueConfig
from mailgw.envelope import (
    Address,
    DeliveryResult,
    Envelope,
    QueuedMessage,
    RecipientStatus,
    Session,
)
from mailgw.interfaces import IMessageWriter, IQueue, IQueueControl, IRelay
from mailgw.queue.runner import RECORD_RETRY, STOP_TIMEOUT, QueueRunner, backoff
from mailgw.queue.spool import Spool, SpoolError, SpoolReader
from mailgw.testing import (
    FakeRelay,
    MemoryMessageWriter,
    MemorySpool,
    permanent,
    success,
    transient,
)

SENDER = Address("alice", "example.org")
BOB = Address("bob", "example.com")
CAROL = Address("carol", "example.net")
DAVE = Address("dave", "example.net")
SESSION = Session("192.0.2.7", user="alice")
BODY = b"Subject: Lunch\r\nFrom: Alice <alice@example.org>\r\n\r\nSECRET BODY TEXT\r\n"
START = 1_700_000_000.0
HOUR, DAY = 3600.0, 86400.0
# Jitter 0, so every retry time is exact.
CONFIG = QueueConfig(
    retryMin=300,
    retryMax=3600,
    retryJitter=0,
    maxLifetime=5 * DAY,
    bounceLifetime=2 * DAY,
    delayWarning=4 * HOUR,
)
NO_WARNING = attrs.evolve(CONFIG, delayWarning=0)
UNKNOWN = "0000000000000000FFFF"


@attrs.define(eq=False)
class RecordingSpool(MemorySpool):
    """
    A MemorySpool that records every update and remove, in order, and can
    fail updates. ``log`` holds ``("update", message, bounceIds)`` (the
    bounces committed so far) and ``("remove", queueId)``.
    """

    log: list[tuple[Any, ...]] = attrs.field(factory=list)
    failUpdates: int = 0
    holdUpdates: bool = False
    heldUpdates: list[Deferred[None]] = attrs.field(factory=list)

    def bounceIds(self) -> list[str]:
        return [
            w.queueId for w in self.writers if w.envelope.sender is None and w.state == "committed"
        ]

    def update(self, message: QueuedMessage) -> Deferred[QueuedMessage]:
        self.log.append(("update", message, self.bounceIds()))
        if self.failUpdates:
            self.failUpdates -= 1
            return fail(SpoolError("injected update failure"))
        if self.holdUpdates:
            # Like the real spool: the write happens later, in call order.
            gate: Deferred[None] = Deferred()
            self.heldUpdates.append(gate)
            return gate.addCallback(lambda _: MemorySpool.update(self, message))
        return super().update(message)

    def releaseUpdates(self) -> None:
        while self.heldUpdates:
            self.heldUpdates.pop(0).callback(None)

    def remove(self, queueId: str) -> Deferred[None]:
        self.log.append(("remove", queueId))
        return super().remove(queueId)


@implementer(IRelay)
class SingleRelay:
    """A relay without deliverMany, over a FakeRelay."""

    def __init__(self, fake: FakeRelay) -> None:
        self.fake = fake

    def deliver(self, message: QueuedMessage) -> Deferred[list[DeliveryResult]]:
        return self.fake.deliver(message)


class RunnerTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.spool = RecordingSpool(self.clock)
        self.relay = FakeRelay()

    def makeRunner(self, config: QueueConfig = NO_WARNING, **kw: Any) -> QueueRunner:
        kw.setdefault("rng", random.Random(4))
        relay = kw.pop("relay", self.relay)
        return QueueRunner(self.spool, relay, self.clock, config, "mail.example.org", **kw)

    def start(self, config: QueueConfig = NO_WARNING, **kw: Any) -> QueueRunner:
        runner = self.makeRunner(config, **kw)
        runner.startService()
        return runner

    def submit(self, *recipients: Address, sender: Address | None = SENDER) -> str:
        """Put a message in the spool, as one from before a restart."""
        writer = self.spool.begin(Envelope(sender, recipients), SESSION)
        writer.write(BODY)
        return self.successResultOf(writer.commit())

    def submitTo(
        self, runner: QueueRunner, *recipients: Address, sender: Address | None = SENDER
    ) -> str:
        """Submit a message through the queue (commit is scheduling)."""
        writer = runner.begin(Envelope(sender, recipients), SESSION)
        writer.write(BODY)
        return self.successResultOf(writer.commit())

    def operations(self) -> list[tuple[str, str]]:
        """The spool's log as ``(operation, queueId)``."""
        return [(op[0], op[1] if op[0] == "remove" else op[1].queueId) for op in self.spool.log]

    def statuses(self, queueId: str) -> dict[str, str]:
        return {str(r.address): r.status.value for r in self.spool.load(queueId).recipients}

    def dsns(self) -> list[MemoryMessageWriter]:
        """Every DSN (message from <>) the runner committed."""
        return [
            w for w in self.spool.writers if w.envelope.sender is None and w.state == "committed"
        ]

    def assertDSN(self, writer: MemoryMessageWriter, subject: bytes, *words: bytes) -> None:
        self.assertEqual(writer.envelope.recipients, (SENDER,))
        self.assertEqual(writer.session.listener, "bounce")
        data = bytes(writer.data)
        self.assertIn(b"Subject: " + subject, data)
        # A bounce returns the whole (small) message unless RET=HDRS; a warning only headers.
        bounce = subject.startswith(b"Undelivered")
        self.assertEqual(b"SECRET BODY TEXT" in data, bounce)
        for word in words:
            self.assertIn(word, data)


class DeliveryTests(RunnerTestCase):
    def test_interfaces(self) -> None:
        self.assertTrue(verifyObject(IQueueControl, self.makeRunner()))
        self.assertTrue(verifyObject(IQueue, self.makeRunner()))

    def test_badArguments(self) -> None:
        """A reporting MTA that could not go into a bounce is refused at once."""
        for name in ("", "mail example.org", "mail.example.org\r\nX: y"):
            self.assertRaises(
                ValueError, QueueRunner, self.spool, self.relay, self.clock, CONFIG, name
            )
        QueueRunner(self.spool, self.relay, self.clock, CONFIG, "mail.example.org.")
        self.assertRaises(ValueError, self.makeRunner, batchSize=0)
        self.assertRaises(ValueError, self.makeRunner, maxInFlight=0)

    def test_startDeliversExisting(self) -> None:
        """
        startService picks up what is already spooled, delivers it in one
        batch, then removes each message: when every recipient is delivered
        and nothing is owed, the removal is the record (no update first).
        """
        first, second = self.submit(BOB, CAROL), self.submit(DAVE)
        self.assertEqual(self.relay.calls, [])
        self.start()
        [call] = self.relay.calls
        self.assertTrue(call.many)
        self.assertEqual(call.queueIds, [first, second])
        self.assertEqual(self.spool.committed, {})
        for queueId in (first, second):
            ops = [op[:2] for op in self.operations() if op[1] == queueId]
            self.assertEqual(ops, [("remove", queueId)])

    def test_futureAndHeldAtStart(self) -> None:
        """At start a message waits for its next attempt; a held one is not tried."""
        later = self.submit(BOB)
        held = self.submit(CAROL)
        self.spool.update(attrs.evolve(self.spool.load(later), nextAttempt=START + 100))
        self.spool.update(attrs.evolve(self.spool.load(held), held=True))
        self.start()
        self.assertEqual(self.relay.calls, [])
        self.clock.advance(99)
        self.assertEqual(self.relay.calls, [])
        self.clock.advance(1)
        self.assertEqual([c.queueIds for c in self.relay.calls], [[later]])
        self.clock.advance(10 * DAY)
        self.assertEqual(len(self.relay.calls), 1)
        self.assertIn(held, self.spool.committed)

    def test_restartSendsOnlyPending(self) -> None:
        """
        After a restart, a new runner over the same spool tries only the
        recipients still pending, at their next attempt.
        """
        queueId = self.submit(BOB, CAROL)
        self.relay.script[str(BOB)] = [transient("450 4.2.0 busy")]
        runner = self.start()
        self.assertIsNone(self.successResultOf(runner.stopService()))
        self.assertEqual(self.statuses(queueId), {str(BOB): "pending", str(CAROL): "delivered"})

        self.start()
        self.clock.advance(299)
        self.assertEqual(len(self.relay.calls), 1)
        self.clock.advance(1)
        self.assertEqual(
            self.relay.attempts, [(queueId, str(BOB)), (queueId, str(CAROL)), (queueId, str(BOB))]
        )
        self.assertNotIn(queueId, self.spool.committed)

    def test_restartAfterCrashBeforeRemove(self) -> None:
        """A finished message left in the spool is removed, not sent again."""
        queueId = self.submit(BOB)
        done = self.spool.load(queueId).recipients[0].withResult(DeliveryResult(BOB, True), START)
        self.spool.update(attrs.evolve(self.spool.load(queueId), recipients=(done,)))
        self.start()
        self.assertEqual(self.relay.calls, [])
        self.assertEqual(self.spool.removed, [queueId])

    def test_retryAtBackoff(self) -> None:
        """A 4xx is retried at the backoff time, and not before."""
        queueId = self.submit(BOB)
        self.relay.script[str(BOB)] = [transient("450 4.2.0 busy")]
        self.start()
        message = self.spool.load(queueId)
        self.assertEqual(message.nextAttempt, START + 300)
        [bob] = message.recipients
        self.assertEqual(
            (bob.status, bob.attempts, bob.code, bob.enhanced, bob.diagnostic),
            (RecipientStatus.PENDING, 1, 450, "4.2.0", "busy"),
        )
        self.clock.advance(299.9)
        self.assertEqual(len(self.relay.calls), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.relay.calls), 2)
        self.assertNotIn(queueId, self.spool.committed)

    def test_backoffSequence(self) -> None:
        """Without jitter: 300, 600, 1200, 2400, then 3600 (retryMax) on."""
        queueId = self.submit(BOB)
        self.relay.script[str(BOB)] = [transient()] * 7
        self.start()
        for calls, delay in enumerate([300, 600, 1200, 2400, 3600, 3600], start=1):
            self.assertEqual(self.spool.load(queueId).nextAttempt - self.clock.seconds(), delay)
            self.clock.advance(delay - 1)
            self.assertEqual(len(self.relay.calls), calls)
            self.clock.advance(1)
            self.assertEqual(len(self.relay.calls), calls + 1)

    def test_backoffFunction(self) -> None:
        rng = random.Random(0)
        self.assertEqual(
            [backoff(n, CONFIG, rng) for n in range(1, 8)], [300, 600, 1200, 2400, 3600, 3600, 3600]
        )
        self.assertEqual(backoff(10_000, CONFIG, rng), 3600)

    def test_jitterBounds(self) -> None:
        """With jitter j every delay is within [1 - j, 1 + j] of the base, and varies."""
        config = attrs.evolve(CONFIG, retryJitter=0.1)
        rng = random.Random(7)
        for attempts, base in [(1, 300), (2, 600), (6, 3600)]:
            delays = [backoff(attempts, config, rng) for _ in range(500)]
            self.assertTrue(all(0.9 * base <= d <= 1.1 * base for d in delays), delays)
            self.assertGreater(max(delays) - min(delays), 0.1 * base)
        # The runner uses its rng: the same seed gives the same schedule.
        queueId = self.submit(BOB)
        self.relay.default = transient()
        self.start(attrs.evolve(NO_WARNING, retryJitter=0.1), rng=random.Random(7))
        delay = self.spool.load(queueId).nextAttempt - START
        self.assertAlmostEqual(delay, 300 * random.Random(7).uniform(0.9, 1.1), places=5)

    def test_relayWithoutDeliverMany(self) -> None:
        """A relay with only deliver() gets one call per message."""
        first, second = self.submit(BOB), self.submit(CAROL)
        self.start(relay=SingleRelay(self.relay))
        self.assertEqual(
            [(c.many, c.queueIds) for c in self.relay.calls], [(False, [first]), (False, [second])]
        )
        self.assertEqual(self.spool.committed, {})

    def test_relayFailure(self) -> None:
        """A relay Deferred that fails makes every recipient transient; logged."""
        queueId = self.submit(BOB, CAROL)
        self.relay.failNextCall(RuntimeError("boom"))
        self.start()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        message = self.spool.load(queueId)
        self.assertEqual([r.status for r in message.recipients], [RecipientStatus.PENDING] * 2)
        self.assertIn("boom", message.recipients[0].diagnostic)
        self.clock.advance(300)
        self.assertNotIn(queueId, self.spool.committed)

    def test_logLines(self) -> None:
        """One line per message outcome; never the message contents."""
        self.relay.script[str(BOB)] = [transient("450 4.2.0 busy\r\nInjected: x")]
        self.relay.script[str(DAVE)] = [permanent("550 5.1.1 unknown")]
        with capturedLogs() as events:
            queueId = self.submit(BOB, CAROL, DAVE)
            self.start()
        lines = [formatEvent(e) for e in events]
        [line] = [x for x in lines if x.startswith(f"Queue {queueId}: deferred")]
        self.assertIn(f"delivered: <{CAROL}>", line)
        self.assertIn(f"deferred until 2023-11-14T22:18:20+00:00: <{BOB}> (450 4.2.0 busy", line)
        self.assertIn(f"bounced: <{DAVE}> (550 5.1.1 unknown)", line)
        self.assertNotIn("\n", line)
        self.assertFalse([x for x in lines if "SECRET" in x])


class BounceTests(RunnerTestCase):
    def test_oneOfThreeBounces(self) -> None:
        """
        A 5xx for one of three recipients: the others are delivered, a bounce
        from <> to the sender is committed at once, and the message leaves
        the spool only when the last recipient is finished.
        """
        queueId = self.submit(BOB, CAROL, DAVE)
        self.relay.script[str(CAROL)] = [permanent("550 5.1.1 no such user")]
        self.relay.script[str(DAVE)] = [transient("451 4.4.1 no answer")]
        self.start()
        [bounce] = self.dsns()
        self.assertDSN(
            bounce,
            b"Undelivered Mail Returned to Sender",
            b"Final-Recipient: rfc822; carol@example.net",
            b"Status: 5.1.1",
            b"Subject: Lunch",
        )
        self.assertNotIn(b"bob@example.com", bytes(bounce.data))
        self.assertNotIn(b"dave@example.net", bytes(bounce.data))
        self.assertEqual(
            self.statuses(queueId),
            {str(BOB): "delivered", str(CAROL): "bounced", str(DAVE): "pending"},
        )
        # The bounce is itself queued and delivered at once, to the sender.
        self.assertEqual(self.relay.attempts[-1], (bounce.queueId, str(SENDER)))
        self.assertNotIn(bounce.queueId, self.spool.committed)
        self.clock.advance(300)
        self.assertEqual(self.relay.attempts[-1], (queueId, str(DAVE)))
        self.assertNotIn(queueId, self.spool.committed)
        self.assertEqual(len(self.dsns()), 1)

    def test_deleteDuringBounceCommit(self) -> None:
        """
        An operator's delete while the bounce is being committed: the
        message goes, and the committed bounce is still scheduled and sent
        (committing it scheduled it), not left in the spool until a restart.
        """
        queueId = self.submit(BOB)
        self.relay.script[str(BOB)] = [permanent()]
        self.spool.holdCommits = True
        runner = self.start()
        [(writer, _)] = self.spool.heldCommits
        self.successResultOf(runner.delete(queueId))
        self.spool.releaseCommits()
        self.assertNotIn(queueId, self.spool.committed)
        self.assertEqual(self.relay.attempts[-1], (writer.queueId, str(SENDER)))
        self.assertNotIn(writer.queueId, self.spool.committed)

    def test_bounceCommittedBeforeBouncedState(self) -> None:
        """
        The results are recorded first (with the recipient still pending);
        the state saying "bounced" is written only after the bounce commit.
        """
        queueId = self.submit(BOB, CAROL)
        self.relay.script[str(CAROL)] = [permanent()]
        self.relay.holdResults = True
        self.start()
        self.relay.releaseAll()
        updates = [op for op in self.spool.log if op[0] == "update" and op[1].queueId == queueId]
        first = {str(r.address): r.status.value for r in updates[0][1].recipients}
        self.assertEqual(first, {str(BOB): "delivered", str(CAROL): "pending"})
        self.assertEqual(updates[0][2], [])
        for _, message, bounces in updates:
            if RecipientStatus.BOUNCED in [r.status for r in message.recipients]:
                self.assertEqual(len(bounces), 1)

    def test_bounceCommitFailureRetried(self) -> None:
        """
        If the bounce cannot be committed, the recipient is not marked
        bounced, the message stays, and the bounce is tried again.
        """
        queueId = self.submit(BOB, CAROL)
        self.relay.script[str(CAROL)] = [permanent()]
        self.spool.failNextCommit()
        self.start()
        self.assertEqual(self.dsns(), [])
        self.assertEqual(self.statuses(queueId), {str(BOB): "delivered", str(CAROL): "pending"})
        self.assertEqual(self.spool.load(queueId).recipients[1].code, 550)
        self.assertEqual(self.spool.removed, [])
        self.clock.advance(RECORD_RETRY - 1)
        self.assertEqual(self.dsns(), [])
        self.clock.advance(1)
        [bounce] = self.dsns()
        self.assertIn(b"carol@example.net", bytes(bounce.data))
        self.assertNotIn(queueId, self.spool.committed)
        # Carol was never sent to again.
        self.assertEqual(
            [a for a in self.relay.attempts if a[0] == queueId],
            [(queueId, str(BOB)), (queueId, str(CAROL))],
        )

    def test_updateFailureRetried(self) -> None:
        """A spool update failure keeps the results in memory and records them later."""
        queueId = self.submit(BOB, CAROL)
        self.relay.script[str(CAROL)] = [transient("450 4.2.0 busy")]
        self.spool.failUpdates = 1
        self.start()
        self.assertEqual(self.statuses(queueId), {str(BOB): "pending", str(CAROL): "pending"})
        self.clock.advance(RECORD_RETRY)
        self.assertEqual(self.statuses(queueId), {str(BOB): "delivered", str(CAROL): "pending"})
        self.assertEqual(len(self.relay.calls), 1)  # not sent again

    def test_expired(self) -> None:
        """After maxLifetime, a pending recipient bounces as expired."""
        queueId = self.submit(BOB, CAROL)
        self.relay.script[str(BOB)] = [transient("451 4.4.1 no answer from host")] * 1000
        self.start()
        self.clock.pump([HOUR] * int(5 * 24 - 1))
        self.assertIn(queueId, self.spool.committed)
        self.assertEqual(self.dsns(), [])
        self.clock.pump([HOUR] * 2)
        [bounce] = self.dsns()
        self.assertDSN(
            bounce,
            b"Undelivered Mail Returned to Sender",
            b"bob@example.com",
            b"expired after 5 days in the queue",
            b"Status: 4.4.1",
        )
        self.assertNotIn(queueId, self.spool.committed)
        [last] = [op[1] for op in self.spool.log if op[0] == "update" and op[1].queueId == queueId][
            -1:
        ]
        bob = last.recipients[0]
        self.assertEqual(
            (bob.status, bob.code, bob.enhanced, bob.remote),
            (RecipientStatus.BOUNCED, 451, "4.4.1", "upstream.example"),
        )
        self.assertRegex(
            bob.diagnostic,
            r"^message expired after 5 days in the queue; "
            r"last error: no answer from host$",
        )

    def test_noBounceForBounce(self) -> None:
        """A bounce that bounces makes no bounce; it is logged and dropped."""
        queueId = self.submit(SENDER, sender=None)
        self.relay.script[str(SENDER)] = [permanent()]
        with capturedLogs() as events:
            self.start()
        self.assertEqual(self.dsns(), [self.spool.writers[0]])
        self.assertNotIn(queueId, self.spool.committed)
        self.assertTrue(any("could not be delivered" in formatEvent(e) for e in events))

    def test_failingBounceDroppedAfterBounceLifetime(self) -> None:
        """An undeliverable bounce is retried, then dropped after bounceLifetime."""
        queueId = self.submit(SENDER, sender=None)
        self.relay.default = transient()
        self.start(CONFIG)
        self.clock.pump([HOUR] * (2 * 24 - 1))
        self.assertIn(queueId, self.spool.committed)
        self.clock.pump([HOUR] * 2)
        self.assertNotIn(queueId, self.spool.committed)
        self.assertEqual(len(self.spool.writers), 1)  # no bounce, no warning

    def test_delayWarningOnce(self) -> None:
        """After delayWarning the sender is warned once; the message stays queued."""
        queueId = self.submit(BOB, CAROL)
        self.relay.script[str(BOB)] = [transient("451 4.4.1 no answer")] * 1000
        self.start(CONFIG)
        self.clock.pump([HOUR] * 3)
        self.assertEqual(self.dsns(), [])
        self.clock.pump([HOUR] * 2)
        [warning] = self.dsns()
        self.assertDSN(
            warning, b"Delayed Mail (still being retried)", b"Action: delayed", b"bob@example.com"
        )
        self.assertNotIn(b"carol@example.net", bytes(warning.data))
        self.assertTrue(self.spool.load(queueId).warned)
        self.clock.pump([HOUR] * 24)
        self.assertEqual(len(self.dsns()), 1)
        self.assertIn(queueId, self.spool.committed)

    def test_noWarningWhenOff(self) -> None:
        self.submit(BOB)
        self.relay.default = transient()
        self.start(NO_WARNING)
        self.clock.pump([HOUR] * 24)
        self.assertEqual(self.dsns(), [])


class ControlTests(RunnerTestCase):
    def deferred(self) -> tuple[QueueRunner, str]:
        """A started runner and a message waiting 300 s for its retry."""
        queueId = self.submit(BOB)
        self.relay.script[str(BOB)] = [transient()]
        return self.start(), queueId

    def test_commitSchedules(self) -> None:
        """
        Committing a message through the queue schedules it: it goes out at
        once, and its commit fires only after that, with nobody to notify
        the runner (a client gone at the final dot included).
        """
        runner = self.start()
        self.spool.holdCommits = True
        writer = runner.begin(Envelope(SENDER, (BOB,)), SESSION)
        writer.write(BODY)
        d = writer.commit()
        self.assertEqual(self.relay.calls, [])
        self.spool.releaseCommits()
        self.assertEqual(self.successResultOf(d), writer.queueId)
        self.assertEqual([c.queueIds for c in self.relay.calls], [[writer.queueId]])
        self.assertNotIn(writer.queueId, self.spool.committed)
        self.assertTrue(verifyObject(IMessageWriter, writer))

    def test_failedCommitNotScheduled(self) -> None:
        """A commit that fails (or is aborted) schedules nothing."""
        runner = self.start()
        self.spool.failNextCommit()
        writer = runner.begin(Envelope(SENDER, (BOB,)), SESSION)
        writer.write(BODY)
        self.failureResultOf(writer.commit(), SpoolError)
        self.spool.holdCommits = True
        writer = runner.begin(Envelope(SENDER, (BOB,)), SESSION)
        writer.write(BODY)
        d = writer.commit()
        writer.abort()
        self.spool.releaseCommits()
        self.failureResultOf(d, SpoolError)
        self.assertEqual(self.relay.calls, [])
        self.assertEqual(self.successResultOf(runner.flush()), 0)

    def test_unknownToTheQueue(self) -> None:
        """An id the queue does not hold is refused by every control command."""
        runner = self.start()
        for call in (runner.hold, runner.release, runner.delete):
            self.failureResultOf(call(UNKNOWN), KeyError)
        self.failureResultOf(runner.flush([UNKNOWN]), KeyError)

    def test_flushInFlight(self) -> None:
        """
        A flush during an attempt (or while its results are written) makes
        the message due as soon as that is done, not after its backoff.
        """
        queueId = self.submit(BOB)
        self.relay.script[str(BOB)] = [transient(), success()]
        self.relay.holdResults = True
        runner = self.start()
        self.assertEqual(self.successResultOf(runner.flush([queueId])), 1)
        self.relay.holdResults = False
        self.relay.releaseAll()
        self.assertEqual([c.queueIds for c in self.relay.calls], [[queueId], [queueId]])
        self.assertNotIn(queueId, self.spool.committed)

    def test_releaseInFlight(self) -> None:
        """A release during the attempt that followed a hold: tried again at once."""
        queueId = self.submit(BOB)
        self.relay.script[str(BOB)] = [transient(), success()]
        self.relay.holdResults = True
        runner = self.start()
        self.successResultOf(runner.hold(queueId))
        self.successResultOf(runner.release(queueId))
        self.relay.holdResults = False
        self.relay.releaseAll()
        self.assertEqual(len(self.relay.calls), 2)
        self.assertNotIn(queueId, self.spool.committed)

    def test_holdRelease(self) -> None:
        runner, queueId = self.deferred()
        self.assertIsNone(self.successResultOf(runner.hold(queueId)))
        self.assertTrue(self.spool.load(queueId).held)
        self.clock.advance(DAY)
        self.assertEqual(len(self.relay.calls), 1)
        self.assertIsNone(self.successResultOf(runner.release(queueId)))
        self.assertEqual(len(self.relay.calls), 2)
        self.assertNotIn(queueId, self.spool.committed)
        self.failureResultOf(runner.hold(UNKNOWN), KeyError)
        self.failureResultOf(runner.release(UNKNOWN), KeyError)

    def test_holdInFlight(self) -> None:
        """Hold during an attempt takes effect after it; the result is recorded."""
        queueId = self.submit(BOB, CAROL)
        self.relay.script[str(BOB)] = [transient()]
        self.relay.holdResults = True
        runner = self.start()
        self.successResultOf(runner.hold(queueId))
        self.relay.releaseAll()
        message = self.spool.load(queueId)
        self.assertTrue(message.held)
        self.assertEqual(self.statuses(queueId), {str(BOB): "pending", str(CAROL): "delivered"})
        self.clock.advance(DAY)
        self.assertEqual(len(self.relay.calls), 1)
        self.successResultOf(runner.release(queueId))
        self.assertEqual(self.relay.calls[-1].queueIds, [queueId])

    def test_flush(self) -> None:
        """flush makes every non-held message (or those listed) due now."""
        runner, first = self.deferred()
        self.relay.script[str(CAROL)] = [transient(), transient()]
        second = self.submitTo(runner, CAROL)
        self.assertEqual(len(self.relay.calls), 2)
        self.assertEqual(self.successResultOf(runner.flush([second])), 1)
        self.assertEqual(self.relay.calls[-1].queueIds, [second])
        self.successResultOf(runner.hold(first))
        self.assertEqual(self.successResultOf(runner.flush()), 1)
        self.assertEqual(self.relay.calls[-1].queueIds, [second])
        self.assertNotIn(second, self.spool.committed)
        self.assertEqual(self.successResultOf(runner.flush([first])), 0)
        self.failureResultOf(runner.flush([first, UNKNOWN]), KeyError)
        self.assertEqual(len(self.relay.calls), 4)

    def test_delete(self) -> None:
        """delete removes a message without a bounce; it is not tried again."""
        runner, queueId = self.deferred()
        self.assertIsNone(self.successResultOf(runner.delete(queueId)))
        self.assertNotIn(queueId, self.spool.committed)
        self.clock.advance(DAY)
        self.assertEqual(len(self.relay.calls), 1)
        self.assertEqual(self.dsns(), [])
        self.failureResultOf(runner.delete(queueId), KeyError)

    def test_deleteInFlight(self) -> None:
        """
        A message deleted in flight is removed once the attempt ends, its
        results ignored (no bounce); delete does not wait for that.
        """
        queueId = self.submit(BOB)
        self.relay.script[str(BOB)] = [permanent()]
        self.relay.holdResults = True
        runner = self.start()
        self.assertIsNone(self.successResultOf(runner.delete(queueId)))
        self.assertIn(queueId, self.spool.committed)
        self.relay.releaseAll()
        self.assertNotIn(queueId, self.spool.committed)
        self.assertEqual(self.dsns(), [])
        self.assertEqual([op for op in self.spool.log if op[0] == "update"], [])

    def test_limits(self) -> None:
        """At most maxInFlight messages in relay calls of at most batchSize."""
        ids = [self.submit(BOB) for _ in range(7)]
        self.relay.holdResults = True
        self.start(batchSize=2, maxInFlight=4)
        self.assertEqual([c.queueIds for c in self.relay.calls], [ids[0:2], ids[2:4]])
        self.assertEqual(self.clock.getDelayedCalls(), [])  # no busy timer while full
        self.relay.calls[0].fire()
        self.assertEqual(self.relay.calls[-1].queueIds, ids[4:6])
        self.assertEqual(len(self.relay.heldCalls), 2)
        self.relay.releaseAll()
        self.assertEqual(self.relay.calls[-1].queueIds, ids[6:])
        self.relay.releaseAll()
        self.assertEqual(self.spool.committed, {})

    def test_limitsWithoutDeliverMany(self) -> None:
        """Without deliverMany, a batch is batchSize deliver() calls."""
        ids = [self.submit(BOB) for _ in range(5)]
        self.relay.holdResults = True
        self.start(relay=SingleRelay(self.relay), batchSize=2, maxInFlight=2)
        self.assertEqual([c.queueIds for c in self.relay.calls], [[ids[0]], [ids[1]]])
        self.relay.calls[0].fire()
        # Recorded at once, but a call of one message waits for room for a
        # whole batch while another call is in flight.
        self.assertEqual(len(self.relay.calls), 2)
        self.relay.calls[1].fire()
        self.assertEqual(len(self.relay.calls), 4)

    def test_recordedAsReported(self) -> None:
        """
        Each message is recorded as soon as the relay reports it, while
        slower routes of the same call are still in flight, and its place
        goes to the next message due (no head-of-line blocking).
        """
        ids = [self.submit(BOB) for _ in range(3)]
        self.relay.holdResults = True
        self.start(batchSize=1, maxInFlight=2)
        self.assertEqual([c.queueIds for c in self.relay.calls], [ids[:1], ids[1:2]])
        call = self.relay.calls[0]
        self.relay.calls[1].fire()
        self.assertEqual(self.operations(), [("remove", ids[1])])
        self.assertNotIn(ids[1], self.spool.committed)
        self.assertEqual([c.queueIds for c in self.relay.calls][2:], [ids[2:]])
        call.fire()  # the slow one, at last
        self.assertEqual(self.operations()[-1], ("remove", ids[0]))

    def test_reportedWithinACall(self) -> None:
        """
        One call of several messages: each is recorded as the relay reports
        it, while the rest of the call is in flight; none twice.
        """
        ids = [self.submit(BOB) for _ in range(2)]
        self.relay.holdResults = True
        self.start()
        [call] = self.relay.calls
        call.reportOne(ids[1])
        self.assertEqual(self.operations(), [("remove", ids[1])])
        call.fire()
        self.assertEqual(self.operations(), [("remove", ids[1]), ("remove", ids[0])])

    def test_reportUnknownIgnored(self) -> None:
        """A report for an id not in the call, or a second one, changes nothing."""
        queueId = self.submit(BOB)
        self.relay.holdResults = True
        self.start()
        [call] = self.relay.calls
        call.report(UNKNOWN, [])  # type: ignore[misc]
        call.reportOne(queueId)
        call.report(queueId, [])  # type: ignore[misc]
        self.assertEqual(self.operations(), [("remove", queueId)])


class StopTests(RunnerTestCase):
    def test_stopWaitsForInFlight(self) -> None:
        """stopService fires once the attempts in flight are recorded."""
        queueId = self.submit(BOB)
        self.relay.holdResults = True
        runner = self.start()
        d = runner.stopService()
        self.assertNoResult(d)
        self.relay.releaseAll()
        self.assertIsNone(self.successResultOf(d))
        self.assertNotIn(queueId, self.spool.committed)

    def test_stopBounded(self) -> None:
        """stopService does not wait for ever."""
        self.submit(BOB)
        self.relay.holdResults = True
        runner = self.start()
        d = runner.stopService()
        self.clock.advance(STOP_TIMEOUT - 1)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.assertIsNone(self.successResultOf(d))

    def test_stopStopsScheduling(self) -> None:
        queueId = self.submit(BOB)
        self.relay.script[str(BOB)] = [transient()]
        runner = self.start()
        self.successResultOf(runner.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(DAY)
        self.assertEqual(len(self.relay.calls), 1)
        self.assertIn(queueId, self.spool.committed)


class SlowSpoolTests(RunnerTestCase):
    """Operator actions while results are being written (the real spool is async)."""

    def setUp(self) -> None:
        super().setUp()
        self.queueId = self.submit(BOB, CAROL)
        self.relay.script[str(CAROL)] = [permanent()]
        self.spool.holdUpdates = True
        self.runner = self.start()

    def test_deleteWhileRecording(self) -> None:
        """Delete while the results are written: no bounce, message removed."""
        self.successResultOf(self.runner.delete(self.queueId))
        self.assertIn(self.queueId, self.spool.committed)
        self.spool.releaseUpdates()
        self.assertNotIn(self.queueId, self.spool.committed)
        self.assertEqual(self.dsns(), [])

    def test_holdWhileRecording(self) -> None:
        """A hold while the results are written is kept by the later writes."""
        d = self.runner.hold(self.queueId)
        self.spool.releaseUpdates()
        self.successResultOf(d)
        self.assertEqual(len(self.dsns()), 1)
        self.assertNotIn(self.queueId, self.spool.committed)  # finished: removed all the same
        updates = [op[1] for op in self.spool.log if op[0] == "update"]
        mine = [m.held for m in updates if m.queueId == self.queueId]
        self.assertEqual(mine, [False, True, True])

    def test_stopWaitsForRecording(self) -> None:
        d = self.runner.stopService()
        self.assertNoResult(d)
        self.spool.releaseUpdates()
        self.successResultOf(d)
        self.assertNotIn(self.queueId, self.spool.committed)


class RemoveRaceTests(RunnerTestCase):
    """Operator actions racing the runner's removal of a finished message."""

    def setUp(self) -> None:
        super().setUp()
        self.queueId = self.submit(BOB)
        self.spool.holdChanges = True
        self.runner = self.start()
        # Delivered: the removal is asked for, not yet done.
        self.assertEqual([k for k, _, _ in self.spool.heldChanges], ["remove"])

    def test_holdRacingRemoval(self) -> None:
        """
        A hold asked for while the removal is under way fails as for an
        unknown message, and nothing comes back: no ghost to schedule.
        """
        held = self.runner.hold(self.queueId)
        self.spool.releaseChanges()
        self.failureResultOf(held, KeyError)
        self.assertNotIn(self.queueId, self.spool.committed)
        self.assertEqual(self.successResultOf(self.runner.flush()), 0)
        self.failureResultOf(self.runner.flush([self.queueId]), KeyError)
        self.clock.advance(DAY)
        self.assertEqual(len(self.relay.calls), 1)

    def test_releaseRacingRemoval(self) -> None:
        """A release during the removal does not send the message again."""
        released = self.runner.release(self.queueId)
        self.spool.releaseChanges()
        self.failureResultOf(released, KeyError)
        self.clock.advance(DAY)
        self.assertEqual(len(self.relay.calls), 1)
        self.failureResultOf(self.runner.hold(self.queueId), KeyError)


class FileSpoolTests(SynchronousTestCase):
    """With the real file spool, across a restart of spool and runner."""

    def test_restart(self) -> None:
        clock = Clock()
        clock.advance(START)
        directory = self.mktemp()
        spool = Spool(directory, clock, maybeDeferred)
        writer = spool.begin(Envelope(SENDER, (BOB, CAROL, DAVE)), SESSION)
        writer.write(BODY)
        queueId = self.successResultOf(writer.commit())
        relay = FakeRelay()
        relay.script[str(BOB)] = [transient("450 4.2.0 busy")]
        relay.script[str(CAROL)] = [permanent("550 5.1.1 no such user")]
        relay.script[str(SENDER)] = [transient()]  # the bounce waits in the spool
        runner = QueueRunner(spool, relay, clock, NO_WARNING, "mail.example.org")
        runner.startService()
        self.successResultOf(runner.stopService())
        spool.close()

        [bounce, message] = sorted(SpoolReader(directory).pending(), key=lambda m: m.isBounce)[::-1]
        self.assertEqual((bounce.envelope.sender, bounce.envelope.recipients), (None, (SENDER,)))
        self.assertEqual(
            [r.status.value for r in message.recipients], ["pending", "bounced", "delivered"]
        )

        spool = Spool(directory, clock, maybeDeferred)
        self.addCleanup(spool.close)
        runner = QueueRunner(spool, relay, clock, NO_WARNING, "mail.example.org")
        runner.startService()
        clock.advance(300)
        self.assertEqual(spool.pending(), [])
        self.assertEqual(relay.attempts[4:], [(queueId, str(BOB)), (bounce.queueId, str(SENDER))])
        self.successResultOf(runner.stopService())
