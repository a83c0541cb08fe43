"""
``twistd mailgw --help-auth`` and ``--help-auth-type TYPE`` as docs/auth.md
documents them: the installed backends mailgw can use, and one backend's
help; ``--auth`` still keeps its strcred string for the configuration.
"""

from __future__ import annotations

import io
import subprocess

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from mailgw.tap import Options
from tests.integration.test_twistd import environment, twistdCommand


def helpOutput(*args: str) -> str:
    options = Options()
    options.authOutput = io.StringIO()
    error = None
    try:
        options.parseOptions(list(args))
    except SystemExit as e:
        error = e
    assert error is not None and error.code == 0, error
    return options.authOutput.getvalue()


class HelpAuthTests(SynchronousTestCase):
    def test_listsBackends(self) -> None:
        text = helpOutput("--help-auth")
        types = {line.split()[0] for line in text.splitlines()[5:] if line.strip()}
        self.assertTrue({"passwd", "memory", "file", "unix"} <= types, text)
        # Only backends that check passwords (what AUTH hands over).
        self.assertNotIn("sshkey", types)
        self.assertNotIn("anonymous", types)

    def test_oneBackend(self) -> None:
        text = helpOutput("--help-auth-type", "passwd")
        self.assertIn("Usage: --auth passwd[:ArgString]", text)
        self.assertIn("ArgString format: FILE", text)
        self.assertIn("mailgw passwd add", text)

    def test_unknownBackend(self) -> None:
        error = self.assertRaises(
            usage.UsageError, Options().parseOptions, ["--help-auth-type", "nosuch"]
        )
        self.assertIn("nosuch", str(error))

    def test_authStillAString(self) -> None:
        options = Options()
        options.parseOptions(["--auth", "passwd:/etc/mailgw/passwd", "--auth", "memory:a:b"])
        self.assertEqual(options["auth"], ["passwd:/etc/mailgw/passwd", "memory:a:b"])
        self.assertNotIn("credCheckers", options)

    def test_twistd(self) -> None:
        """The documented command line, in a real twistd."""
        result = subprocess.run(
            twistdCommand("--help-auth"),
            capture_output=True,
            text=True,
            timeout=60,
            env=environment(),
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout, r"passwd\s+\tFILE")
