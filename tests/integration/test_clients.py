"""
Real clients against a real gateway on 127.0.0.1: Python's smtplib, swaks
and openssl s_client, on both listeners.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
from email.message import EmailMessage
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread

from tests.integration.support import (
    PASSWORD,
    USER,
    GatewayTestCase,
    clientContext,
    haveCommand,
    run,
)


def message(subject: str, body: str = "Hello.\n") -> EmailMessage:
    m = EmailMessage()
    m["From"] = USER
    m["To"] = "bob@example.org"
    m["Subject"] = subject
    m.set_content(body)
    return m


class SmtplibTests(GatewayTestCase):
    def submitSTARTTLS(self, mechanism: str, subject: str) -> dict[str, Any]:
        with smtplib.SMTP("127.0.0.1", self.submissionPort, timeout=30) as smtp:
            smtp.ehlo("client.test")
            self.assertFalse(smtp.has_extn("auth"), "AUTH offered before TLS")
            smtp.starttls(context=clientContext(self.files["cert"]))
            smtp.ehlo("client.test")
            self.assertIn(mechanism.lower(), smtp.esmtp_features["auth"].lower())
            smtp.user, smtp.password = USER, PASSWORD
            method = {
                "PLAIN": smtp.auth_plain,
                "LOGIN": smtp.auth_login,
                "CRAM-MD5": smtp.auth_cram_md5,
            }[mechanism]
            code, _ = smtp.auth(mechanism, method)
            self.assertEqual(code, 235)
            return smtp.send_message(message(subject))

    @inlineCallbacks
    def test_starttlsEachMechanism(self) -> Any:
        for mechanism in ("PLAIN", "LOGIN", "CRAM-MD5"):
            refused = yield deferToThread(self.submitSTARTTLS, mechanism, mechanism)
            self.assertEqual(refused, {})
        spooled = self.spooled()
        self.assertEqual(len(spooled), 3)
        for queued in spooled:
            self.assertEqual(queued.session.user, USER)
            self.assertEqual(str(queued.envelope.sender), USER)
            self.assertIn(queued.session.tlsProtocol, ("TLSv1.2", "TLSv1.3"))
            self.assertTrue(queued.session.tlsCipher)
            data = self.spooledBytes(queued.queueId)
            self.assertTrue(data.startswith(b"Received: from client.test ([127.0.0.1])"))
            self.assertIn(b"with ESMTPSA", data)

    def submitImplicit(self) -> dict[str, Any]:
        context = clientContext(self.files["cert"])
        with smtplib.SMTP_SSL(
            "localhost", self.submissionsPort, context=context, timeout=30
        ) as smtp:
            smtp.ehlo("client.test")
            self.assertNotIn("starttls", smtp.esmtp_features)
            smtp.login(USER, PASSWORD)
            return smtp.send_message(message("implicit", "dots\n.\n..\nend\n"))

    @inlineCallbacks
    def test_implicitTLS(self) -> Any:
        refused = yield deferToThread(self.submitImplicit)
        self.assertEqual(refused, {})
        [queued] = self.spooled()
        self.assertEqual(queued.session.listener, "submissions")
        data = self.spooledBytes(queued.queueId)
        self.assertIn(b"\r\ndots\r\n.\r\n..\r\nend\r\n", data)

    def wrongPassword(self) -> int:
        with smtplib.SMTP_SSL(
            "localhost", self.submissionsPort, context=clientContext(self.files["cert"]), timeout=30
        ) as smtp:
            try:
                smtp.login(USER, "wrong")
            except smtplib.SMTPAuthenticationError as e:
                return int(e.smtp_code)
        return 0

    @inlineCallbacks
    def test_wrongPassword(self) -> Any:
        code = yield deferToThread(self.wrongPassword)
        self.assertEqual(code, 535)
        self.assertEqual(self.spooled(), [])

    def plaintextDialog(self) -> list[bytes]:
        with socket.create_connection(("127.0.0.1", self.submissionPort), timeout=30) as s:
            f = s.makefile("rb")
            replies = [f.readline()]
            for command in (b"EHLO c", b"AUTH PLAIN AGEAYg==", b"MAIL FROM:<a@b.c>"):
                s.sendall(command + b"\r\n")
                line = f.readline()
                while line[3:4] == b"-":
                    line = f.readline()
                replies.append(line)
            return replies

    @inlineCallbacks
    def test_noAuthOrMailWithoutTLS(self) -> Any:
        replies = yield deferToThread(self.plaintextDialog)
        self.assertTrue(replies[2].startswith(b"538 5.7.11"), replies)
        self.assertTrue(replies[3].startswith(b"530 5.7.0"), replies)

    def injection(self) -> list[bytes]:
        """STARTTLS with a command pipelined behind it, then TLS."""
        with socket.create_connection(("127.0.0.1", self.submissionPort), timeout=30) as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"EHLO c\r\n")
            while f.readline()[3:4] == b"-":
                pass
            s.sendall(b"STARTTLS\r\nNOOP\r\n")
            ready = f.readline()
            context = clientContext(self.files["cert"])
            with context.wrap_socket(s, server_hostname="localhost") as tls:
                tf = tls.makefile("rb")
                tls.sendall(b"RSET\r\n")
                return [ready, tf.readline()]

    @inlineCallbacks
    def test_starttlsInjection(self) -> Any:
        ready, after = yield deferToThread(self.injection)
        self.assertTrue(ready.startswith(b"220 2.0.0"))
        # The NOOP sent in the clear was dropped: the first reply under TLS
        # answers the RSET.
        self.assertEqual(after, b"250 2.0.0 Ok\r\n")


class SwaksTests(GatewayTestCase):
    def setUp(self) -> Any:
        if not haveCommand("swaks"):
            self.skipTest("swaks is not installed (./dev test and .ci/run install it)")
        return super().setUp()

    def swaks(self, *args: str) -> Any:
        return run(
            "swaks",
            "--server",
            "127.0.0.1",
            "--from",
            USER,
            "--to",
            "bob@example.org",
            "--auth-user",
            USER,
            "--auth-password",
            PASSWORD,
            "--helo",
            "swaks.test",
            "--tls-verify",
            "--tls-ca-path",
            self.files["cert"],
            "--tls-sni",
            "localhost",
            "--timeout",
            "30",
            *args,
        )

    @inlineCallbacks
    def test_mechanismsOnBothListeners(self) -> Any:
        count = 0
        for mechanism in ("PLAIN", "LOGIN", "CRAM-MD5"):
            for tlsArgs in (
                ("--port", str(self.submissionPort), "--tls"),
                ("--port", str(self.submissionsPort), "--tls-on-connect"),
            ):
                result = yield self.swaks("--auth", mechanism, *tlsArgs)
                self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
                self.assertIn("250 2.0.0 Ok: queued as", result.stdout)
                count += 1
        self.assertEqual(len(self.spooled()), count)

    @inlineCallbacks
    def test_authBeforeSTARTTLS(self) -> Any:
        result = yield self.swaks("--port", str(self.submissionPort), "--auth", "LOGIN")
        self.assertNotEqual(result.returncode, 0)
        # Without TLS no AUTH is advertised, so swaks gives up before sending it.
        self.assertIn("Host did not advertise authentication", result.stdout + result.stderr)
        self.assertEqual(self.spooled(), [])

    @inlineCallbacks
    def test_mailWithoutAuth(self) -> Any:
        result = yield run(
            "swaks",
            "--server",
            "127.0.0.1",
            "--port",
            str(self.submissionPort),
            "--tls",
            "--tls-ca-path",
            self.files["cert"],
            "--from",
            USER,
            "--to",
            "bob@example.org",
            "--timeout",
            "30",
        )
        self.assertIn("530 5.7.0 Authentication required", result.stdout)
        self.assertEqual(self.spooled(), [])


class OpenSSLTests(GatewayTestCase):
    def setUp(self) -> Any:
        if not haveCommand("openssl"):
            self.skipTest("openssl is not installed")
        return super().setUp()

    @inlineCallbacks
    def test_starttlsWithSClient(self) -> Any:
        result = yield run(
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{self.submissionPort}",
            "-starttls",
            "smtp",
            "-CAfile",
            self.files["cert"],
            "-verify_return_error",
            "-servername",
            "localhost",
            "-quiet",
            input="EHLO c\r\nQUIT\r\n",
        )
        self.assertIn("250 AUTH PLAIN LOGIN CRAM-MD5", result.stdout)
        self.assertIn("221 2.0.0 Bye", result.stdout)

    @inlineCallbacks
    def test_oldTLSRefused(self) -> Any:
        for flag in ("-tls1", "-tls1_1"):
            result = yield run(
                "openssl",
                "s_client",
                "-connect",
                f"127.0.0.1:{self.submissionsPort}",
                flag,
                input="QUIT\r\n",
            )
            self.assertNotEqual(result.returncode, 0, flag)
            self.assertNotIn("ESMTP mailgw", result.stdout, flag)

    @inlineCallbacks
    def test_tls12Accepted(self) -> Any:
        result = yield run(
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{self.submissionsPort}",
            "-tls1_2",
            "-quiet",
            input="QUIT\r\n",
        )
        self.assertIn("220 localhost ESMTP mailgw", result.stdout)


class PythonSSLTests(GatewayTestCase):
    def oldClient(self) -> str:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        try:
            context.minimum_version = ssl.TLSVersion.TLSv1_1
            context.maximum_version = ssl.TLSVersion.TLSv1_1
        except (ValueError, ssl.SSLError):
            return "unsupported"
        try:
            with socket.create_connection(("127.0.0.1", self.submissionsPort), timeout=30) as s:
                with context.wrap_socket(s) as tls:
                    return tls.recv(100).decode()
        except (ssl.SSLError, OSError) as e:
            return f"refused: {e}"

    @inlineCallbacks
    def test_tls11Refused(self) -> Any:
        outcome = yield deferToThread(self.oldClient)
        if outcome == "unsupported":
            self.skipTest("this Python cannot even offer TLS 1.1")
        self.assertTrue(outcome.startswith("refused"), outcome)
