"""
Attacks over real sockets against a real gateway (and, where mail could
leak, a real upstream behind it): password spraying from one network while
real users keep working, connection floods, slow drips, smuggling and
spoofing that must not reach the upstream.

Clients bind to different loopback addresses (127.0.0.0/8 is all loopback)
to stand for different client networks.
"""

from __future__ import annotations

import base64
import smtplib
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from mailgw.auth.passwd import addUser, setPassword
from tests.integration.support import PASSWORD, USER, GatewayTestCase, clientContext
from tests.integration.test_relay_e2e import RelayTestCase


def dialog(
    port: int, source: str, cafile: str, lines: list[bytes], implicit: bool = True
) -> list[bytes]:
    """Send ``lines`` one by one from ``source`` over implicit TLS; return each reply."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    context = clientContext(cafile)
    with context.wrap_socket(raw, server_hostname="localhost") as s:
        f = s.makefile("rb")
        replies = [f.readline()]
        for line in lines:
            s.sendall(line + b"\r\n")
            reply = f.readline()
            while reply[3:4] == b"-":
                reply = f.readline()
            replies.append(reply)
            if not reply or reply.startswith(b"421"):
                break
        return replies


def plain(user: str, password: str) -> bytes:
    return b"AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode())


class AbuseTests(RelayTestCase):
    extraConfig = {
        "limits": {
            "auth_failures_per_address": 4,
            "auth_failures_per_network": 8,
            "auth_failures_per_account": 50,
            "auth_free_failures": 1,
            "auth_delay": 0.05,
            "auth_delay_max": 0.1,
            "max_connections_per_address": 3,
        },
        "server": {"command_timeout": 1},
    }

    def tryLogin(self, source: str, password: str) -> bytes:
        replies = dialog(
            self.submissionsPort, source, self.files["cert"], [b"EHLO c", plain(USER, password)]
        )
        return replies[-1]

    @inlineCallbacks
    def test_sprayingRefusedRealUsersKeepWorking(self) -> Any:
        # A real user logs in from the network the attack will come from...
        reply = yield deferToThread(self.tryLogin, "127.0.5.200", PASSWORD)
        self.assertTrue(reply.startswith(b"235"), reply)
        # ...then a spraying run from that /24, many addresses, wrong passwords.
        outcomes = []
        for i in range(1, 7):
            for _ in range(3):
                reply = yield deferToThread(self.tryLogin, f"127.0.5.{i}", "guess")
                outcomes.append(reply[:3])
        self.assertIn(b"535", outcomes)
        self.assertIn(b"454", outcomes)  # the network budget is spent
        self.assertEqual(outcomes[-1], b"454")
        # Even the right password is now refused from that network...
        reply = yield deferToThread(self.tryLogin, "127.0.5.99", PASSWORD)
        self.assertTrue(reply.startswith(b"454 4.7.0"), reply)
        # ...except from where the user logged in before, and from elsewhere.
        reply = yield deferToThread(self.tryLogin, "127.0.5.200", PASSWORD)
        self.assertTrue(reply.startswith(b"235"), reply)
        reply = yield deferToThread(self.tryLogin, "127.0.9.1", PASSWORD)
        self.assertTrue(reply.startswith(b"235"), reply)

    @inlineCallbacks
    def test_oneAddressDisconnectedAfterItsBudget(self) -> Any:
        replies = yield deferToThread(
            dialog,
            self.submissionsPort,
            "127.0.7.1",
            self.files["cert"],
            [b"EHLO c"] + [plain(USER, f"guess{i}") for i in range(8)],
        )
        self.assertTrue(replies[-1].startswith(b"421 4.7.0"), replies)

    def connectionFlood(self) -> list[bytes]:
        sockets, greetings = [], []
        try:
            for _ in range(5):
                s = socket.create_connection(
                    ("127.0.0.1", self.submissionPort), timeout=10, source_address=("127.0.8.1", 0)
                )
                sockets.append(s)
                greetings.append(s.makefile("rb").readline())
            other = socket.create_connection(
                ("127.0.0.1", self.submissionPort), timeout=10, source_address=("127.0.8.2", 0)
            )
            sockets.append(other)
            greetings.append(other.makefile("rb").readline())
        finally:
            for s in sockets:
                s.close()
        return greetings

    @inlineCallbacks
    def test_connectionsPerAddress(self) -> Any:
        greetings = yield deferToThread(self.connectionFlood)
        self.assertEqual([g[:3] for g in greetings[:3]], [b"220"] * 3)
        self.assertTrue(greetings[3].startswith(b"421 4.7.0"), greetings)
        self.assertTrue(greetings[5].startswith(b"220"), greetings)  # another address

    def slowDrip(self) -> tuple[bytes, float, Any]:
        s = socket.create_connection(("127.0.0.1", self.submissionPort), timeout=10)
        f = s.makefile("rb")
        f.readline()
        start = time.monotonic()
        s.sendall(b"N")
        # While one client drips, another is served at once.
        with smtplib.SMTP_SSL(
            "localhost", self.submissionsPort, context=clientContext(self.files["cert"]), timeout=10
        ) as smtp:
            smtp.login(USER, PASSWORD)
            other = smtp.noop()
        for byte in b"OOP":
            time.sleep(0.4)
            try:
                s.sendall(bytes([byte]))
            except OSError:
                break
        reply = f.readline()
        s.close()
        return reply, time.monotonic() - start, other

    @inlineCallbacks
    def test_slowDripCut(self) -> Any:
        reply, took, other = yield deferToThread(self.slowDrip)
        self.assertEqual(other[0], 250)
        self.assertTrue(reply.startswith(b"421 4.4.2"), reply)
        self.assertLess(took, 5)

    def http(self) -> bytes:
        with socket.create_connection(("127.0.0.1", self.submissionPort), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            return data

    @inlineCallbacks
    def test_httpRequest(self) -> Any:
        data = yield deferToThread(self.http)
        self.assertIn(b"421 4.7.0", data)

    def spoof(self, sender: str) -> Any:
        with smtplib.SMTP_SSL(
            "localhost", self.submissionsPort, context=clientContext(self.files["cert"]), timeout=10
        ) as smtp:
            smtp.login(USER, PASSWORD)
            try:
                smtp.sendmail(sender, ["x@example.org"], b"Subject: s\r\n\r\nx\r\n")
            except smtplib.SMTPSenderRefused as e:
                return e.smtp_code, e.smtp_error
            return 250, b""

    @inlineCallbacks
    def test_senderSpoofingRefused(self) -> Any:
        for sender in (
            "ceo@example.com",
            "ALICE@example.com.evil",
            '"alice"@example.org',
            "alice@example.com@evil.example",
        ):
            code, text = yield deferToThread(self.spoof, sender)
            self.assertIn(code, (501, 553), (sender, text))
        code, _ = yield deferToThread(self.spoof, "Alice@EXAMPLE.com")  # own address, any case
        self.assertEqual(code, 250)
        yield self.upstream.waitForTransactions(1)
        yield deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(len(self.upstream.transactions), 1)

    def smuggle(self, ending: bytes) -> bytes:
        raw = socket.create_connection(("127.0.0.1", self.submissionsPort), timeout=10)
        with clientContext(self.files["cert"]).wrap_socket(raw, server_hostname="localhost") as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"EHLO c\r\n" + plain(USER, PASSWORD) + b"\r\n")
            while f.readline()[3:4] == b"-":
                pass
            f.readline()
            s.sendall(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<a@example.org>\r\nDATA\r\n")
            for _ in range(3):
                f.readline()
            s.sendall(
                b"Subject: one\r\n\r\nx" + ending + b"MAIL FROM:<alice@example.com>\r\n"
                b"RCPT TO:<smuggled@example.org>\r\nDATA\r\nSubject: two\r\n\r\n.\r\n"
            )
            return f.readline()

    @inlineCallbacks
    def test_smugglingNeverReachesUpstream(self) -> Any:
        for ending in (b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r\n\x00.\r\n"):
            reply = yield deferToThread(self.smuggle, ending)
            self.assertTrue(reply.startswith(b"554 5.6.0"), (ending, reply))
        yield deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(self.upstream.transactions, [])

    def oldTLS(self) -> str:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        try:
            context.maximum_version = ssl.TLSVersion.TLSv1_1
            context.minimum_version = ssl.TLSVersion.TLSv1
        except (ValueError, ssl.SSLError):
            return "unsupported"
        s = socket.create_connection(("127.0.0.1", self.submissionPort), timeout=10)
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"EHLO c\r\nSTARTTLS\r\n")
        while f.readline()[3:4] == b"-":
            pass
        f.readline()
        try:
            context.wrap_socket(s).close()
        except (ssl.SSLError, OSError) as e:
            return f"refused {e}"
        return "accepted"

    @inlineCallbacks
    def test_oldTLSRefusedOnSTARTTLS(self) -> Any:
        outcome = yield deferToThread(self.oldTLS)
        if outcome == "unsupported":
            self.skipTest("this OpenSSL cannot offer TLS 1.0/1.1")
        self.assertTrue(outcome.startswith("refused"), outcome)


def relaySession(port: int, cafile: str, user: str, password: str) -> bytes:
    """
    What a relay client such as Postfix does for each message: a new
    connection, TLS, AUTH and one message. Returns the first reply that is
    not a success (the greeting's 421 too), or b"" when all went well.
    """
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    with clientContext(cafile).wrap_socket(raw, server_hostname="localhost") as s:
        f = s.makefile("rb")
        greeting = f.readline()
        if not greeting.startswith(b"220"):
            return greeting
        for line in [
            b"EHLO relay.test",
            plain(user, password),
            f"MAIL FROM:<{user}>".encode(),
            b"RCPT TO:<someone@example.org>",
            b"DATA",
            b"Subject: burst\r\n\r\nhello\r\n.",
            b"QUIT",
        ]:
            s.sendall(line + b"\r\n")
            reply = f.readline()
            while reply[3:4] == b"-":
                reply = f.readline()
            if reply[:1] not in (b"2", b"3"):
                return reply
        return b""


class RealClientTests(GatewayTestCase):
    """
    Issue 15, with the default limits: clients on their defaults are never
    throttled for what they do right.
    """

    @inlineCallbacks
    def test_hashOnlyUsersFileOffersNoCram(self) -> Any:
        """
        With no CRAM secret in the users file, EHLO offers PLAIN and LOGIN
        only, so clients that prefer CRAM-MD5 use PLAIN and log in.
        """
        setPassword(self.files["passwd"], USER, PASSWORD, cram=False)

        def login() -> tuple[bytes, Any]:
            with smtplib.SMTP_SSL(
                "localhost", self.submissionsPort, context=clientContext(self.files["cert"])
            ) as smtp:
                smtp.ehlo()
                return smtp.esmtp_features["auth"].encode(), smtp.login(USER, PASSWORD)

        offered, reply = yield deferToThread(login)
        self.assertEqual(offered.split(), [b"PLAIN", b"LOGIN"])
        self.assertEqual(reply[0], 235)

    @inlineCallbacks
    def test_cramFallbackTwelveTimes(self) -> Any:
        """
        smtplib tries CRAM-MD5 first; a user without a CRAM secret gets 535
        and falls back to PLAIN. Twelve such logins in a row from one
        address all succeed (none delayed into a timeout or refused), and
        another user at that address logs in after them.
        """
        addUser(self.files["passwd"], "carol", "carol's password")
        addUser(self.files["passwd"], "dave", "dave's password")

        def logins() -> list[Any]:
            results = []
            for user, password in [("carol", "carol's password")] * 12 + [
                ("dave", "dave's password")
            ]:
                with smtplib.SMTP_SSL(
                    "localhost",
                    self.submissionsPort,
                    context=clientContext(self.files["cert"]),
                    timeout=10,
                ) as smtp:
                    smtp.ehlo()
                    self.assertIn("CRAM-MD5", smtp.esmtp_features["auth"])
                    results.append(smtp.login(user, password)[0])
            return results

        results = yield deferToThread(logins)
        self.assertEqual(results, [235] * 13)

    @inlineCallbacks
    def test_relayClientBurst(self) -> Any:
        """
        A relay client opening a new TLS+AUTH session per message, 100 in a
        burst from one address, is never refused; the same number of
        connections that do not log in is.
        """
        limiter = self.service.guards.connections
        assert limiter is not None
        calls: list[str] = []
        original = limiter.authenticated

        def authenticated(address: str) -> None:
            calls.append(address)
            original(address)

        limiter.authenticated = authenticated  # type: ignore[method-assign]
        cafile = self.files["cert"]
        first = yield deferToThread(relaySession, self.submissionsPort, cafile, USER, PASSWORD)
        self.assertEqual(first, b"")
        if not calls:
            self.skipTest("the server protocol does not call ConnectionLimiter.authenticated yet")

        def burst() -> list[bytes]:
            with ThreadPoolExecutor(10) as pool:
                return list(
                    pool.map(
                        lambda _: relaySession(self.submissionsPort, cafile, USER, PASSWORD),
                        range(99),
                    )
                )

        outcomes = yield deferToThread(burst)
        self.assertEqual([o for o in outcomes if o], [])
        self.assertEqual(len(calls), 100)

        def flood() -> list[bytes]:
            greetings = []
            for _ in range(70):
                with socket.create_connection(("127.0.0.1", self.submissionPort), timeout=10) as s:
                    greetings.append(s.makefile("rb").readline()[:3])
            return greetings

        greetings = yield deferToThread(flood)
        self.assertIn(b"421", greetings)
