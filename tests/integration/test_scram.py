"""
SCRAM-SHA-256 through a real gateway on 127.0.0.1: scramp (an independent
implementation) as the client, over an implicit-TLS socket and over
STARTTLS, since smtplib has no SCRAM.
"""

from __future__ import annotations

import base64
import socket
from typing import Any

import scramp
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread

from mailgw.auth.passwd import setPassword
from tests.integration.support import PASSWORD, USER, GatewayTestCase, clientContext


class Lines:
    """A tiny SMTP client: send a line, read one (possibly multi-line) reply."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = sock.makefile("rb")

    def reply(self) -> bytes:
        lines = []
        while True:
            line = self.file.readline()
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                return b"".join(lines)

    def command(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()


def scramExchange(smtp: Lines, user: str, password: str) -> tuple[bytes, Any]:
    client = scramp.ScramClient(["SCRAM-SHA-256"], user, password)
    first = base64.b64encode(client.get_client_first().encode())
    reply = smtp.command(b"AUTH SCRAM-SHA-256 " + first)
    if not reply.startswith(b"334 "):
        return reply, client
    client.set_server_first(base64.b64decode(reply[4:].strip()).decode())
    reply = smtp.command(base64.b64encode(client.get_client_final().encode()))
    if not reply.startswith(b"334 "):
        return reply, client
    client.set_server_final(base64.b64decode(reply[4:].strip()).decode())  # checks v=
    return smtp.command(b""), client


class ScramGatewayTests(GatewayTestCase):
    cramSecrets = False

    @inlineCallbacks
    def setUp(self) -> Any:
        yield super().setUp()
        setPassword(self.files["passwd"], USER, PASSWORD, scram=True)

    def implicitTLS(self, password: str) -> bytes:
        context = clientContext(self.files["cert"])
        with socket.create_connection(("127.0.0.1", self.submissionsPort), timeout=30) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as sock:
                smtp = Lines(sock)
                assert smtp.reply().startswith(b"220 ")
                ehlo = smtp.command(b"EHLO client.test")
                assert b"SCRAM-SHA-256" in ehlo, ehlo
                reply, _ = scramExchange(smtp, USER, password)
                if reply.startswith(b"235"):
                    assert smtp.command(b"MAIL FROM:<alice@example.com>").startswith(b"250")
                return reply

    def starttls(self) -> bytes:
        with socket.create_connection(("127.0.0.1", self.submissionPort), timeout=30) as raw:
            smtp = Lines(raw)
            smtp.reply()
            assert b"SCRAM" not in smtp.command(b"EHLO client.test")
            assert smtp.command(b"STARTTLS").startswith(b"220")
            context = clientContext(self.files["cert"])
            with context.wrap_socket(raw, server_hostname="localhost") as sock:
                smtp = Lines(sock)
                smtp.command(b"EHLO client.test")
                return scramExchange(smtp, USER, PASSWORD)[0]

    @inlineCallbacks
    def test_implicitTLS(self) -> Any:
        reply = yield deferToThread(self.implicitTLS, PASSWORD)
        self.assertTrue(reply.startswith(b"235 2.7.0"), reply)

    @inlineCallbacks
    def test_wrongPassword(self) -> Any:
        reply = yield deferToThread(self.implicitTLS, "wrong")
        self.assertTrue(reply.startswith(b"535 5.7.8"), reply)

    @inlineCallbacks
    def test_starttls(self) -> Any:
        reply = yield deferToThread(self.starttls)
        self.assertTrue(reply.startswith(b"235 2.7.0"), reply)
