"""
Tests for L{mailgw.control}: the control socket's requests in memory, then
the service and the blocking client over real UNIX sockets.
"""

from __future__ import annotations

import json
import os
import socket
import stat
from typing import Any, cast

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailgw.control import (
    MAX_IDS,
    MAX_LINE_LENGTH,
    ControlError,
    ControlFactory,
    ControlService,
    ControlUnavailable,
    defaultSocketPath,
    handleRequest,
    parseRequest,
    sendCommand,
)
from mailgw.interfaces import IQueueControl
from mailgw.queue.spool import SpoolError

A = "0005F1A2B3C4D0000001"
B = "0005F1A2B3C4D0000002"
C = "0005F1A2B3C4D0000003"
UNKNOWN = "0005F1A2B3C4DFFFFFFF"


@implementer(IQueueControl)
@attrs.define
class FakeQueueControl:
    """
    An L{IQueueControl} over a set of known ids that records its calls.
    Unknown ids fail with KeyError; ``failing`` ids with a SpoolError; while
    ``gate`` is set, every call waits for it.
    """

    known: set[str] = attrs.field(factory=lambda: {A, B, C})
    held: set[str] = attrs.field(factory=set)
    failing: set[str] = attrs.field(factory=set)
    calls: list[tuple[str, Any]] = attrs.field(factory=list)
    gate: Deferred[None] | None = None
    arrived: Deferred[None] = attrs.field(factory=Deferred)

    def _call(self, name: str, argument: Any, ids: list[str], result: Any) -> Deferred[Any]:
        self.calls.append((name, argument))
        if not self.arrived.called:
            self.arrived.callback(None)
        for queueId in ids:
            if queueId not in self.known:
                return fail(KeyError(queueId))
            if queueId in self.failing:
                return fail(SpoolError("disk on fire"))
        if self.gate is None:
            return succeed(result)
        return self.gate.addCallback(lambda _: result)

    def notify(self, queueId: str) -> Deferred[None]:
        return self._call("notify", queueId, [queueId], None)

    def flush(self, queueIds: list[str] | None = None) -> Deferred[int]:
        ids = list(self.known) if queueIds is None else list(queueIds)
        scheduled = len([i for i in ids if i not in self.held])
        return self._call("flush", queueIds, ids, scheduled)

    def hold(self, queueId: str) -> Deferred[None]:
        self.held.add(queueId)
        return self._call("hold", queueId, [queueId], None)

    def release(self, queueId: str) -> Deferred[None]:
        self.held.discard(queueId)
        return self._call("release", queueId, [queueId], None)

    def delete(self, queueId: str) -> Deferred[None]:
        d = self._call("delete", queueId, [queueId], None)
        self.known.discard(queueId)
        return d


def request(command: Any, ids: Any = None) -> bytes:
    data: dict[str, Any] = {"command": command}
    if ids is not None:
        data["ids"] = ids
    return json.dumps(data).encode("ascii")


