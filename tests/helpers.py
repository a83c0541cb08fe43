"""
Test helpers: an in-memory server harness and a dialog-script runner.
"""

from __future__ import annotations

import ast
import base64
import re
from pathlib import Path
from typing import Any

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import directlyProvides

from mailgw.auth.realm import makePortal
from mailgw.config import LimitsConfig
from mailgw.limits import AuthThrottle, ConnectionLimiter
from mailgw.server.factory import Guards, ServerSettings, SubmissionFactory
from mailgw.server.protocol import SubmissionServer
from mailgw.testing import MemorySpool

USER = b"alice@example.com"
PASSWORD = b"correct horse"
# Seconds after which every close must have ended the connection, however
# silent the peer (the default close_timeout).
CLOSE_DEADLINE = 5.0


class FakeTLSConnection:
    """Stands in for an OpenSSL connection once the handshake is done."""

    def get_protocol_version_name(self) -> str:
        return "TLSv1.3"

    def get_cipher_name(self) -> str:
        return "TLS_AES_256_GCM_SHA384"


class FakeTLSTransport(StringTransport):
    """
    A StringTransport that records STARTTLS and what was written before it,
    and closes the way the real transports do: in the clear, C{loseConnection}
    ends the connection (the protocol's C{connectionLost} is called); under
    TLS it only starts the TLS close, and the connection stays open until the
    peer answers with its close_notify (L{peerClosesTLS}) or the server
    aborts it: a silent peer keeps it open.
    """

    def __init__(self, secure: bool = False) -> None:
        super().__init__(peerAddress=None)
        self.tlsStarted = secure
        self.writtenBeforeTLS: bytes | None = None
        self.protocol: Any = None
        self.lost = False
        self.aborted = False
        if secure:
            directlyProvides(self, ISSLTransport)

    def loseConnection(self) -> None:
        super().loseConnection()
        if not self.tlsStarted:
            self._connectionLost()

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()
        self._connectionLost()

    def peerClosesTLS(self) -> None:
        """The peer answers our close_notify: the TLS close completes."""
        assert self.disconnecting, "the server did not start closing"
        self._connectionLost()

    def _connectionLost(self) -> None:
        if not self.lost and self.protocol is not None:
            self.lost = True
            self.protocol.connectionLost(Failure(ConnectionDone()))

    def startTLS(self, context: Any) -> None:
        assert not self.tlsStarted, "startTLS called twice"
        self.writtenBeforeTLS = self.value()
        self.tlsStarted = True
        directlyProvides(self, ISSLTransport)

    def getHandle(self) -> Any:
        return FakeTLSConnection() if self.tlsStarted else None

    def getPeer(self) -> Any:
        from twisted.internet.address import IPv4Address

        return IPv4Address("TCP", "192.0.2.7", 40000)


