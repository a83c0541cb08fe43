"""
Tests for L{mailgw.breaker.breaker}, L{mailgw.breaker.alerts} and
L{mailgw.breaker.store}: a trip and what it does (held messages, refused
logins, one log line, the admin message, the webhook payload), reset, and
the state file (atomic, survives a restart, a corrupt file never crashes).
"""

from __future__ import annotations

import json
import os
from typing import Any

import attrs
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailgw.breaker.alerts import AdminMessageAlert, WebhookAlert
from mailgw.breaker.breaker import AccountBreaker
from mailgw.breaker.build import makeBreaker
from mailgw.breaker.config import BreakerConfig
from mailgw.breaker.store import STATE_NAME, PersistentBreaker, StateFile
from mailgw.envelope import Address
from mailgw.interfaces import IAccountBreaker, IBreakerAlert
from mailgw.queue.spool import SpoolReader
from mailgw.testing import MemorySpool

START = 1_700_000_000.0
USER = "alice@example.com"
CONFIG = BreakerConfig(newAccountNetworks=2, newAccountMessages=5)


@attrs.define
class FakeSender:
    """Stands in for L{mailgw.webhooks.WebhookSender}: records what is sent."""

    calls: list[tuple[str, dict[str, Any]]] = attrs.field(factory=list)

    def send(self, event: str, payload: dict[str, Any]) -> None:
        self.calls.append((event, payload))


@attrs.define
class FakeQueue:
    """An IQueue over a MemorySpool, for the admin message."""

    spool: MemorySpool = attrs.field(factory=MemorySpool)

    def begin(self, envelope: Any, session: Any) -> Any:
        return self.spool.begin(envelope, session)


def runNow(f: Any, *args: Any) -> Any:
    return maybeDeferred(f, *args)


class BreakerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.sender = FakeSender()
        self.queue = FakeQueue()
        self.breaker = AccountBreaker(
            self.clock,
            CONFIG,
            [
                WebhookAlert(self.sender),
                AdminMessageAlert(self.queue, "abuse@example.com", "mx.example.com", self.clock),
            ],
        )

    def test_interfaces(self) -> None:
        verifyObject(IAccountBreaker, self.breaker)
        verifyObject(IAccountBreaker, PersistentBreaker(self.clock, CONFIG, ".", runNow))
        for alert in self.breaker.alerts:
            verifyObject(IBreakerAlert, alert)

    def trip(self) -> list[str]:
        with capturedLogs() as events:
            for i in range(5):
                self.clock.advance(1)
                self.assertFalse(self.breaker.observeMessage(USER, ["x@a.example"], "192.0.2.7",
                                                             f"Q{i}"))  # fmt: skip
            self.assertFalse(self.breaker.isTripped(USER))
            self.clock.advance(1)
            self.assertTrue(self.breaker.observeMessage(USER, ["y@b.example"], "192.0.2.7", "Q5"))
        return [formatEvent(e) for e in events]

    def test_tripHoldsAndAlerts(self) -> None:
        lines = self.trip()
        self.assertTrue(self.breaker.isTripped(USER))
        [line] = [x for x in lines if x.startswith("breaker tripped")]
        self.assertEqual(
            line,
            "breaker tripped user='alice@example.com' rule=messages value=6 threshold=5 "
            "client=192.0.2.7 queueId=Q5 action=hold-and-refuse: messages: 6 messages in the "
            "last hour > 5 (the ceiling of an account with 0 of 20 hours of history)",
        )
        # The webhook got the payload, JSON-able.
        [(event, payload)] = self.sender.calls
        self.assertEqual(event, "account.tripped")
        self.assertEqual(json.loads(json.dumps(payload)), payload)
        self.assertEqual(
            {k: payload[k] for k in ("account", "rule", "value", "threshold", "client", "queueId",
                                     "action", "time", "timestamp")},  # fmt: skip
            {
                "account": USER, "rule": "messages", "value": 6, "threshold": 5.0,
                "client": "192.0.2.7", "queueId": "Q5", "action": "hold-and-refuse",
                "time": "2023-11-14T22:13:26+00:00", "timestamp": START + 6,
            },
        )  # fmt: skip
        self.assertEqual(payload["figures"]["messages"], 6)
        # The admin's message is in the queue, from <>.
        [(message, data)] = self.queue.spool.committed.values()
        self.assertIsNone(message.envelope.sender)
        self.assertEqual(message.envelope.recipients, (Address("abuse", "example.com"),))
        self.assertIsNone(message.session.user)
        self.assertIn(b"Subject: mailgw: account alice@example.com stopped by the breaker "
                      b"(messages)\r\n", data)  # fmt: skip
        self.assertIn(b"mailgw queue release --account alice@example.com", data)
        # Every later message is held; the trip is announced once.
        self.assertTrue(self.breaker.observeMessage(USER, ["z@c.example"], "192.0.2.7", "Q6"))
        self.assertEqual(len(self.sender.calls), 1)
        self.assertEqual(self.breaker.state(USER)["held"], 2)  # type: ignore[index]

    def test_loginsRefusedAfterTrip(self) -> None:
        self.assertTrue(self.breaker.observeLogin(USER, "192.0.2.7"))
        self.trip()
        with capturedLogs() as events:
            self.assertFalse(self.breaker.observeLogin(USER, "192.0.2.7"))
        self.assertIn(
            "breaker: login refused user='alice@example.com' client=192.0.2.7 (tripped by "
            "messages)",
            [formatEvent(e) for e in events],
        )

    def test_holdOnly(self) -> None:
        self.breaker.config = attrs.evolve(CONFIG, onTrip="hold")
        self.trip()
        self.assertTrue(self.breaker.observeLogin(USER, "192.0.2.7"))
        self.assertTrue(self.breaker.observeMessage(USER, ["z@c.example"], "192.0.2.7", "Q6"))

    def test_networksTripOnLogin(self) -> None:
        # A new account may use 2 networks in an hour; the third login's network trips.
        self.assertTrue(self.breaker.observeLogin(USER, "192.0.2.7"))
        self.assertTrue(self.breaker.observeLogin(USER, "198.51.100.7"))
        self.assertTrue(self.breaker.observeLogin(USER, "198.51.100.8"))  # same /24
        self.assertFalse(self.breaker.observeLogin(USER, "203.0.113.9"))
        trip = self.breaker.state(USER)["trip"]  # type: ignore[index]
        self.assertEqual((trip["rule"], trip["client"], trip["queueId"]),
                         ("networks", "203.0.113.9", None))  # fmt: skip

    def test_bouncesTrip(self) -> None:
        breaker = AccountBreaker(self.clock, attrs.evolve(CONFIG, newAccountMessages=50))
        breaker.observeMessage(USER, [f"r{i}@x.example" for i in range(30)], "192.0.2.7", "Q1")
        breaker.observeBounces(USER, 6, "Q1")
        self.assertFalse(breaker.isTripped(USER))  # 6 < 10 bounces
        breaker.observeBounces(USER, 4, "Q1")
        trip = breaker.state(USER)["trip"]  # type: ignore[index]
        self.assertEqual((trip["rule"], trip["value"], trip["queueId"]), ("bounces", 0.3333, "Q1"))

    def test_reset(self) -> None:
        self.trip()
        self.assertTrue(self.breaker.reset(USER))
        self.assertFalse(self.breaker.isTripped(USER))
        self.assertTrue(self.breaker.observeLogin(USER, "192.0.2.7"))
        self.assertFalse(self.breaker.observeMessage(USER, ["x@a.example"], "192.0.2.7", "Q9"))
        self.assertFalse(self.breaker.reset(USER))
        self.assertRaises(KeyError, self.breaker.reset, "nobody")
        self.assertIsNone(self.breaker.state("nobody"))

    def test_alertFailureIsLogged(self) -> None:
        class Broken:
            def send(self, event: str, payload: dict[str, Any]) -> None:
                raise RuntimeError("receiver down")

        self.breaker.alerts[1] = WebhookAlert(Broken())
        with capturedLogs() as events:
            self.trip()
        self.assertTrue(self.breaker.isTripped(USER))
        self.assertTrue(any("the webhook for 'alice@example.com' failed" in formatEvent(e)
                            for e in events))  # fmt: skip
        self.assertEqual(len(self.queue.spool.committed), 1)  # the next alert still went
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_expiry(self) -> None:
        self.breaker.observeLogin("old@example.com", "192.0.2.7")
        self.clock.advance(CONFIG.forgetAfter + 1)
        self.breaker.observeLogin(USER, "192.0.2.7")
        self.assertEqual(self.breaker.expire(), 1)
        self.assertEqual(list(self.breaker.accounts), [USER])

    def test_maxAccounts(self) -> None:
        breaker = AccountBreaker(self.clock, attrs.evolve(CONFIG, maxAccounts=3))
        for i in range(10):
            self.clock.advance(1)
            breaker.observeLogin(f"u{i}", "192.0.2.7")
        self.assertLessEqual(len(breaker.accounts), 3)
        self.assertIn("u9", breaker.accounts)

    def test_build(self) -> None:
        off = makeBreaker(attrs.evolve(CONFIG, enabled=False), self.clock, self.queue, "h",
                          None, None)  # fmt: skip
        self.assertIsNone(off)
        memory = makeBreaker(CONFIG, self.clock, self.queue, "h", None, None)
        self.assertIs(type(memory), AccountBreaker)
        assert memory is not None
        self.assertEqual(len(memory.alerts), 1)  # the log line only
        config = attrs.evolve(CONFIG, adminAddress="abuse@example.com", webhook=True)
        with capturedLogs() as events:
            noSender = makeBreaker(config, self.clock, self.queue, "h", ".", runNow)
        assert noSender is not None
        self.assertIsInstance(noSender, PersistentBreaker)
        self.assertEqual(len(noSender.alerts), 2)
        self.assertIn("breaker: webhook = true, but this gateway has no webhook sender",
                      [formatEvent(e) for e in events])  # fmt: skip
        full = makeBreaker(config, self.clock, self.queue, "h", ".", runNow, FakeSender())
        assert full is not None
        self.assertEqual(len(full.alerts), 3)


class StoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.clock = Clock()
        self.clock.advance(START)

    def breaker(self, config: BreakerConfig = CONFIG) -> PersistentBreaker:
        breaker = PersistentBreaker(self.clock, config, self.directory, runNow)
        breaker.startService()
        return breaker

    def stored(self) -> dict[str, Any]:
        with open(os.path.join(self.directory, STATE_NAME)) as f:
            return json.load(f)  # type: ignore[no-any-return]

    def test_survivesRestart(self) -> None:
        breaker = self.breaker()
        for i in range(6):
            breaker.observeMessage(USER, [f"r@d{i}.example"], "192.0.2.7", f"Q{i}")
        self.assertTrue(breaker.isTripped(USER))
        # A trip is written at once.
        self.assertEqual(self.stored()["accounts"][USER]["trip"]["rule"], "messages")
        self.assertEqual(os.stat(os.path.join(self.directory, STATE_NAME)).st_mode & 0o777, 0o600)
        self.successResultOf(breaker.stopService())
        again = self.breaker()
        self.assertTrue(again.isTripped(USER))
        self.assertFalse(again.observeLogin(USER, "192.0.2.7"))
        self.assertEqual(len(again.accounts[USER].domains), 6)
        again.reset(USER)
        self.successResultOf(again.stopService())
        self.assertFalse(self.breaker().isTripped(USER))

    def test_savedAfterTheInterval(self) -> None:
        breaker = self.breaker()
        breaker.observeLogin(USER, "192.0.2.7")
        self.assertFalse(os.path.exists(os.path.join(self.directory, STATE_NAME)))
        self.clock.advance(CONFIG.saveInterval)
        self.assertEqual(self.stored()["accounts"][USER]["networks"],
                         {"192.0.2.0/24": [START, START]})  # fmt: skip
        self.assertEqual(self.stored()["version"], 1)

    def test_corruptFile(self) -> None:
        path = os.path.join(self.directory, STATE_NAME)
        for junk in (b"{not json", b"[1, 2]", b'{"version": 99, "accounts": {}}', b"\xff\xfe"):
            with open(path, "wb") as f:
                f.write(junk)
            with capturedLogs() as events:
                breaker = self.breaker()
            [line] = [formatEvent(e) for e in events if "unreadable" in formatEvent(e)]
            self.assertIn(f"breaker: state file {path} unreadable", line)
            self.assertIn(f"kept as {path}.corrupt; starting with a fresh state", line)
            self.assertEqual(breaker.accounts, {})
            with open(path + ".corrupt", "rb") as f:
                self.assertEqual(f.read(), junk)
            self.assertTrue(breaker.observeLogin(USER, "192.0.2.7"))
            self.successResultOf(breaker.stopService())
            self.assertIn(USER, self.stored()["accounts"])

    def test_badAccountSkipped(self) -> None:
        StateFile(os.path.join(self.directory, STATE_NAME)).write(
            {"bob": {"firstSeen": "soon"}, USER: {"firstSeen": START, "lastSeen": START}}
        )
        with capturedLogs() as events:
            breaker = self.breaker()
        self.assertEqual(list(breaker.accounts), [USER])
        self.assertTrue(any("stored state of 'bob' unreadable" in formatEvent(e) for e in events))

    def test_writeFailureLoggedAndRetried(self) -> None:
        breaker = self.breaker()
        # A directory in the way of the temporary file: the write fails (as root too).
        blocker = os.path.join(self.directory, STATE_NAME + ".tmp")
        os.mkdir(blocker)
        with capturedLogs() as events:
            breaker.observeLogin(USER, "192.0.2.7")
            breaker.changed(USER, True)
        self.assertTrue(any("breaker: cannot write" in formatEvent(e) for e in events))
        self.assertFalse(os.path.exists(os.path.join(self.directory, STATE_NAME)))
        os.rmdir(blocker)
        self.successResultOf(breaker.stopService())  # still owed: written at the stop
        self.assertIn(USER, self.stored()["accounts"])

    def test_spoolUntouched(self) -> None:
        # The state file sits beside the queue, and the spool ignores it.
        os.makedirs(os.path.join(self.directory, "queue"))
        breaker = self.breaker()
        breaker.observeLogin(USER, "192.0.2.7")
        self.successResultOf(breaker.stopService())
        self.assertEqual(SpoolReader(self.directory).pending(), [])


class ReloadTests(SynchronousTestCase):
    def test_restartOnly(self) -> None:
        from mailgw.config import Config
        from mailgw.reloading import restartOnly

        changed = Config(breaker=attrs.evolve(CONFIG, messagesFactor=5.0))
        self.assertEqual(restartOnly(Config(breaker=CONFIG), changed), ["breaker"])
