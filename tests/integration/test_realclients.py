"""
The mail clients people use, each on its own defaults (its own choice of
AUTH mechanism), against a real gateway on 127.0.0.1: msmtp, curl, s-nail,
neomutt, swaks and smtplib, on both listeners, with a users file of hashes
only (what docs/auth.md recommends) and with one holding CRAM-MD5 secrets.

Each client sends several messages in a row from the same address: a
client that falls back from one mechanism to another must never be slowed
or locked out, and no AUTH failure may be logged. Set MAILGW_CLIENT_ROUNDS
(default 12) for longer runs.
"""

from __future__ import annotations

import os
import smtplib
import urllib.parse
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest

from tests.integration.support import (
    PASSWORD,
    USER,
    GatewayTestCase,
    clientContext,
    haveCommand,
    run,
)

ROUNDS = int(os.environ.get("MAILGW_CLIENT_ROUNDS", "12"))
RECIPIENT = "bob@example.org"


class _ClientsMixin:
    """The tests; subclasses choose the users file."""

    files: dict[str, str]
    submissionPort: int
    submissionsPort: int

    def setUp(self) -> Any:
        self.events: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            self.events.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)  # type: ignore[attr-defined]
        self.home = Path(self.mktemp())  # type: ignore[attr-defined]
        self.home.mkdir()
        return super().setUp()  # type: ignore[misc]

    def message(self, client: str, number: int) -> bytes:
        return (
            f"From: {USER}\r\nTo: {RECIPIENT}\r\nSubject: {client} {number}\r\n\r\n"
            f"sent by {client}\r\n"
        ).encode()

    def listener(self, implicit: bool) -> tuple[str, int]:
        """The URL scheme and port of the implicit-TLS or the STARTTLS listener."""
        return ("smtps", self.submissionsPort) if implicit else ("smtp", self.submissionPort)

    def need(self, command: str) -> None:
        if not haveCommand(command):
            raise SkipTest(f"{command} is not installed")

    def env(self) -> dict[str, str]:
        return dict(os.environ, HOME=str(self.home))

    @inlineCallbacks
    def rounds(self, client: str, send: Any) -> Any:
        """Run ``send(number)`` ROUNDS times; each must succeed."""
        for number in range(ROUNDS):
            result = yield send(number)
            if result is not None:
                self.assertEqual(  # type: ignore[attr-defined]
                    result.returncode,
                    0,
                    f"{client} message {number}: {result.stdout[-2000:]}{result.stderr[-2000:]}",
                )
        subjects = yield deferToThread(self.subjects)
        mine = sorted(s for s in subjects if s.startswith(client + " "))
        self.assertEqual(  # type: ignore[attr-defined]
            mine, sorted(f"{client} {n}" for n in range(ROUNDS))
        )
        failures = [e for e in self.events if "auth failed" in e or "auth-throttle" in e]
        self.assertEqual(failures, [], f"{client}: AUTH failures logged")  # type: ignore

    def subjects(self) -> list[str]:
        from mailgw.queue.spool import SpoolReader

        reader = SpoolReader(self.files["spool"])
        out = []
        for message in reader.pending():
            with reader.openMessage(message.queueId) as f:
                for line in f.read().split(b"\r\n"):
                    if line.startswith(b"Subject: "):
                        out.append(line[9:].decode())
                        break
        return out

    # -- the clients -----------------------------------------------------

    def _curl(self, implicit: bool) -> Any:
        self.need("curl")
        scheme, port = (
            ("smtps", self.submissionsPort) if implicit else ("smtp", self.submissionPort)
        )
        body = self.home / "curl.txt"

        def send(number: int) -> Any:
            body.write_bytes(self.message(f"curl-{scheme}", number))
            argv = [
                "curl", "-sS", "--url", f"{scheme}://localhost:{port}",
                "--cacert", self.files["cert"], "--mail-from", USER, "--mail-rcpt", RECIPIENT,
                "--upload-file", str(body), "--user", f"{USER}:{PASSWORD}",
            ]  # fmt: skip
            if not implicit:
                argv.append("--ssl-reqd")
            return run(*argv, env=self.env())

        return self.rounds(f"curl-{scheme}", send)

    def test_curlStarttls(self) -> Any:
        return self._curl(False)

    def test_curlImplicitTLS(self) -> Any:
        return self._curl(True)

    def _msmtp(self, implicit: bool) -> Any:
        self.need("msmtp")
        port = self.submissionsPort if implicit else self.submissionPort
        config = self.home / "msmtprc"
        config.write_text(
            "defaults\ntls on\n"
            f"tls_starttls {'off' if implicit else 'on'}\n"
            f"tls_trust_file {self.files['cert']}\nauth on\n"
            f"account gw\nhost localhost\nport {port}\nfrom {USER}\nuser {USER}\n"
            f"password {PASSWORD}\naccount default : gw\n"
        )
        config.chmod(0o600)
        name = f"msmtp-{'tls' if implicit else 'starttls'}"

        def send(number: int) -> Any:
            return run(
                "msmtp", "-C", str(config), RECIPIENT,
                input=self.message(name, number).decode(), env=self.env(),
            )  # fmt: skip

        return self.rounds(name, send)

    def test_msmtpStarttls(self) -> Any:
        return self._msmtp(False)

    def test_msmtpImplicitTLS(self) -> Any:
        return self._msmtp(True)

    def _snail(self, implicit: bool) -> Any:
        self.need("s-nail")
        login = urllib.parse.quote(USER, safe="")
        password = urllib.parse.quote(PASSWORD, safe="")
        scheme, port = (
            ("smtps", self.submissionsPort) if implicit else ("smtp", self.submissionPort)
        )
        name = f"s-nail-{scheme}"

        def send(number: int) -> Any:
            argv = [
                "s-nail", "-n", "-S", "v15-compat", "-S", "sendwait",
                "-S", f"mta={scheme}://{login}:{password}@localhost:{port}",
                "-S", f"tls-ca-file={self.files['cert']}", "-S", f"from={USER}",
                "-s", f"{name} {number}", RECIPIENT,
            ]  # fmt: skip
            if not implicit:
                argv[1:1] = ["-S", "smtp-use-starttls"]
            return run(*argv, input=f"sent by {name}\n", env=self.env())

        return self.rounds(name, send)

    def test_snailStarttls(self) -> Any:
        return self._snail(False)

    def test_snailImplicitTLS(self) -> Any:
        return self._snail(True)

    def _neomutt(self, implicit: bool) -> Any:
        self.need("neomutt")
        scheme, port = (
            ("smtps", self.submissionsPort) if implicit else ("smtp", self.submissionPort)
        )
        name = f"neomutt-{scheme}"
        rc = self.home / "muttrc"
        rc.write_text(
            f'set from = "{USER}"\n'
            f'set smtp_url = "{scheme}://{urllib.parse.quote(USER, safe="")}@localhost:{port}/"\n'
            f'set smtp_pass = "{PASSWORD}"\n'
            f"set ssl_starttls = {'no' if implicit else 'yes'}\nset ssl_force_tls = yes\n"
            f'set ssl_ca_certificates_file = "{self.files["cert"]}"\n'
            f'set certificate_file = "{self.home / "certs"}"\nset record = ""\n'
        )

        def send(number: int) -> Any:
            return run(
                "neomutt", "-n", "-F", str(rc), "-s", f"{name} {number}", RECIPIENT,
                input=f"sent by {name}\n", env=self.env(),
            )  # fmt: skip

        return self.rounds(name, send)

    def test_neomuttStarttls(self) -> Any:
        return self._neomutt(False)

    def test_neomuttImplicitTLS(self) -> Any:
        return self._neomutt(True)

    def test_swaks(self) -> Any:
        """swaks --auth with no mechanism named: it picks one itself."""
        self.need("swaks")

        def send(number: int) -> Any:
            return run(
                "swaks", "--server", f"localhost:{self.submissionPort}", "--tls",
                "--tls-ca-path", self.files["cert"], "--auth",
                "--auth-user", USER, "--auth-password", PASSWORD,
                "--from", USER, "--to", RECIPIENT,
                "--header", f"Subject: swaks {number}", env=self.env(),
            )  # fmt: skip

        return self.rounds("swaks", send)

    def test_smtplib(self) -> Any:
        """smtplib's login() tries CRAM-MD5 first, then PLAIN, then LOGIN."""

        def send(number: int) -> None:
            with smtplib.SMTP("localhost", self.submissionPort, timeout=30) as smtp:
                smtp.starttls(context=clientContext(self.files["cert"]))
                smtp.login(USER, PASSWORD)
                smtp.sendmail(USER, [RECIPIENT], self.message("smtplib", number))

        return self.rounds("smtplib", lambda n: deferToThread(send, n))


class HashOnlyClientTests(_ClientsMixin, GatewayTestCase):
    """A users file without CRAM secrets: CRAM-MD5 cannot succeed."""

    timeout = 300
    cramSecrets = False


class CramClientTests(_ClientsMixin, GatewayTestCase):
    """A users file whose user holds a CRAM-MD5 secret."""

    timeout = 300
    cramSecrets = True
