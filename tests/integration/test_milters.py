"""
Real milters from Debian on 127.0.0.1, started by the tests in a temporary
directory with their own configuration and stopped by pid: OpenDKIM signs
(the signature verifies with dkimpy on the message as relayed upstream,
against the public key opendkim-genkey wrote: no DNS), and a tiny milter
on Debian's pymilter (libmilter) rejects, tempfails and changes messages.
"""

from __future__ import annotations

import os
import re
import smtplib
import subprocess
import time
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread

from tests.integration.support import (
    PASSWORD,
    USER,
    clientContext,
    freePort,
    haveCommand,
    stopProcess,
    waitForPort,
)
from tests.integration.test_relay_e2e import RelayTestCase

FIXTURES = Path(__file__).parent.parent / "fixtures"
SYSTEM_PYTHON = "/usr/bin/python3"

try:
    import dkim
except ImportError:  # pragma: no cover - the test extra installs it
    dkim = None


def havePymilter() -> bool:
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return False
    check = subprocess.run([SYSTEM_PYTHON, "-c", "import Milter"], capture_output=True, cwd="/")
    return check.returncode == 0


def startMilter(command: list[str], port: int, log: Path, cwd: Path) -> subprocess.Popen[Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    with log.open("ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=out, cwd=cwd, env=env)
    try:
        waitForPort(port, process, str(log))
    except BaseException:
        stopProcess(process)
        raise
    return process


def txtRecord(path: Path) -> bytes:
    """The TXT record's text in opendkim-genkey's zone-file snippet."""
    return "".join(re.findall(r'"([^"]*)"', path.read_text())).encode("ascii")


class MilterRelayTestCase(RelayTestCase):
    milterPorts: list[int] = []

    def adjustConfig(self, data: dict[str, Any]) -> dict[str, Any]:
        data = super().adjustConfig(data)
        data["milter"] = {
            "servers": [f"inet:127.0.0.1:{port}" for port in self.milterPorts],
            "command_timeout": 20,
            "content_timeout": 20,
        }
        return data

    def submit(self, recipients: list[str], body: bytes, **options: Any) -> Any:
        def send() -> Any:
            with smtplib.SMTP("localhost", self.submissionPort, timeout=60) as smtp:
                smtp.starttls(context=clientContext(self.files["cert"]))
                smtp.login(USER, PASSWORD)
                try:
                    return smtp.sendmail(USER, recipients, body)
                except smtplib.SMTPResponseException as e:
                    return (e.smtp_code, e.smtp_error)

        return deferToThread(send)


class OpenDKIMTests(MilterRelayTestCase):
    """OpenDKIM as a signing milter: its DKIM-Signature verifies on the relayed message."""

    canonicalization = "simple/simple"

    @inlineCallbacks
    def setUp(self) -> Any:
        for program in ("opendkim", "opendkim-genkey"):
            if not haveCommand(program) and not os.access(f"/usr/sbin/{program}", os.X_OK):
                self.skipTest(f"{program} is not installed (Debian: opendkim, opendkim-tools)")
        if dkim is None:
            self.skipTest("dkimpy is not installed (the test extra)")
        self.dkimDir = Path(self.mktemp()).absolute()
        self.dkimDir.mkdir(parents=True)
        genkey = (
            "opendkim-genkey" if haveCommand("opendkim-genkey") else "/usr/sbin/opendkim-genkey"
        )
        subprocess.run(
            [genkey, "-D", str(self.dkimDir), "-d", "example.com", "-s", "sel", "-b", "2048"],
            check=True,
            capture_output=True,
        )
        port = freePort()
        d = self.dkimDir
        (d / "keytable").write_text(f"sel._domainkey.example.com example.com:sel:{d}/sel.private\n")
        (d / "signingtable").write_text("*@example.com sel._domainkey.example.com\n")
        # InternalHosts leaves our client out: OpenDKIM signs because the
        # client authenticated (the {auth_type} macro), as for a remote client.
        (d / "opendkim.conf").write_text(
            f"Syslog no\nMode s\nSocket inet:{port}@127.0.0.1\nPidFile {d}/opendkim.pid\n"
            f"KeyTable file:{d}/keytable\nSigningTable refile:{d}/signingtable\n"
            f"Canonicalization {self.canonicalization}\nRequireSafeKeys no\n"
            "InternalHosts 192.0.2.1\nBackground no\nUMask 077\n"
        )
        program = "opendkim" if haveCommand("opendkim") else "/usr/sbin/opendkim"
        self.process = startMilter(
            [program, "-f", "-x", str(d / "opendkim.conf")], port, d / "opendkim.log", d
        )
        self.addCleanup(stopProcess, self.process)
        self.milterPorts = [port]
        yield super().setUp()

    def dns(self, name: bytes, timeout: int = 5) -> bytes | None:
        if name.rstrip(b".") == b"sel._domainkey.example.com":
            return txtRecord(self.dkimDir / "sel.txt")
        return None

    @inlineCallbacks
    def test_signatureVerifies(self) -> Any:
        body = (
            b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\n"
            b"Subject: signed by OpenDKIM\r\n\r\nHello,\r\n.leading dot\r\n\r\n"
            b"folded: trailing spaces   \r\nbye\r\n"
        )
        result = yield self.submit(["bob@example.org"], body)
        self.assertEqual(result, {})
        [received] = yield self.upstream.waitForTransactions(1)
        data = received.data
        self.assertTrue(data.startswith(b"DKIM-Signature: "), data[:200])
        self.assertIn(b"d=example.com", data)
        self.assertTrue(dkim.verify(data, dnsfunc=self.dns), data[:1500])
        # And it can fail: one changed body octet breaks it.
        self.assertFalse(dkim.verify(data.replace(b"Hello", b"Jello"), dnsfunc=self.dns))


class OpenDKIMRelaxedTests(OpenDKIMTests):
    canonicalization = "relaxed/relaxed"


class PymilterTests(MilterRelayTestCase):
    """A milter on libmilter that rejects, tempfails, and changes headers and body."""

    @inlineCallbacks
    def setUp(self) -> Any:
        if not havePymilter():
            self.skipTest("Debian's python3-milter (pymilter) is not installed")
        workdir = Path(self.mktemp()).absolute()
        workdir.mkdir(parents=True)
        port = freePort()
        self.process = startMilter(
            [SYSTEM_PYTHON, str(FIXTURES / "testmilter.py"), str(port)],
            port,
            workdir / "milter.log",
            workdir,
        )
        self.addCleanup(stopProcess, self.process)
        self.milterPorts = [port]
        yield super().setUp()

    def message(self, subject: str) -> bytes:
        return (
            f"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: {subject}\r\n\r\n"
            "the body\r\n"
        ).encode()

    @inlineCallbacks
    def test_rejectAtHeader(self) -> Any:
        result = yield self.submit(["bob@example.org"], self.message("please reject me"))
        self.assertEqual(result, (550, b"5.7.1 Rejected by the test milter"))
        self.assertEqual(self.spooled(), [])

    @inlineCallbacks
    def test_tempfailAtEndOfMessage(self) -> Any:
        result = yield self.submit(["bob@example.org"], self.message("tempfail me"))
        self.assertEqual(result[0], 451)
        self.assertEqual(self.spooled(), [])

    @inlineCallbacks
    def test_headerAdded(self) -> Any:
        result = yield self.submit(["bob@example.org"], self.message("hello"))
        self.assertEqual(result, {})
        [received] = yield self.upstream.waitForTransactions(1)
        match = re.search(
            rb"\r\nX-Test-Milter: seen user=(\S+) id=(\S+)\r\n\r\nthe body", received.data
        )
        assert match is not None, received.data
        self.assertEqual(match.group(1), USER.encode())
        self.assertRegex(match.group(2).decode(), r"^[0-9A-F]{20}$")

    @inlineCallbacks
    def test_bodyReplaced(self) -> Any:
        result = yield self.submit(["bob@example.org"], self.message("replace me"))
        self.assertEqual(result, {})
        [received] = yield self.upstream.waitForTransactions(1)
        self.assertIn(b"\r\nSubject: replaced\r\n", received.data)
        self.assertTrue(
            received.data.endswith(b"\r\n\r\nThe test milter replaced this body.\r\n"),
            received.data,
        )

    @inlineCallbacks
    def test_milterStoppedTempfails(self) -> Any:
        stopProcess(self.process)
        deadline = time.monotonic() + 10
        while self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        result = yield self.submit(["bob@example.org"], self.message("hello"))
        self.assertEqual(result[0], 451)
        self.assertEqual(self.spooled(), [])