class RequestTests(SynchronousTestCase):
    """L{parseRequest} and L{handleRequest}, without any connection."""

    def setUp(self) -> None:
        self.control = FakeQueueControl()

    def handle(self, line: bytes) -> dict[str, Any]:
        return self.successResultOf(handleRequest(self.control, line))

    def test_fakeProvidesInterface(self) -> None:
        self.assertTrue(verifyObject(IQueueControl, self.control))

    def test_malformed(self) -> None:
        """
        Whatever is not a well-formed request is answered with an error and
        reaches nothing.
        """
        cases = [
            (b"{not json", "bad request: not a JSON object"),
            (b"\xff\xfe", "bad request: not a JSON object"),
            (b"[1, 2]", "bad request: not a JSON object"),
            (request("explode"), "unknown command explode"),
            (request(7), "unknown command 7"),
            (b"{}", "unknown command null"),
            (request("hold", A), "bad request: ids must be a list of queue ids"),
            (request("hold", [A, 7]), "bad request: ids must be a list of queue ids"),
            (request("hold", []), "hold needs at least one queue id"),
            (request("delete"), "delete needs at least one queue id"),
            (request("hold", [A] * (MAX_IDS + 1)), "too many ids: 1001 (at most 1000 per request)"),
        ]
        for line, error in cases:
            self.assertEqual(self.handle(line), {"ok": False, "error": error}, line)
        self.assertEqual(self.control.calls, [])

    def test_longJunkShortened(self) -> None:
        """An unknown command is echoed at most 40 characters long."""
        answer = self.handle(request("x" * 100))
        self.assertEqual(answer["error"], "unknown command " + "x" * 37 + "...")

    def test_parseRemovesDuplicates(self) -> None:
        self.assertEqual(parseRequest(request("hold", [B, A, B])), ("hold", [B, A]))

    def test_ping(self) -> None:
        self.assertEqual(self.handle(request("ping")), {"ok": True, "count": 0})
        self.assertEqual(self.control.calls, [])

    def test_perMessageCommands(self) -> None:
        """hold, release and delete call the control once per id, in order."""
        for command in ("hold", "release", "delete"):
            self.control = FakeQueueControl()
            self.assertEqual(self.handle(request(command, [B, A])), {"ok": True, "count": 2})
            self.assertEqual(self.control.calls, [(command, B), (command, A)])

    def test_flushAll(self) -> None:
        """flush without ids flushes the whole queue; count is what was scheduled."""
        self.control.held = {A}
        self.assertEqual(self.handle(request("flush")), {"ok": True, "count": 2})
        self.assertEqual(self.control.calls, [("flush", None)])

    def test_flushSome(self) -> None:
        """flush with ids flushes each; a held one is not counted."""
        self.control.held = {A}
        self.assertEqual(self.handle(request("flush", [A, B])), {"ok": True, "count": 1})
        self.assertEqual(self.control.calls, [("flush", [A]), ("flush", [B])])

    def test_unknownIds(self) -> None:
        """
        Unknown ids (and malformed ones, which never reach the control) are
        named in the error; the others are still done and counted.
        """
        answer = self.handle(request("hold", [A, UNKNOWN, "../../etc", B]))
        self.assertEqual(
            answer,
            {"ok": False, "error": f"unknown queue ids {UNKNOWN}, ../../etc", "count": 2},
        )
        self.assertEqual(self.control.calls, [("hold", A), ("hold", UNKNOWN), ("hold", B)])

    def test_oneUnknownId(self) -> None:
        self.assertEqual(
            self.handle(request("delete", [UNKNOWN])),
            {"ok": False, "error": f"unknown queue id {UNKNOWN}", "count": 0},
        )

    def test_failure(self) -> None:
        """
        A failing call stops the request; the error names the message and
        the cause, is logged, and says how many were done before.
        """
        self.control.failing = {B}
        with capturedLogs() as events:
            answer = self.handle(request("release", [A, B, C]))
        self.assertEqual(
            answer, {"ok": False, "error": f"release {B} failed: disk on fire", "count": 1}
        )
        self.assertEqual(self.control.calls, [("release", A), ("release", B)])
        self.assertTrue(any(e.get("log_failure") for e in events))
        self.flushLoggedErrors(SpoolError)


