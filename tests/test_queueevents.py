"""
The queue's message events (mailgw.queue.events): delivered, deferred,
bounced after each attempt and held by the operator, as the webhooks send
them (through L{RecordingWebhooks}), in memory.
"""

from __future__ import annotations

from typing import Any

from mailgw.queue.events import WebhookObserver
from mailgw.queue.runner import QueueRunner
from mailgw.testing import RecordingWebhooks, permanent, transient
from tests.test_runner import BOB, CAROL, DAVE, HOUR, RunnerTestCase


class MessageWebhookTests(RunnerTestCase):
    def started(self) -> tuple[QueueRunner, RecordingWebhooks]:
        runner = self.start()
        hooks = RecordingWebhooks()
        runner.events.add(WebhookObserver(hooks))
        return runner, hooks

    def test_deliveredDeferredBounced(self) -> None:
        runner, hooks = self.started()
        self.relay.script[str(BOB)] = [transient("450 4.2.0 busy")]
        self.relay.script[str(DAVE)] = [permanent("550 5.1.1 unknown user")]
        queueId = self.submitTo(runner, BOB, CAROL, DAVE)
        ours = [(name, p) for name, p in hooks.events if p["queueId"] == queueId]
        # One event per kind, in the order of the recipients; then the
        # bounce (a message of its own) is delivered to Alice.
        self.assertEqual(
            [name for name, _ in ours],
            ["message.deferred", "message.delivered", "message.bounced"],
        )
        self.assertEqual(hooks.events[-1][1]["recipients"][0]["address"], "alice@example.org")
        deferred, delivered, bounced = (payload for _, payload in ours)
        for payload in (delivered, deferred, bounced):
            self.assertEqual(payload["queueId"], queueId)
            self.assertEqual(payload["sender"], "alice@example.org")
            self.assertEqual(payload["account"], "alice")
            self.assertEqual(payload["attempts"], 1)
        self.assertEqual([r["address"] for r in delivered["recipients"]], [str(CAROL)])
        self.assertEqual(delivered["recipients"][0]["status"], "delivered")
        [bob] = deferred["recipients"]
        self.assertEqual((bob["address"], bob["status"]), (str(BOB), "pending"))
        self.assertEqual(bob["reply"], "450 4.2.0 busy")
        self.assertIn("nextAttempt", deferred)
        [dave] = bounced["recipients"]
        self.assertEqual(
            (dave["status"], dave["code"], dave["enhanced"]), ("bounced", 550, "5.1.1")
        )
        # The retry delivers Bob: one more event, attempt 2.
        self.clock.advance(HOUR)
        name, payload = hooks.events[-1]
        self.assertEqual(name, "message.delivered")
        self.assertEqual([r["address"] for r in payload["recipients"]], [str(BOB)])
        self.assertEqual(payload["attempts"], 2)

    def test_heldByTheOperator(self) -> None:
        runner, hooks = self.started()
        self.relay.script[str(BOB)] = [transient()]
        queueId = self.submitTo(runner, BOB)
        hooks.events.clear()
        self.successResultOf(runner.hold(queueId))
        self.successResultOf(runner.hold(queueId))  # already held: no second event
        [held] = hooks.named("message.held")
        self.assertEqual(len(hooks.events), 1)
        self.assertEqual(
            (held["queueId"], held["reason"], held["held"]), (queueId, "operator", True)
        )
        self.assertEqual([r["address"] for r in held["recipients"]], [str(BOB)])

    def test_observerFailureIsContained(self) -> None:
        runner, hooks = self.started()

        def broken(*args: Any) -> None:
            raise RuntimeError("observer bug")

        runner.events.observers.insert(0, broken)
        queueId = self.submitTo(runner, BOB)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(hooks.named("message.delivered")[0]["queueId"], queueId)
        self.assertEqual(runner.messages(), [])
