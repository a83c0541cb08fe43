"""The control socket's ``reload`` request, in memory."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import fail
from twisted.trial.unittest import SynchronousTestCase

from mailgw.control import handleRequest


class ReloadRequestTests(SynchronousTestCase):
    def answer(self, reload: Any) -> Any:
        return self.successResultOf(handleRequest(None, b'{"command": "reload"}', reload))  # type: ignore[arg-type]

    def test_applied(self) -> None:
        calls: list[None] = []
        self.assertEqual(self.answer(lambda: calls.append(None) or True), {"ok": True, "count": 0})
        self.assertEqual(len(calls), 1)

    def test_refused(self) -> None:
        answer = self.answer(lambda: False)
        self.assertFalse(answer["ok"])
        self.assertIn("reload refused", answer["error"])

    def test_failedWithoutDetail(self) -> None:
        answer = self.answer(lambda: fail(RuntimeError("secret detail")))
        self.assertEqual(answer["error"], "reload failed (see the log)")
        self.flushLoggedErrors(RuntimeError)

    def test_notAvailable(self) -> None:
        answer = self.answer(None)
        self.assertFalse(answer["ok"])
        self.assertIn("cannot reload", answer["error"])
