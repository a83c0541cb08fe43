"""
TLS handshakes of several TLS stacks against the gateway's real listeners,
STARTTLS (587) and implicit TLS (465), on 127.0.0.1: ALPN offers, session
resumption, a range of groups, signature algorithms and cipher suites, and
the log line of a handshake that fails.

The clients: Python's ssl module and the openssl command (OpenSSL),
gnutls-cli (GnuTLS) and Java's own TLS (JSSE) when installed, and raw
ClientHellos shaped like those of Chrome, Firefox, Safari, Android 9 and Go
(L{tests.clienthellos}).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher

from tests.clienthellos import PROFILES, clientHello, serverAnswer, serverHelloExtensions
from tests.integration.support import GatewayTestCase, haveCommand, run

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@attrs.frozen
class Outcome:
    version: str | None
    alpn: str | None
    reused: bool
    session: Any
    ehlo: bytes


def _readReply(f: Any) -> bytes:
    lines = []
    while True:
        line = f.readline()
        if not line:
            raise EOFError("connection closed")
        lines.append(line)
        if line[3:4] != b"-":
            return b"".join(lines)


def _plainToStartTLS(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    f = sock.makefile("rb")
    _readReply(f)
    sock.sendall(b"EHLO client.example\r\n")
    _readReply(f)
    sock.sendall(b"STARTTLS\r\n")
    assert _readReply(f).startswith(b"220"), "STARTTLS refused"
    # Nothing else was sent, so the buffered reader holds no TLS bytes.
    return sock


def pythonSession(
    port: int, starttls: bool, context: ssl.SSLContext, session: Any = None
) -> Outcome:
    """One SMTP session with Python's ssl: TLS, EHLO, QUIT."""
    if starttls:
        sock = _plainToStartTLS(port)
    else:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    with context.wrap_socket(sock, server_hostname="localhost", session=session) as tlsSock:
        f = tlsSock.makefile("rb")
        if not starttls:
            _readReply(f)
        tlsSock.sendall(b"EHLO client.example\r\n")
        ehlo = _readReply(f)  # TLS 1.3 tickets arrive with it
        tlsSock.sendall(b"QUIT\r\n")
        _readReply(f)
        return Outcome(
            tlsSock.version(),
            tlsSock.selected_alpn_protocol(),
            tlsSock.session_reused,
            tlsSock.session,
            ehlo,
        )


def rawHello(port: int, starttls: bool, hello: bytes) -> bytes:
    """Send one ClientHello; the server's first record (its first 7 octets at least)."""
    sock = (
        _plainToStartTLS(port)
        if starttls
        else socket.create_connection(("127.0.0.1", port), timeout=10)
    )
    with sock:
        sock.sendall(hello)
        answer = b""
        while len(answer) < 5 or len(answer) < 5 + int.from_bytes(answer[3:5], "big"):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    return answer


