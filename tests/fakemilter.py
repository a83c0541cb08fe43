"""
A scripted in-memory milter for the session tests (a test tool, not a test
module): it decodes what the MTA sends, records it, and answers as told.

    milter = FakeMilter(replies={codec.MAIL: [codec.packet(codec.REJECT)]})
    chain = milter.chain(clock)   # a MilterChain whose one milter is this one
"""

from __future__ import annotations

import struct
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mailgw.milter import codec
from mailgw.milter.chain import MilterChain
from mailgw.milter.client import MilterClient, MilterUnavailable, Negotiated
from mailgw.milter.settings import MilterServer

#: Commands a milter never answers.
_SILENT = {codec.MACRO, codec.ABORT, codec.QUIT, codec.QUIT_NC}
#: The NR_* step flag of each command.
_NO_REPLY = {
    codec.CONNECT: codec.NR_CONN,
    codec.HELO: codec.NR_HELO,
    codec.MAIL: codec.NR_MAIL,
    codec.RCPT: codec.NR_RCPT,
    codec.DATA: codec.NR_DATA,
    codec.HEADER: codec.NR_HDR,
    codec.EOH: codec.NR_EOH,
    codec.BODY: codec.NR_BODY,
}


def response(code: bytes, data: bytes = b"") -> bytes:
    return codec.packet(code, data)


def header(code: bytes, name: bytes, value: bytes, index: int | None = None) -> bytes:
    prefix = b"" if index is None else struct.pack(">I", index)
    return codec.packet(code, prefix + name + b"\0" + value + b"\0")


def text(code: bytes, value: bytes) -> bytes:
    return codec.packet(code, value + b"\0")


class _Transport(StringTransport):
    def __init__(self, milter: FakeMilter) -> None:
        super().__init__()
        self.milter = milter
        self.aborted = False

    def write(self, data: bytes) -> None:
        super().write(data)
        self.milter.received(data)

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()


@attrs.define(eq=False)
class FakeMilter:
    """
    ``replies`` maps a command code to the answers for its next uses (each
    a bytes of packets; the last one repeats); unlisted commands get
    CONTINUE. ``hang``: commands never answered. ``down``: the connection
    fails. ``raw``: bytes sent instead of the option negotiation.
    """

    replies: dict[bytes, list[bytes]] = attrs.field(factory=dict)
    actions: int = codec.OFFERED_ACTIONS
    steps: int = 0
    hang: set[bytes] = attrs.field(factory=set)
    down: bool = False
    raw: bytes | None = None
    defaultAction: str = "tempfail"
    commands: list[tuple[bytes, bytes]] = attrs.field(factory=list)
    macros: dict[bytes, dict[str, str]] = attrs.field(factory=dict)
    clients: list[MilterClient] = attrs.field(factory=list)
    transports: list[_Transport] = attrs.field(factory=list)
    _buffer: bytes = b""

    def server(self, **kwargs: Any) -> MilterServer:
        kwargs.setdefault("defaultAction", self.defaultAction)
        return MilterServer("inet:127.0.0.1:9", "tcp:host=127.0.0.1:port=9", **kwargs)

    def chain(self, clock: IReactorTime, hostname: str = "mx.test", **kwargs: Any) -> MilterChain:
        self._clock = clock
        return MilterChain((self.server(**kwargs),), clock, hostname, connect=self.connect)

    def connect(self, server: MilterServer) -> Deferred[tuple[MilterClient, Negotiated]]:
        if self.down:
            return fail(MilterUnavailable("cannot connect: refused"))
        client = MilterClient(self._clock, server.commandTimeout)
        transport = _Transport(self)
        self.clients.append(client)
        self.transports.append(transport)
        self._buffer = b""
        client.makeConnection(transport)
        return client.ready.addCallback(lambda options: (client, options))

    _clock: Any = None

    def received(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= 5:
            (length,) = struct.unpack(">I", self._buffer[:4])
            if len(self._buffer) < 4 + length:
                return
            code, body = self._buffer[4:5], self._buffer[5 : 4 + length]
            self._buffer = self._buffer[4 + length :]
            self._command(code, body)

    def _command(self, code: bytes, body: bytes) -> None:
        self.commands.append((code, body))
        client = self.clients[-1]
        if code == codec.OPTNEG:
            answer = self.raw
            if answer is None:
                answer = codec.packet(
                    codec.OPTNEG, struct.pack(">III", 6, self.actions, self.steps)
                )
            client.dataReceived(answer)
            return
        if code == codec.MACRO:
            pairs = body[1:].split(b"\0")[:-1]
            self.macros[body[:1]] = {
                pairs[i].decode(): pairs[i + 1].decode() for i in range(0, len(pairs), 2)
            }
        if code in _SILENT or code in self.hang:
            return
        flag = _NO_REPLY.get(code)
        if flag is not None and self.steps & flag:
            return
        queued = self.replies.get(code)
        if queued:
            answer = queued.pop(0) if len(queued) > 1 else queued[0]
        else:
            answer = codec.packet(codec.CONTINUE)
        client.dataReceived(answer)

    def sent(self, code: bytes) -> list[bytes]:
        """The data of every command ``code`` received."""
        return [body for c, body in self.commands if c == code]


def fakeChain(clock: IReactorTime, *milters: FakeMilter, hostname: str = "mx.test") -> MilterChain:
    """A chain of several fake milters, in order."""
    for m in milters:
        m._clock = clock
    servers = tuple(attrs.evolve(m.server(), address=f"inet:127.0.0.1:{i + 9}") for i, m in
                    enumerate(milters))  # fmt: skip
    byAddress = {s.address: m for s, m in zip(servers, milters, strict=True)}

    def connect(server: MilterServer) -> Deferred[tuple[MilterClient, Negotiated]]:
        return byAddress[server.address].connect(server)

    return MilterChain(servers, clock, hostname, connect=connect)


__all__ = ["FakeMilter", "Failure", "fakeChain", "header", "response", "text"]