class Harness:
    """A server protocol on a fake transport, with a Clock and a MemorySpool."""

    def __init__(
        self,
        implicitTLS: bool = False,
        checkers: list[Any] | None = None,
        tls: bool = True,
        limits: LimitsConfig | None = None,
        **settings: Any,
    ) -> None:
        self.clock = Clock()
        self.spool = MemorySpool(clock=self.clock)
        if checkers is None:
            checkers = [InMemoryUsernamePasswordDatabaseDontUse(**{USER.decode(): PASSWORD})]
        self.portal = makePortal(checkers)
        settings.setdefault("hostname", "mx.test")
        guards = Guards()
        if limits is not None:
            guards = Guards(
                connections=ConnectionLimiter(self.clock, limits),
                auth=AuthThrottle(self.clock, limits),
            )
        self.factory = SubmissionFactory(
            ServerSettings(**settings),
            self.portal,
            self.spool,
            self.clock,
            tlsContext=object() if tls else None,
            implicitTLS=implicitTLS,
            guards=guards,
        )
        self.implicitTLS = implicitTLS
        self.connect()

    def connect(self) -> None:
        """A new connection to the same listener (the old one is left as it is)."""
        self.protocol: SubmissionServer = self.factory.buildProtocol(None)
        self.transport = FakeTLSTransport(secure=self.implicitTLS)
        self.transport.protocol = self.protocol
        self.protocol.makeConnection(self.transport)
        self.greeting = self.take()

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def take(self) -> bytes:
        """Everything the server wrote since the last take()."""
        value = self.transport.value()
        self.transport.clear()
        return value

    def command(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.take()

    def starttls(self) -> None:
        self.command(b"EHLO client.test")
        assert self.command(b"STARTTLS").startswith(b"220 ")

    def login(self) -> None:
        if not self.transport.tlsStarted:
            self.starttls()
        self.command(b"EHLO client.test")
        token = base64.b64encode(b"\0" + USER + b"\0" + PASSWORD)
        reply = self.command(b"AUTH PLAIN " + token)
        assert reply.startswith(b"235 "), reply

    @property
    def closing(self) -> bool:
        """The server has started to close (it may still wait for the peer)."""
        return bool(self.transport.disconnecting)

    @property
    def closed(self) -> bool:
        """
        The connection is really gone: the protocol saw connectionLost. A
        TLS connection whose close the peer never answered is still open.
        """
        return self.transport.lost

    def hangUp(self) -> None:
        """The client goes away without a word."""
        self.transport._connectionLost()


def dialogHarness(path: Path) -> Harness:
    """
    A Harness for the transcript at ``path``, built from its ``@`` lines:
    ``@ name=value`` is a Harness or ServerSettings argument, ``@limits
    name=value`` a L{LimitsConfig} field (both values Python literals).
    """
    settings: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    for raw in path.read_text().splitlines():
        if raw.startswith("@"):
            target = limits if raw.startswith("@limits ") else settings
            name, _, value = raw.split(" ", 1)[1].partition("=")
            target[name.strip()] = ast.literal_eval(value.strip())
    if limits:
        settings["limits"] = LimitsConfig(**limits)
    return Harness(**settings)


def runDialog(testCase: Any, path: Path, harness: Harness | None = None) -> None:
    """
    Run a dialog transcript against ``harness`` (default: L{dialogHarness}).

    ``C: text`` sends ``text`` CRLF (``\\r``, ``\\n``, ``\\x00`` escapes
    allowed; ``C! text`` sends without CRLF; ``C* n text`` sends ``text``
    ``n`` times, without CRLF); ``S: pattern`` expects the next server line
    to match ``pattern`` where ``*`` stands for any text; ``CLOSED`` expects
    the server to have closed the connection (and the connection to be gone
    within the close deadline, however silent the client); ``ADVANCE s``
    lets ``s`` seconds pass; ``SHUTDOWN`` stops the listener; ``QUEUED n``
    expects ``n`` messages in the spool; ``#`` and ``@`` lines are comments
    and settings. The greeting is checked like any server line.
    """
    if harness is None:
        harness = dialogHarness(path)
    pending = harness.greeting.decode("utf-8").split("\r\n")[:-1]

    def collect() -> None:
        pending.extend(harness.take().decode("utf-8").split("\r\n")[:-1])

    for number, raw in enumerate(path.read_text().splitlines(), 1):
        where = f"{path.name}:{number}"
        if not raw.strip() or raw.startswith(("#", "@")):
            continue
        if raw.startswith(("C: ", "C! ", "C* ")):
            text = raw[3:]
            count = 1
            if raw[1] == "*":
                countText, _, text = text.partition(" ")
                count = int(countText)
            data = text.encode("utf-8").decode("unicode_escape").encode("latin-1")
            harness.send(data * count + (b"\r\n" if raw[1] == ":" else b""))
            collect()
        elif raw.startswith("S: "):
            testCase.assertTrue(pending, f"{where}: server said nothing, expected {raw[3:]!r}")
            line = pending.pop(0)
            pattern = "".join(".*" if c == "*" else re.escape(c) for c in raw[3:]) + r"\Z"
            testCase.assertRegex(line, pattern, f"{where}")
        elif raw.strip() == "CLOSED":
            testCase.assertEqual(pending, [], f"{where}: unexpected server lines")
            # The server closes; a silent TLS peer cannot keep it open past
            # the close deadline.
            testCase.assertTrue(harness.closing, f"{where}: server did not close")
            harness.clock.advance(harness.factory.settings.closeTimeout)
            testCase.assertTrue(harness.closed, f"{where}: connection still open")
        elif raw.startswith("ADVANCE "):
            harness.clock.advance(float(raw.split()[1]))
            collect()
        elif raw.strip() == "SHUTDOWN":
            harness.factory.shutdown()
            collect()
        elif raw.startswith("QUEUED "):
            queued = len(harness.spool.committed)
            testCase.assertEqual(queued, int(raw.split()[1]), f"{where}: messages queued")
        else:
            raise ValueError(f"{where}: bad dialog line {raw!r}")
    testCase.assertEqual(pending, [], f"{path.name}: unexpected server lines")