class ProtocolTests(SynchronousTestCase):
    """L{ControlProtocol} over a StringTransport."""

    def setUp(self) -> None:
        self.control = FakeQueueControl()
        self.clock = Clock()
        self.factory = ControlFactory(self.control, self.clock, idleTimeout=60)
        self.protocol = self.factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def answers(self) -> list[dict[str, Any]]:
        data = self.transport.value()
        self.transport.clear()
        return [json.loads(line) for line in data.splitlines()]

    def test_answersInOrder(self) -> None:
        """
        Pipelined requests are carried out one at a time: while one waits,
        the next is not even read.
        """
        self.control.gate = Deferred()
        self.protocol.dataReceived(request("hold", [A]) + b"\n" + request("ping") + b"\r\n")
        self.assertEqual(self.answers(), [])
        self.assertEqual(self.transport.producerState, "paused")
        self.control.gate.callback(None)
        self.assertEqual(self.answers(), [{"ok": True, "count": 1}, {"ok": True, "count": 0}])
        self.assertEqual(self.transport.producerState, "producing")

    def test_badJSON(self) -> None:
        """Bad JSON is answered; the connection stays usable."""
        self.protocol.dataReceived(b"hello\n" + request("ping") + b"\n")
        self.assertEqual(
            self.answers(),
            [{"ok": False, "error": "bad request: not a JSON object"}, {"ok": True, "count": 0}],
        )
        self.assertFalse(self.transport.disconnecting)

    def test_overlongLine(self) -> None:
        """A line over 64 KiB is answered with an error and the connection closed."""
        self.protocol.dataReceived(b"x" * (MAX_LINE_LENGTH + 2))
        self.assertEqual(
            self.answers(),
            [{"ok": False, "error": "request line too long (at most 65536 bytes)"}],
        )
        self.assertTrue(self.transport.disconnecting)

    def test_longestLine(self) -> None:
        """A request of exactly the limit is served."""
        line = request("ping")
        line += b" " * (MAX_LINE_LENGTH - len(line))
        self.protocol.dataReceived(line + b"\n")
        self.assertEqual(self.answers(), [{"ok": True, "count": 0}])

    def test_idleTimeout(self) -> None:
        """A connection idle for the timeout is closed; each request restarts it."""
        self.clock.advance(59)
        self.protocol.dataReceived(request("ping") + b"\n")
        self.clock.advance(59)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(self.transport.disconnecting)

    def test_noTimeoutWhileBusy(self) -> None:
        """A long command is not cut off by the idle timeout."""
        self.control.gate = Deferred()
        self.protocol.dataReceived(request("delete", [A]) + b"\n")
        self.clock.advance(600)
        self.assertFalse(self.transport.disconnecting)
        self.control.gate.callback(None)
        self.assertEqual(self.answers(), [{"ok": True, "count": 1}])

    def test_lostWhileBusy(self) -> None:
        """A command whose client has gone still runs, and answers nobody."""
        self.control.gate = Deferred()
        self.protocol.dataReceived(request("delete", [A]) + b"\n")
        self.protocol.connectionLost(None)
        self.control.gate.callback(None)
        self.assertEqual(self.transport.value(), b"")
        self.assertEqual(self.control.calls, [("delete", A)])
        self.assertEqual(self.factory.connections, set())


class ClientWithoutServerTests(SynchronousTestCase):
    """L{sendCommand} when nothing (or something odd) listens."""

    def setUp(self) -> None:
        os.mkdir(self.mktemp())
        self.directory = os.path.dirname(self.mktemp())
        self.path = defaultSocketPath(self.directory)

    def test_defaultPath(self) -> None:
        self.assertEqual(defaultSocketPath("/var/spool/mailgw"), "/var/spool/mailgw/control.sock")

    def test_noSocketFile(self) -> None:
        error = self.assertRaises(ControlUnavailable, sendCommand, self.path, "ping")
        self.assertEqual(str(error), f"nothing listens on {self.path} (is the gateway running?)")

    def test_staleSocketFile(self) -> None:
        """A socket file nobody listens on (the gateway crashed): unavailable."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(self.path)
        self.assertRaises(ControlUnavailable, sendCommand, self.path, "ping")

    def test_timeout(self) -> None:
        """Something listens but never answers: a ControlError, not a hang."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(self.path)
            s.listen(1)
            error = self.assertRaises(ControlError, sendCommand, self.path, "ping", timeout=0.1)
        self.assertNotIsInstance(error, ControlUnavailable)
        self.assertEqual(str(error), f"{self.path}: no answer from the gateway within 0.1 s")

    def test_tooManyIds(self) -> None:
        ids = [A] * 3000
        error = self.assertRaises(ControlError, sendCommand, self.path, "hold", ids)
        self.assertEqual(str(error), "request too long: send at most 1000 ids at a time")


class Replying(Protocol):
    """Sends ``factory.reply`` (and closes) as soon as a line arrives."""

    transport: Any

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(self.factory.reply)
        self.transport.loseConnection()


