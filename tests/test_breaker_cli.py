"""
Tests for ``mailgw account show|reset`` and ``mailgw queue release
--account`` while the gateway is stopped (the state file and the spool
themselves), and for the account commands of the control socket
(L{mailgw.breaker.control}); the running gateway's side is in
tests/integration/test_breaker.py.
"""

from __future__ import annotations

import io
import json
import os
import sys
from typing import Any

import attrs
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailgw.breaker.breaker import AccountBreaker
from mailgw.breaker.config import BreakerConfig
from mailgw.breaker.store import STATE_NAME, PersistentBreaker
from mailgw.cli import app
from mailgw.cli import queue as queuecli
from mailgw.control import handleRequest
from mailgw.envelope import Envelope, Session, splitAddress
from mailgw.queue.spool import Spool, SpoolReader

NOW = 1_700_000_000.0
USER = "alice@example.com"
CONFIG = BreakerConfig(newAccountNetworks=1)


def runNow(f: Any, *args: Any) -> Any:
    return maybeDeferred(f, *args)


def resultOf(d: Any) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    return results[0]


class StoppedGatewayTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.patch(queuecli, "_now", lambda: NOW + 60)
        self.stdout, self.stderr = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", self.stdout)
        self.patch(sys, "stderr", self.stderr)
        self.directory = self.mktemp()
        clock = Clock()
        clock.advance(NOW)
        spool = Spool(self.directory, clock, runNow)
        self.ids = {}
        for user in (USER, "bob@example.com", USER):
            writer = spool.begin(
                Envelope(splitAddress(user), (splitAddress("x@example.org"),)),
                Session("192.0.2.7", user=user),
            )
            writer.write(b"Subject: x\r\n\r\nx\r\n")
            queueId = resultOf(writer.commit())
            resultOf(spool.update(attrs.evolve(writer.message, held=True)))
            self.ids.setdefault(user, []).append(queueId)
        spool.close()
        breaker = PersistentBreaker(clock, CONFIG, self.directory, runNow)
        breaker.startService()
        breaker.observeLogin(USER, "192.0.2.7")
        breaker.observeLogin(USER, "198.51.100.7")
        breaker.observeLogin("bob@example.com", "192.0.2.7")
        self.assertTrue(breaker.isTripped(USER))
        resultOf(breaker.stopService())

    def mailgw(self, *argv: str) -> int:
        return app.main([*argv, "--spool", self.directory, "--config", "/nonexistent"])

    def test_show(self) -> None:
        self.assertEqual(self.mailgw("account", "show", USER), 0)
        out = self.stdout.getvalue()
        self.assertTrue(
            out.startswith(
                f"{USER}: TRIPPED at 2023-11-14T22:13:20+00:00 by rule networks "
                "(hold-and-refuse); 0 messages held since\n"
                "  networks: 2 new client networks in the last hour > 1 (the ceiling of an "
                "account with 0 of 20 hours of history)\n"
                "  client 198.51.100.7, queue id -\n"
            ),
            out,
        )
        self.assertIn("client networks: 192.0.2.0/24, 198.51.100.0/24\n", out)
        self.assertIn("(the gateway is not running: read from its state file)", out)

    def test_showJSON(self) -> None:
        self.assertEqual(self.mailgw("account", "show", USER, "--json"), 0)
        state = json.loads(self.stdout.getvalue())
        self.assertEqual((state["tripped"], state["trip"]["rule"]), (True, "networks"))
        self.assertEqual([c["rule"] for c in state["checks"]][0], "networks")

    def test_unknown(self) -> None:
        self.assertEqual(self.mailgw("account", "show", "nobody\x1b[2J"), 1)
        self.assertEqual(self.stderr.getvalue(), "mailgw: unknown account nobody\\x1b[2J\n")
        self.assertEqual(self.mailgw("account", "reset", "nobody"), 1)

    def test_reset(self) -> None:
        self.assertEqual(self.mailgw("account", "reset", USER), 0)
        self.assertEqual(self.stdout.getvalue(), f"{USER}: re-armed\n")
        with open(os.path.join(self.directory, STATE_NAME)) as f:
            stored = json.load(f)["accounts"]
        self.assertIsNone(stored[USER]["trip"])
        self.assertEqual(stored[USER]["armedAt"], NOW + 60)
        self.assertIn("bob@example.com", stored)

    def test_corruptState(self) -> None:
        with open(os.path.join(self.directory, STATE_NAME), "w") as f:
            f.write("{")
        self.assertEqual(self.mailgw("account", "show", USER), 1)
        self.assertIn(f"{STATE_NAME}: not JSON", self.stderr.getvalue())

    def test_releaseAccount(self) -> None:
        self.assertEqual(self.mailgw("queue", "release", "--account", USER), 0)
        self.assertEqual(self.stdout.getvalue(), f"released 2 messages of {USER}\n")
        held = {m.queueId: m.held for m in SpoolReader(self.directory).pending()}
        self.assertEqual(
            held, {**{q: False for q in self.ids[USER]}, self.ids["bob@example.com"][0]: True}
        )

    def test_releaseUsage(self) -> None:
        self.assertEqual(self.mailgw("queue", "release"), 2)
        first = self.ids[USER][0]
        self.assertEqual(self.mailgw("queue", "release", first, "--account", USER), 2)
        self.assertIn("give queue ids or --account ACCOUNT", self.stderr.getvalue())


