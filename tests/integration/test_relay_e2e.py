"""
Submission to relay, end to end: real clients submit to a real gateway on
127.0.0.1, which relays to an in-process upstream MTA we control.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import signal
import smtplib
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mailgw.queue.spool import SpoolReader
from tests.integration.support import (
    PASSWORD,
    USER,
    GatewayTestCase,
    clientContext,
    freePort,
    makeFixtures,
    run,
    shortDirectory,
    waitForPort,
)
from tests.upstream import makeTLSFiles, startUpstream


def stripTrace(data: bytes) -> bytes:
    """
    The message without the Received: header mailgw prepended, nor the
    Date: and Message-ID: it added after it (RFC 6409 8).
    """
    assert data.startswith(b"Received: "), data[:80]
    lines = data.split(b"\r\n")
    i = 1
    while lines[i][:1] in (b" ", b"\t"):
        i += 1
    for added in (b"Date: ", b"Message-ID: <"):
        if lines[i].startswith(added):
            i += 1
    return b"\r\n".join(lines[i:])


def cli(*args: str) -> Any:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # mailgw as installed
    return run(
        sys.executable,
        "-c",
        "import sys; from mailgw.cli import main; sys.exit(main())",
        *args,
        env=env,
    )


class RelayTestCase(GatewayTestCase):
    upstreamKnobs: dict[str, Any] = {}
    relayTLS = "none"

    @inlineCallbacks
    def setUp(self) -> Any:
        self.upstreamTLS = makeTLSFiles(self.mktemp())
        knobs = dict(self.upstreamKnobs)
        if self.relayTLS != "none":
            knobs["tlsOptions"] = self.upstreamTLS.serverOptions()
        self.upstream = yield startUpstream(reactor, **knobs)
        self.addCleanup(self.upstream.stop)
        yield super().setUp()

    def adjustConfig(self, data: dict[str, Any]) -> dict[str, Any]:
        relay: dict[str, Any] = {
            "smarthosts": [f"localhost:{self.upstream.portNumber}"],
            "tls": self.relayTLS,
        }
        if self.relayTLS != "none":
            relay["ca_file"] = self.upstreamTLS.certificate
        data["relay"] = {**relay, **self.relayExtra()}
        data["queue"] = {"retry_min": 1, "retry_max": 2, "retry_jitter": 0}
        return data

    def relayExtra(self) -> dict[str, Any]:
        return {}

    def submit(self, recipients: list[str], body: bytes, **options: Any) -> Any:
        def send() -> Any:
            with smtplib.SMTP("localhost", self.submissionPort, timeout=60) as smtp:
                smtp.starttls(context=clientContext(self.files["cert"]))
                smtp.login(USER, PASSWORD)
                return smtp.sendmail(USER, recipients, body, **options)

        return deferToThread(send)


class VerifiedTLSAndAuthTests(RelayTestCase):
    relayTLS = "starttls"
    upstreamKnobs = {"credentials": ("relay-user", "relay-secret")}

    def relayExtra(self) -> dict[str, Any]:
        secret = Path(self.mktemp())
        secret.write_text("relay-secret\n")
        secret.chmod(0o600)
        return {"auth_user": "relay-user", "auth_password_file": str(secret)}

    @inlineCallbacks
    def test_byteForByte(self) -> Any:
        """
        Dot lines, 8-bit text and a 5000-octet line arrive as sent, over
        verified STARTTLS with AUTH.
        """
        body = (
            "Subject: relay\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n"
            ".\r\n..\r\n.leading dot\r\nGr\u00fc\u00dfe aus K\u00f6ln\r\n" + "x" * 5000 + "\r\n"
        ).encode()
        yield self.submit(["bob@example.org"], body, mail_options=["BODY=8BITMIME"])
        [received] = yield self.upstream.waitForTransactions(1)
        self.assertEqual(stripTrace(received.data), body)
        self.assertTrue(received.tls)
        self.assertEqual(received.user, "relay-user")
        self.assertIn("BODY=8BITMIME", received.mailParams)
        self.assertEqual(received.rcpts, ("bob@example.org",))
        # Delivered: the spool is empty again.
        yield deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(self.spooled(), [])

    @inlineCallbacks
    def test_chunkedByteForByte(self) -> Any:
        """
        A message sent in BDAT chunks (RFC 3030), pipelined, with a chunk
        boundary inside a line and lines that DATA would have to stuff,
        arrives as sent; the chunks were answered in order.
        """
        body = b"Subject: chunked\r\n\r\n.\r\n..\r\nQUIT\r\n" + b"y" * 3000 + b"\r\nend\r\n"
        chunks = [body[:20], body[20:1500], body[1500:]]

        def send() -> list[tuple[int, bytes]]:
            with smtplib.SMTP("localhost", self.submissionPort, timeout=60) as smtp:
                smtp.starttls(context=clientContext(self.files["cert"]))
                smtp.login(USER, PASSWORD)
                assert smtp.has_extn("chunking")
                smtp.mail(USER)
                smtp.rcpt("bob@example.org")
                wire = b"".join(
                    b"BDAT %d%s\r\n" % (len(c), b" LAST" if i == len(chunks) - 1 else b"") + c
                    for i, c in enumerate(chunks)
                )
                smtp.send(wire)
                return [smtp.getreply() for _ in chunks]

        answers = yield deferToThread(send)
        self.assertEqual([code for code, _ in answers], [250, 250, 250])
        self.assertIn(b"queued as", answers[-1][1])
        [received] = yield self.upstream.waitForTransactions(1)
        self.assertEqual(stripTrace(received.data), body)

    @inlineCallbacks
    def test_twentyMiB(self) -> Any:
        line = b"0123456789" * 99 + b"\r\n"
        body = b"Subject: big\r\n\r\n" + line * (20 * 1024 * 1024 // len(line))
        yield self.submit(["bob@example.org"], body)
        [received] = yield self.upstream.waitForTransactions(1)
        self.assertEqual(len(stripTrace(received.data)), len(body))
        self.assertEqual(stripTrace(received.data), body)


class BounceTests(RelayTestCase):
    upstreamKnobs = {"rcptReplies": {"nobody@example.org": "550 5.1.1 no such user"}}

    @inlineCallbacks
    def test_oneOfThreeBounces(self) -> Any:
        recipients = ["a@example.org", "nobody@example.org", "c@example.org"]
        yield self.submit(recipients, b"Subject: three\r\n\r\nhello\r\n")
        original, bounce = yield self.upstream.waitForTransactions(2)
        self.assertEqual(original.rcpts, ("a@example.org", "c@example.org"))
        self.assertEqual(bounce.mailFrom, "")
        self.assertEqual(bounce.rcpts, (USER,))
        report = email.message_from_bytes(bounce.data, policy=email.policy.default)
        self.assertEqual(report.get_content_type(), "multipart/report")
        self.assertIn("nobody@example.org", bounce.data.decode())
        self.assertIn("550 5.1.1 no such user", bounce.data.decode())
        yield deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(self.spooled(), [])


class OutageTests(RelayTestCase):
    upstreamKnobs = {"rcptReplies": {"bob@example.org": "451 4.3.0 try later"}}

    @inlineCallbacks
    def test_waitsThenFlushDelivers(self) -> Any:
        """
        A 4xx keeps the message queued with its reason (`mailgw queue list`);
        once the upstream recovers, `mailgw queue flush` delivers it.
        """
        # A long backoff, so only the flush can bring the message out.
        self.service.runner._config = type(self.config.queue)(retryMin=3600, retryMax=3600)
        yield self.submit(["bob@example.org"], b"Subject: later\r\n\r\nx\r\n")
        for _ in range(100):
            [queued] = self.spooled()
            if queued.recipients[0].attempts:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        listing = yield cli("queue", "list", "--json", "--spool", self.files["spool"])
        self.assertEqual(listing.returncode, 0, listing.stderr)
        [entry] = json.loads(listing.stdout)
        self.assertIn("451", json.dumps(entry))
        self.assertIn("try later", json.dumps(entry))
        self.upstream.knobs.rcptReplies.clear()
        flushed = yield cli("queue", "flush", "--spool", self.files["spool"])
        self.assertEqual(flushed.returncode, 0, flushed.stderr + flushed.stdout)
        [received] = yield self.upstream.waitForTransactions(1)
        self.assertEqual(received.rcpts, ("bob@example.org",))


class CrashTests(TestCase):
    """The gateway process killed with SIGKILL mid-queue, then restarted."""

    timeout = 180

    @inlineCallbacks
    def test_killedAndRestarted(self) -> Any:
        later = "451 4.3.0 later"
        count = 5
        deferred = {f"later{i}@example.org": later for i in range(count)}
        upstream = yield startUpstream(reactor, rcptReplies=dict(deferred))
        self.addCleanup(upstream.stop)
        base = shortDirectory(self)
        files = makeFixtures(base / "files", base / "spool")
        config = base / "mailgw.toml"
        submission = freePort()
        config.write_text(
            f"""
