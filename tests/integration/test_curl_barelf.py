"""
curl uploading a file with LF line endings (``--upload-file`` without
``--crlf``) against a real gateway on 127.0.0.1: with ``[server]
accept_bare_lf`` the message is queued and spooled with CRLF lines; by
default it is refused with 554 5.6.0.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SkipTest

from tests.integration.support import PASSWORD, USER, GatewayTestCase, haveCommand, run

RECIPIENT = "bob@example.org"
# A line "." and a line that starts with "." in an LF file: curl stuffs
# neither (it stuffs only after CRLF).
LF_FILE = (
    f"From: {USER}\nTo: {RECIPIENT}\nSubject: lf file\n\nline one\n.\n.dot line\nlast\n"
).encode()


class _CurlMixin:
    files: dict[str, str]
    submissionPort: int

    def upload(self) -> Any:
        if not haveCommand("curl"):
            raise SkipTest("curl is not installed")
        path = self.base / "lf.txt"  # type: ignore[attr-defined]
        path.write_bytes(LF_FILE)
        return run(
            "curl", "-sS", "-v", "--url", f"smtp://localhost:{self.submissionPort}",
            "--ssl-reqd", "--cacert", self.files["cert"],
            "--mail-from", USER, "--mail-rcpt", RECIPIENT,
            "--upload-file", str(path), "--user", f"{USER}:{PASSWORD}",
        )  # fmt: skip


class AcceptBareLFTests(_CurlMixin, GatewayTestCase):
    extraConfig = {"server": {"accept_bare_lf": True}}

    @inlineCallbacks
    def test_lfFileQueuedAsCRLF(self) -> Any:
        result = yield self.upload()
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        self.assertIn("< 250 2.0.0", result.stderr)
        [message] = self.spooled()
        data = self.spooledBytes(message.queueId)
        self.assertEqual(data.count(b"\n"), data.count(b"\r\n"))
        self.assertEqual(data.count(b"\r"), data.count(b"\r\n"))
        body = data[data.index(b"From: ") :]
        lines = LF_FILE.replace(b"\n", b"\r\n")
        # curl ends a body that does not end in CRLF with CRLF "." CRLF: the
        # file's last LF then ends a line of its own, and the CRLF adds an
        # empty line (as it does for Postfix, which also takes LF as a line end).
        self.assertIn(body, (lines, lines + b"\r\n"))


class DefaultRefusesBareLFTests(_CurlMixin, GatewayTestCase):
    @inlineCallbacks
    def test_lfFileRefused(self) -> Any:
        result = yield self.upload()
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("< 554 5.6.0", result.stderr)
        self.assertEqual(self.spooled(), [])
