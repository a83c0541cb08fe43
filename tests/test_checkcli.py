"""
Tests for ``mailgw check-config`` (mailgw.checkcli).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mailgw.auth.passwd import addUser
from mailgw.cli import main
from mailgw.tls import makeSelfSigned


class CheckConfigTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp())
        self.base.mkdir()
        makeSelfSigned(str(self.base / "c.pem"), str(self.base / "k.pem"), "localhost")
        addUser(str(self.base / "passwd"), "a@b.c", "pw")

    def run_(self, text: str) -> tuple[int, str, str]:
        config = self.base / "mailgw.toml"
        config.write_text(text.format(base=self.base))
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = main(["check-config", "--config", str(config)])
        return code, out.getvalue(), err.getvalue()

    GOOD = """
[server]
submission = ["tcp:587"]
[tls]
certificate = "{base}/c.pem"
key = "{base}/k.pem"
[auth]
backends = ["passwd:{base}/passwd"]
"""

    def test_ok(self) -> None:
        code, out, err = self.run_(self.GOOD)
        self.assertEqual((code, err), (0, ""))
        self.assertIn(": ok (1 listener(s), 1 auth backend(s), no relay route", out)

    def test_missingKey(self) -> None:
        code, out, err = self.run_(self.GOOD.replace("k.pem", "missing.pem"))
        self.assertEqual(code, 1)
        self.assertIn("mailgw.toml: tls.key:", err)

    def test_missingPasswdFile(self) -> None:
        code, _, err = self.run_(self.GOOD.replace("/passwd", "/nope"))
        self.assertEqual(code, 1)
        self.assertIn("auth.backends", err)

    def test_missingSenderMap(self) -> None:
        code, _, err = self.run_(self.GOOD + '[policy]\nsender_login_maps = "{base}/none"\n')
        self.assertEqual(code, 1)
        self.assertIn("policy.sender_login_maps", err)

    def test_exampleFileNamesItsProblems(self) -> None:
        """The shipped example needs its certificate: the error says so."""
        example = Path(__file__).parents[1] / "etc" / "mailgw.toml"
        code, _, err = self.run_(example.read_text().replace("{", "{{").replace("}", "}}"))
        self.assertEqual(code, 1)
        self.assertIn("tls.certificate", err)