[server]
hostname = "localhost"
submission = ["tcp:port={submission}:interface=127.0.0.1"]
[tls]
certificate = "{files["cert"]}"
key = "{files["key"]}"
[auth]
backends = ["passwd:{files["passwd"]}"]
[spool]
directory = "{files["spool"]}"
[queue]
retry_min = 1
retry_max = 1
retry_jitter = 0
[relay]
smarthosts = ["127.0.0.1:{upstream.portNumber}"]
tls = "none"
"""
        )
        log = base / "twistd.log"

        def start() -> subprocess.Popen[bytes]:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from twisted.scripts.twistd import run; run()",
                    "--nodaemon",
                    "--pidfile=",
                    f"--logfile={log}",
                    "mailgw",
                    "--config",
                    str(config),
                ],
                env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
            )
            self.addCleanup(lambda: process.poll() is None and process.kill())
            waitForPort(submission, process)
            return process

        def submitAll() -> None:
            with smtplib.SMTP("localhost", submission, timeout=30) as smtp:
                smtp.starttls(context=clientContext(files["cert"]))
                smtp.login(USER, PASSWORD)
                for i in range(count):
                    smtp.sendmail(
                        USER,
                        [f"now{i}@example.org", f"later{i}@example.org"],
                        f"Subject: {i}\r\n\r\nmessage {i}\r\n".encode(),
                    )

        def states() -> set[tuple[str, str]]:
            return {
                (str(r.address), r.status.value)
                for m in SpoolReader(files["spool"]).pending()
                for r in m.recipients
            }

        process = yield deferToThread(start)
        yield deferToThread(submitAll)
        # Wait until every "now" recipient is recorded delivered and every
        # "later" one has been tried at least once, then kill the process.
        for _ in range(400):
            s = states()
            if all((f"now{i}@example.org", "delivered") in s for i in range(count)):
                break
            yield deferLater(reactor, 0.05, lambda: None)
        else:
            self.fail(f"not all delivered before the kill: {s}")
        process.send_signal(signal.SIGKILL)
        yield deferToThread(process.wait)
        self.assertEqual(len(SpoolReader(files["spool"]).pending()), count)

        upstream.knobs.rcptReplies.clear()
        process = yield deferToThread(start)
        for _ in range(400):
            if not SpoolReader(files["spool"]).pending():
                break
            yield deferLater(reactor, 0.05, lambda: None)
        else:
            self.fail("the queue did not drain after the restart")
        process.terminate()
        yield deferToThread(process.wait)
        delivered = [r for t in upstream.transactions for r in t.rcpts]
        expected = [f"now{i}@example.org" for i in range(count)]
        expected += [f"later{i}@example.org" for i in range(count)]
        self.assertEqual(sorted(delivered), sorted(expected))


class UpstreamDownAtStartTests(GatewayTestCase):
    """The upstream is not there when mail arrives; it comes up later."""

    def adjustConfig(self, data: dict[str, Any]) -> dict[str, Any]:
        self.upstreamPort = freePort()
        data["relay"] = {"smarthosts": [f"127.0.0.1:{self.upstreamPort}"], "tls": "none"}
        data["queue"] = {"retry_min": 3600, "retry_max": 3600}
        return data

    @inlineCallbacks
    def test_waitsThenDelivers(self) -> Any:
        def send() -> None:
            with smtplib.SMTP("localhost", self.submissionPort, timeout=30) as smtp:
                smtp.starttls(context=clientContext(self.files["cert"]))
                smtp.login(USER, PASSWORD)
                smtp.sendmail(USER, ["bob@example.org"], b"Subject: early\r\n\r\nx\r\n")

        yield deferToThread(send)
        for _ in range(100):
            [queued] = self.spooled()
            if queued.recipients[0].attempts:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertIn("refused", queued.recipients[0].diagnostic)
        upstream = yield startUpstream(reactor, port=self.upstreamPort)
        self.addCleanup(upstream.stop)
        count = yield self.service.runner.flush()
        self.assertEqual(count, 1)
        [received] = yield upstream.waitForTransactions(1)
        self.assertEqual(received.rcpts, ("bob@example.org",))


class BinaryMimeTests(RelayTestCase):
    """BODY=BINARYMIME end to end: BDAT in, BDAT out, byte for byte."""

    upstreamKnobs = {"chunking": True}

    def adjustConfig(self, data: dict[str, Any]) -> dict[str, Any]:
        data = super().adjustConfig(data)
        data["server"] = {**data["server"], "binary_mime": True}
        return data

    @inlineCallbacks
    def test_binaryByteForByte(self) -> Any:
        body = b"Subject: binary\r\n\r\n" + bytes(range(256)) * 300 + b"\n.\n\r.\r\n"

        def send() -> tuple[int, bytes]:
            with smtplib.SMTP("localhost", self.submissionPort, timeout=60) as smtp:
                smtp.starttls(context=clientContext(self.files["cert"]))
                smtp.login(USER, PASSWORD)
                assert smtp.has_extn("binarymime") and smtp.has_extn("chunking")
                smtp.mail(USER, ["BODY=BINARYMIME"])
                smtp.rcpt("bob@example.org")
                smtp.send(b"BDAT %d LAST\r\n" % len(body) + body)
                return smtp.getreply()

        code, reply = yield deferToThread(send)
        self.assertEqual(code, 250, reply)
        [received] = yield self.upstream.waitForTransactions(1)
        self.assertEqual(stripTrace(received.data), body)
        self.assertIn("BODY=BINARYMIME", received.mailParams)