class FakeQueue:
    def __init__(self) -> None:
        self.released: list[str] = []

    def heldOf(self, account: str) -> list[str]:
        return ["00000000000000000001", "00000000000000000002"] if account == USER else []

    def release(self, queueId: str) -> Any:
        if queueId.endswith("2"):
            raise KeyError(queueId)  # delivered meanwhile
        self.released.append(queueId)
        return None


class ControlTests(SynchronousTestCase):
    def setUp(self) -> None:
        clock = Clock()
        clock.advance(NOW)
        self.breaker = AccountBreaker(clock, CONFIG)
        self.queue = FakeQueue()

    def ask(self, request: dict[str, Any], breaker: Any = True) -> Any:
        line = json.dumps(request).encode()
        used = self.breaker if breaker is True else breaker
        return resultOf(handleRequest(self.queue, line, None, used))  # type: ignore[arg-type]

    def test_show(self) -> None:
        self.breaker.observeLogin(USER, "192.0.2.7")
        answer = self.ask({"command": "account-show", "ids": [USER]})
        self.assertEqual((answer["ok"], answer["account"]["account"]), (True, USER))
        self.assertEqual(
            self.ask({"command": "account-show", "ids": ["x"]}),
            {"ok": False, "error": "unknown account x (the breaker never saw it)", "count": 0},
        )

    def test_oneAccount(self) -> None:
        for ids in ([], [USER, "bob"]):
            answer = self.ask({"command": "account-reset", "ids": ids})
            self.assertEqual(answer["error"], "account-reset needs exactly one account")

    def test_breakerOff(self) -> None:
        answer = self.ask({"command": "account-show", "ids": [USER]}, breaker=None)
        self.assertEqual(
            answer["error"], "the breaker is off on this gateway ([breaker] enabled = false)"
        )
        # Releasing held mail needs no breaker.
        answer = self.ask({"command": "release-account", "ids": [USER]}, breaker=None)
        self.assertEqual(answer, {"ok": True, "count": 1, "ids": ["00000000000000000001"]})

    def test_reset(self) -> None:
        self.breaker.observeLogin(USER, "192.0.2.7")
        self.breaker.observeLogin(USER, "198.51.100.7")
        answer = self.ask({"command": "account-reset", "ids": [USER]})
        self.assertEqual(answer, {"ok": True, "count": 1, "wasTripped": True})
        self.assertFalse(self.breaker.isTripped(USER))
        self.assertEqual(self.ask({"command": "account-reset", "ids": ["nobody"]})["ok"], False)