class ServiceTests(TestCase):
    """L{ControlService} and L{sendCommand} over a real UNIX socket."""

    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.mkdir(self.directory, 0o700)
        self.path = defaultSocketPath(self.directory)
        self.control = FakeQueueControl()
        self.service = ControlService(self.path, self.control, reactor)

    def start(self) -> None:
        self.service.startService()
        self.addCleanup(self.stop)

    def stop(self) -> Deferred[None] | None:
        return self.service.stopService() if self.service.running else None

    def send(self, command: str, ids: list[str] | tuple[str, ...] = ()) -> Deferred[Any]:
        return deferToThread(sendCommand, self.path, command, ids, 5)

    def sendRaw(self, data: bytes) -> Deferred[bytes]:
        def exchange() -> bytes:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect(self.path)
                s.sendall(data)
                received = b""
                while chunk := s.recv(4096):
                    received += chunk
                    if data.endswith(b"\n") and received.endswith(b"\n"):
                        break
                return received

        return deferToThread(exchange)

    @inlineCallbacks
    def test_commands(self) -> Any:
        """Each command goes from the client to the control and back."""
        self.start()
        self.assertEqual((yield self.send("ping")), {"ok": True, "count": 0})
        self.assertEqual((yield self.send("hold", [A, B])), {"ok": True, "count": 2})
        self.assertEqual((yield self.send("flush")), {"ok": True, "count": 1})
        self.assertEqual((yield self.send("release", [B])), {"ok": True, "count": 1})
        self.assertEqual((yield self.send("flush", [B])), {"ok": True, "count": 1})
        self.assertEqual((yield self.send("delete", [C])), {"ok": True, "count": 1})
        self.assertEqual(
            self.control.calls,
            [("hold", A), ("hold", B), ("flush", None), ("release", B), ("flush", [B]),
             ("delete", C)],
        )  # fmt: skip

    @inlineCallbacks
    def test_unknownId(self) -> Any:
        self.start()
        answer = yield self.send("hold", [UNKNOWN])
        self.assertEqual(answer, {"ok": False, "error": f"unknown queue id {UNKNOWN}", "count": 0})

    @inlineCallbacks
    def test_badJSON(self) -> Any:
        self.start()
        received = yield self.sendRaw(b"{nope\n")
        self.assertEqual(
            json.loads(received), {"ok": False, "error": "bad request: not a JSON object"}
        )

    @inlineCallbacks
    def test_overlongLine(self) -> Any:
        """The server answers an overlong line and hangs up."""
        self.start()
        received = yield self.sendRaw(b"x" * (MAX_LINE_LENGTH + 100))
        self.assertEqual(
            json.loads(received),
            {"ok": False, "error": "request line too long (at most 65536 bytes)"},
        )

    @inlineCallbacks
    def test_socketModeAndRemoval(self) -> Any:
        """The socket is mode 0600 while listening, and gone after stop."""
        self.start()
        mode = os.lstat(self.path).st_mode
        self.assertTrue(stat.S_ISSOCK(mode))
        self.assertEqual(stat.S_IMODE(mode), 0o600)
        yield self.service.stopService()
        self.assertFalse(os.path.lexists(self.path))
        yield self.assertFailure(self.send("ping"), ControlUnavailable)

    @inlineCallbacks
    def test_staleSocketReplaced(self) -> Any:
        """A socket file left by a crash is replaced."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(self.path)
        self.start()
        self.assertEqual((yield self.send("ping")), {"ok": True, "count": 0})

    def test_liveSocketKept(self) -> None:
        """Another process listening there: refuse, and leave its socket alone."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(self.path)
            s.listen(1)
            error = self.assertRaises(CannotListenError, self.service.startService)
            self.assertIn("another process listens on it", str(error))
            self.assertTrue(os.path.lexists(self.path))
        self.assertFalse(self.service.running)

    def test_notASocket(self) -> None:
        """A regular file in the way is never deleted."""
        with open(self.path, "w") as f:
            f.write("precious")
        error = self.assertRaises(CannotListenError, self.service.startService)
        self.assertIn("exists and is not a socket", str(error))
        with open(self.path) as f:
            self.assertEqual(f.read(), "precious")

    @inlineCallbacks
    def test_stopClosesConnections(self) -> Any:
        """Stopping closes open connections: a client waiting sees the end."""
        self.control.gate = Deferred()
        self.start()
        d = self.send("hold", [A])
        yield self.control.arrived
        yield self.service.stopService()
        error = yield self.assertFailure(d, ControlError)
        self.assertIn("closed the connection without answering", str(error))
        self.control.gate.callback(None)

    @inlineCallbacks
    def test_notAnAnswer(self) -> Any:
        """Something else listening there: a ControlError that says so."""
        factory = Factory.forProtocol(Replying)
        factory.reply = b"220 hello\n"  # type: ignore[attr-defined]
        port = cast(Any, reactor).listenUNIX(self.path, factory)
        self.addCleanup(port.stopListening)
        error = yield self.assertFailure(self.send("ping"), ControlError)
        self.assertEqual(str(error), f"{self.path}: not an answer from a mailgw gateway")