class TLSClientTests(GatewayTestCase):
    timeout = 120

    def setUp(self) -> Any:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        return super().setUp()

    def listeners(self) -> Iterator[tuple[str, int, bool]]:
        yield ("587", self.submissionPort, True)
        yield ("465", self.submissionsPort, False)

    def context(self, alpn: list[str] | None = None, **versions: ssl.TLSVersion) -> Any:
        context = ssl.create_default_context(cafile=self.files["cert"])
        for name, value in versions.items():
            setattr(context, name, value)
        if alpn:
            context.set_alpn_protocols(alpn)
        return context

    def handshakeFailures(self) -> list[dict[str, Any]]:
        return [e for e in self.events if "TLS handshake failed" in e.get("log_format", "")]

    @inlineCallbacks
    def test_pythonALPN(self) -> Any:
        """
        Offers of smtp, h2 and http/1.1 are ignored on both listeners; they
        all got a fatal alert before.
        """
        for name, port, starttls in self.listeners():
            for offer in (["smtp"], ["h2", "http/1.1"], ["http/1.1"]):
                for maximum in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
                    context = self.context(offer, maximum_version=maximum)
                    outcome = yield deferToThread(pythonSession, port, starttls, context)
                    self.assertIsNone(outcome.alpn, (name, offer))
                    self.assertIn(b"AUTH", outcome.ehlo, (name, offer))
                    self.assertEqual(outcome.version, maximum.name.replace("_", "."), name)
        self.assertEqual(self.handshakeFailures(), [])

    @inlineCallbacks
    def test_pythonResumption(self) -> Any:
        """A second session with the first's TLS session resumes, on both listeners."""
        for maximum in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
            context = self.context(maximum_version=maximum)
            for name, port, starttls in self.listeners():
                first = yield deferToThread(pythonSession, port, starttls, context)
                self.assertFalse(first.reused)
                second = yield deferToThread(pythonSession, port, starttls, context, first.session)
                self.assertTrue(second.reused, (name, maximum))
                self.assertIn(b"AUTH", second.ehlo)
            # One context serves both listeners: a session from 587 resumes on 465.
            first = yield deferToThread(pythonSession, self.submissionPort, True, context)
            other = yield deferToThread(
                pythonSession, self.submissionsPort, False, context, first.session
            )
            self.assertTrue(other.reused)

    @inlineCallbacks
    def test_generatedClientHellos(self) -> Any:
        """
        ClientHellos shaped like current browser, phone and Go stacks get a
        ServerHello, without an ALPN extension (none of their offers is ours).
        """
        for name, port, starttls in self.listeners():
            for profile in PROFILES:
                answer = yield deferToThread(rawHello, port, starttls, clientHello(profile))
                self.assertEqual(serverAnswer(answer), "ServerHello", (name, profile))
                extensions = serverHelloExtensions(answer)
                self.assertNotIn(16, extensions, (name, profile))
                # The parse found the extensions there are: supported_versions
                # in TLS 1.3, renegotiation_info in the TLS 1.2-only hello.
                self.assertIn(0xFF01 if profile == "android9" else 43, extensions)

    def openssl(self, port: int, starttls: bool, *options: str) -> Any:
        argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}"]
        argv += ["-CAfile", self.files["cert"], "-verify_return_error"]
        argv += ["-verify_hostname", "localhost", "-servername", "localhost"]
        # -ign_eof: send QUIT as a command (not s_client's own "Q") and read
        # until the server closes, so TLS 1.3 tickets arrive before the end.
        argv += ["-ign_eof"]
        if starttls:
            argv += ["-starttls", "smtp"]
        return run(*argv, *options, input="QUIT\r\n", timeout=20)

    @inlineCallbacks
    def test_opensslALPN(self) -> Any:
        if not haveCommand("openssl"):
            self.skipTest("openssl is not installed")
        for name, port, starttls in self.listeners():
            for offer in ("smtp", "h2", "http/1.1", "h2,http/1.1"):
                result = yield self.openssl(port, starttls, "-alpn", offer)
                self.assertEqual(result.returncode, 0, (name, offer, result.stderr))
                self.assertIn("No ALPN negotiated", result.stdout, (name, offer))
                self.assertIn("Verify return code: 0 (ok)", result.stdout)

    @inlineCallbacks
    def test_opensslHelloVariants(self) -> Any:
        """Other groups, signature algorithms and suites: each handshake completes."""
        if not haveCommand("openssl"):
            self.skipTest("openssl is not installed")
        variants = [
            ["-groups", "X25519"],
            ["-groups", "P-256"],
            ["-groups", "P-384"],
            ["-groups", "P-521:X448"],
            ["-sigalgs", "ECDSA+SHA256"],
            ["-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256"],
            ["-ciphersuites", "TLS_AES_128_GCM_SHA256"],
            ["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"],
            ["-tls1_2", "-cipher", "ECDHE-ECDSA-CHACHA20-POLY1305"],
            ["-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-GCM-SHA384", "-alpn", "h2"],
            ["-no_ticket", "-alpn", "http/1.1"],
            ["-status", "-alpn", "h2"],
        ]
        for name, port, starttls in self.listeners():
            for options in variants:
                result = yield self.openssl(port, starttls, *options)
                self.assertEqual(result.returncode, 0, (name, options, result.stderr))
                self.assertIn("Verify return code: 0 (ok)", result.stdout, (name, options))

    @inlineCallbacks
    def test_opensslResumption(self) -> Any:
        if not haveCommand("openssl"):
            self.skipTest("openssl is not installed")
        for name, port, starttls in self.listeners():
            for version in ("-tls1_3", "-tls1_2"):
                session = str(self.base / f"session-{port}{version}.pem")
                first = yield self.openssl(port, starttls, version, "-sess_out", session)
                self.assertIn("\nNew, ", first.stdout, (name, version))
                second = yield self.openssl(port, starttls, version, "-sess_in", session)
                self.assertEqual(second.returncode, 0, second.stderr)
                self.assertIn("\nReused, ", second.stdout, (name, version))

    @inlineCallbacks
    def test_gnutls(self) -> Any:
        """GnuTLS, another TLS stack: ALPN offers, its priorities, resumption."""
        if not haveCommand("gnutls-cli"):
            self.skipTest("gnutls-cli is not installed (Debian: gnutls-bin)")
        priorities = [
            "NORMAL",
            "NORMAL:-VERS-TLS1.3",
            "SECURE128:-GROUP-ALL:+GROUP-SECP384R1",
            "PFS:-CIPHER-ALL:+CHACHA20-POLY1305",
        ]
        for name, port, starttls in self.listeners():
            for priority in priorities:
                argv = ["gnutls-cli", "--port", str(port), "--x509cafile", self.files["cert"]]
                argv += ["--alpn", "h2", "--alpn", "http/1.1", "--priority", priority]
                argv += ["--resume"]
                if starttls:
                    argv += ["--starttls-proto", "smtp"]
                result = yield run(*argv, "localhost", input="", timeout=20)
                text = result.stdout + result.stderr
                self.assertIn("Handshake was completed", text, (name, priority, text))
                self.assertIn("This is a resumed session", text, (name, priority, text))
                self.assertNotIn("Error", text, (name, priority))

    @inlineCallbacks
    def test_java(self) -> Any:
        """Java's own TLS stack (JSSE) offering h2 and http/1.1."""
        if not haveCommand("java"):
            self.skipTest("java is not installed")
        for name, port, starttls in self.listeners():
            mode = "starttls" if starttls else "implicit"
            argv = ["java", str(FIXTURES / "TLSProbe.java"), self.files["cert"], "127.0.0.1"]
            result = yield run(*argv, str(port), mode, "h2", "http/1.1", timeout=60)
            self.assertEqual(result.returncode, 0, (name, result.stderr))
            self.assertIn("alpn []", result.stdout)
            self.assertIn("AUTH", result.stdout)

    @inlineCallbacks
    def test_failedHandshakeLogged(self) -> Any:
        """One line per failed handshake: the client's address and OpenSSL's reason."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
        for _name, port, starttls in self.listeners():
            yield self.assertFailure(
                deferToThread(pythonSession, port, starttls, context), ssl.SSLError, OSError
            )
        untrusting = ssl.create_default_context()  # the system store lacks our certificate
        yield self.assertFailure(
            deferToThread(pythonSession, self.submissionsPort, False, untrusting),
            ssl.SSLCertVerificationError,
        )
        # A port probe (connect, close) is not a handshake.
        yield deferToThread(
            lambda: socket.create_connection(("127.0.0.1", self.submissionsPort)).close()
        )
        yield deferToThread(pythonSession, self.submissionsPort, False, self.context())
        failures = self.handshakeFailures()
        self.assertEqual(len(failures), 3, failures)
        for event in failures:
            self.assertRegex(event["client"], r"^127\.0\.0\.1:\d+$")
        self.assertIn("unsupported protocol", failures[0]["reason"])
        self.assertIn("unsupported protocol", failures[1]["reason"])
        self.assertIn("alert", failures[2]["reason"])
