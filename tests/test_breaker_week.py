"""
The breaker over a week of one user's generated traffic
(L{tests.breakertraffic}), replayed on a Clock through the real queue
(L{QueueRunner} over a L{MemorySpool}, relayed by a L{FakeRelay}): it never
trips on the normal week, and trips within the first minute of a takeover
burst; the burst's mail after the trip is held (not relayed, not lost),
``release-account`` relays it, reset re-arms the account.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from mailgw.breaker.breaker import AccountBreaker
from mailgw.breaker.config import BreakerConfig
from mailgw.breaker.control import accountCommand
from mailgw.config import QueueConfig
from mailgw.envelope import Envelope, Session, splitAddress
from mailgw.queue.runner import QueueRunner
from mailgw.testing import FakeRelay, MemorySpool, permanent
from tests.breakertraffic import DAY, GONE, HOUR, MONDAY, USER, Login, Message, takeover, week

BODY = b"From: alice@example.com\r\nSubject: hello\r\n\r\nsee you\r\n"


class Gateway:
    """The queue, the relay and the breaker, driven like the sessions would."""

    def __init__(self, config: BreakerConfig | None = None) -> None:
        self.clock = Clock()
        self.clock.advance(MONDAY)
        self.spool = MemorySpool(clock=self.clock)
        self.relay = FakeRelay()
        for address in GONE:
            self.relay.script[address] = [permanent()] * 1000
        self.runner = QueueRunner(
            self.spool, self.relay, self.clock, QueueConfig(retryJitter=0), "mx.example.com"
        )
        self.breaker = AccountBreaker(self.clock, config or BreakerConfig())
        self.runner.screen, self.runner.bounced = self.breaker.screen, self.breaker.bounced
        self.runner.startService()
        self.refused: set[str] = set()
        self.submitted: list[tuple[float, str, Message]] = []

    def replay(self, events: list[Login | Message]) -> None:
        for event in events:
            self.clock.advance(max(0.0, event.when - self.clock.seconds()))
            if isinstance(event, Login):
                if not self.breaker.observeLogin(USER, event.client):
                    self.refused.add(event.client)  # 454 4.7.0: the session sends nothing
            elif event.client not in self.refused:
                self.submit(event)

    def submit(self, event: Message) -> str:
        envelope = Envelope(splitAddress(USER), tuple(map(splitAddress, event.recipients)))
        session = Session(event.client, 50000, "client", USER, "TLSv1.3", listener="submission")
        writer = self.runner.begin(envelope, session)
        writer.write(BODY)
        queueId: str = self.successResultOf(writer.commit())
        self.submitted.append((self.clock.seconds(), queueId, event))
        return queueId

    def successResultOf(self, d: Any) -> Any:
        results: list[Any] = []
        d.addBoth(results.append)
        [result] = results
        return result

    def relayedIds(self) -> set[str]:
        return {queueId for queueId, _ in self.relay.attempts}


class WeekTests(SynchronousTestCase):
    def test_normalWeekNeverTrips(self) -> None:
        gateway = Gateway()
        events = week()
        with capturedLogs() as logged:
            gateway.replay(events)
        self.assertEqual([formatEvent(e) for e in logged if "breaker" in formatEvent(e)], [])
        self.assertFalse(gateway.breaker.isTripped(USER))
        messages = [e for e in events if isinstance(e, Message)]
        self.assertEqual(len(gateway.submitted), len(messages))
        # Every message was relayed, none held; the two gone contacts bounced.
        submitted = {queueId for _, queueId, _ in gateway.submitted}
        self.assertEqual(gateway.relayedIds() & submitted, submitted)
        self.assertEqual(gateway.runner.heldOf(USER), [])
        state = gateway.breaker.state(USER)
        assert state is not None
        figures = state["figures"]
        print(f"\nthe week: {len(messages)} messages, baseline {figures}")
        self.assertGreaterEqual(figures["history"], 20)  # past the new-account ceilings
        account = gateway.breaker.accounts[USER]
        self.assertGreater(account.current.bounces + sum(h.bounces for h in account.history), 0)

    def burst(self, **kwargs: Any) -> tuple[Gateway, float, list[str], list[str]]:
        """The week, then a takeover a day later at 03:00; (gateway, start, before, after)."""
        gateway = Gateway()
        gateway.replay(week())
        start = MONDAY + 8 * DAY + 3 * HOUR
        gateway.replay(takeover(start, **kwargs))
        trip = gateway.breaker.state(USER)["trip"]  # type: ignore[index]
        self.assertIsNotNone(trip)
        tripped = trip["timestamp"]
        print(f"\ntripped {tripped - start:.1f} s into the burst: {trip['text']}")
        self.assertLess(tripped - start, 60.0)
        burst = [(t, q) for t, q, _ in gateway.submitted if t >= start]
        before = [q for t, q in burst if t < tripped]
        after = [q for t, q in burst if t >= tripped]
        return gateway, tripped, before, after

    def test_takeoverFromManyNetworks(self) -> None:
        gateway, tripped, before, after = self.burst()
        # The botnet's logins tripped it before its first message.
        trip = gateway.breaker.state(USER)["trip"]  # type: ignore[index]
        self.assertEqual(trip["rule"], "networks")
        self.assertEqual(before, [])
        self.assertGreater(len(after), 100)
        self.assertGreater(len(gateway.refused), 20)
        self.checkHeld(gateway, after)
        self.checkRelease(gateway, after)

    def test_takeoverFromOneNetwork(self) -> None:
        gateway, tripped, before, after = self.burst(networks=1, perSecond=5)
        trip = gateway.breaker.state(USER)["trip"]  # type: ignore[index]
        print(f"relayed before the trip: {len(before)}, held: {len(after)}")
        self.assertEqual(trip["rule"], "domains")
        self.assertLessEqual(len(before), 4)
        self.assertGreater(len(after), 100)
        self.checkHeld(gateway, after)
        self.checkRelease(gateway, after)

    def checkHeld(self, gateway: Gateway, held: list[str]) -> None:
        # In the queue, held; never tried; nothing lost.
        for queueId in held:
            message, _ = gateway.spool.committed[queueId]
            self.assertTrue(message.held, queueId)
        self.assertEqual(gateway.relayedIds() & set(held), set())
        self.assertEqual(gateway.runner.heldOf(USER), held)
        gateway.clock.advance(2 * DAY)  # the queue's retries come and go: still held
        self.assertEqual(gateway.relayedIds() & set(held), set())
        self.assertEqual(gateway.breaker.state(USER)["held"], len(held))  # type: ignore[index]

    def checkRelease(self, gateway: Gateway, held: list[str]) -> None:
        answer = gateway.successResultOf(
            accountCommand(gateway.breaker, gateway.runner, "release-account", [USER])
        )
        self.assertEqual(answer, {"ok": True, "count": len(held), "ids": held})
        self.assertEqual(gateway.relayedIds() & set(held), set(held))
        for queueId in held:
            self.assertNotIn(queueId, gateway.spool.committed)  # delivered and removed
        # Still tripped: logins refused, new mail held, until the reset.
        self.assertFalse(gateway.breaker.observeLogin(USER, "203.0.113.10"))
        late = gateway.submit(Message(gateway.clock.seconds(), "203.0.113.10", ("p1@d1.example",)))
        self.assertNotIn(late, gateway.relayedIds())
        answer = gateway.successResultOf(
            accountCommand(gateway.breaker, gateway.runner, "account-reset", [USER])
        )
        self.assertEqual(answer, {"ok": True, "count": 1, "wasTripped": True})
        self.assertTrue(gateway.breaker.observeLogin(USER, "203.0.113.10"))
        normal = gateway.submit(
            Message(gateway.clock.seconds(), "203.0.113.10", ("p1@d1.example",))
        )
        self.assertIn(normal, gateway.relayedIds())
        # Re-armed: the same takeover trips it again.
        gateway.refused.clear()
        gateway.replay(takeover(gateway.clock.seconds() + 60, seed=7, minutes=1))
        self.assertTrue(gateway.breaker.isTripped(USER))
