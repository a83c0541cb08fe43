"""
The client side of Dovecot's authentication protocol, version 1 (the one
Postfix's C{smtpd_sasl_type = dovecot} and chasquid speak), on one
connection: the handshake and the requests in flight.

The protocol is line-based, one tab-separated record a line:

    C: VERSION	1	1
    C: CPID	<pid>
    S: VERSION	1	2
    S: MECH	PLAIN	plaintext
    S: ...		(SPID, CUID, COOKIE)
    S: DONE
    C: AUTH	<id>	PLAIN	service=smtp	secured	nologin	rip=...	resp=<base64>
    S: OK	<id>	user=alice  |  FAIL	<id>	[temp]	...  |  CONT	<id>	<base64>
    C: CONT	<id>	<base64>	(the client's answer to a CONT: CRAM-MD5, SCRAM)

Many requests may be in flight on one connection, told apart by id.
L{mailgw.auth.dovecot} manages the connection (reuse, reconnection,
timeouts) and turns answers into logins.
"""

from __future__ import annotations

import base64
import os

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

__all__ = ["DovecotAnswer", "DovecotAuthProtocol", "DovecotUnavailable", "tabEscape", "tabUnescape"]


class DovecotUnavailable(Exception):
    """
    Dovecot's auth service could not answer (unreachable, disconnected,
    too slow, a temporary failure on its side, or a reply we cannot
    understand): the client hears 454 4.7.0 and tries again later.
    """


@attrs.frozen
class DovecotAnswer:
    """One answer: ``kind`` is ``OK``, ``FAIL`` or ``CONT``; ``fields`` follow the id."""

    kind: str
    fields: tuple[bytes, ...]

    def params(self) -> dict[str, bytes]:
        """``key=value`` fields (unescaped) by key; a bare flag maps to C{b""}."""
        found: dict[str, bytes] = {}
        for field in self.fields:
            key, _, value = field.partition(b"=")
            found.setdefault(key.decode("ascii", "replace"), tabUnescape(value))
        return found


_DONE = Failure(ConnectionDone())

_ESCAPES = {b"1": b"\x01", b"t": b"\t", b"r": b"\r", b"n": b"\n", b"0": b"\0"}


def tabUnescape(value: bytes) -> bytes:
    """Undo Dovecot's tab-escaping (``\\x01`` then ``1``, ``t``, ``r``, ``n`` or ``0``)."""
    if b"\x01" not in value:
        return value
    out = bytearray()
    i = 0
    while i < len(value):
        c = value[i : i + 1]
        if c == b"\x01" and i + 1 < len(value):
            out += _ESCAPES.get(value[i + 1 : i + 2], value[i + 1 : i + 2])
            i += 2
        else:
            out += c
            i += 1
    return bytes(out)


def tabEscape(value: bytes) -> bytes:
    """Dovecot's tab-escaping, so that no value can end a field or a line."""
    return (
        value.replace(b"\x01", b"\x011")
        .replace(b"\t", b"\x01t")
        .replace(b"\r", b"\x01r")
        .replace(b"\n", b"\x01n")
        .replace(b"\0", b"\x010")
    )


class DovecotAuthProtocol(LineOnlyReceiver):
    """
    One connection to Dovecot's auth service. ``ready`` fires with the
    mechanisms Dovecot offers once its handshake is done, or fails with
    L{DovecotUnavailable}; L{authenticate} sends a request and returns its
    answer. When the connection is lost, everything waiting fails with
    L{DovecotUnavailable}.
    """

    delimiter = b"\n"
    # Dovecot's own lines are short; a huge one means we are not talking to it.
    MAX_LENGTH = 16384
    _log = Logger()

    def __init__(self) -> None:
        self.ready: Deferred[tuple[str, ...]] = Deferred()
        self.mechanisms: tuple[str, ...] | None = None
        self.lost = False
        self._offered: list[str] = []
        self._versionSeen = False
        self._pending: dict[int, Deferred[DovecotAnswer]] = {}
        self._nextId = 1

    def connectionMade(self) -> None:
        self.sendLine(b"VERSION\t1\t1")
        self.sendLine(b"CPID\t%d" % os.getpid())

    def _broken(self, why: str) -> None:
        self._log.error("Dovecot auth protocol error: {why}", why=why)
        assert self.transport is not None
        self.transport.loseConnection()

    def lineReceived(self, line: bytes) -> None:
        fields = line.rstrip(b"\r").split(b"\t")
        if self.mechanisms is None:
            self._handshakeLine(fields)
            return
        if fields[0] not in (b"OK", b"FAIL", b"CONT") or len(fields) < 2:
            return  # other records (none expected) carry nothing for us
        try:
            requestId = int(fields[1])
        except ValueError:
            self._broken("answer without a numeric id")
            return
        waiting = self._pending.pop(requestId, None)
        if waiting is not None:  # else: answered after we gave up on it
            waiting.callback(DovecotAnswer(fields[0].decode("ascii"), tuple(fields[2:])))

    def _handshakeLine(self, fields: list[bytes]) -> None:
        if fields[0] == b"VERSION":
            if len(fields) < 2 or fields[1] != b"1":
                self._broken("unsupported protocol version")
                return
            self._versionSeen = True
        elif fields[0] == b"MECH" and len(fields) >= 2:
            self._offered.append(fields[1].decode("ascii", "replace").upper())
        elif fields[0] == b"DONE":
            if not self._versionSeen:
                self._broken("handshake without VERSION")
                return
            self.mechanisms = tuple(self._offered)
            self.ready.callback(self.mechanisms)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._broken("line too long")

    def authenticate(self, mechanism: str, params: list[bytes]) -> Deferred[DovecotAnswer]:
        """
        Send ``AUTH id mechanism params...`` (each already escaped) and
        return its answer. Cancelling the Deferred forgets the request (a
        late answer is ignored) and sends Dovecot a CANCEL.
        """
        return self.request(mechanism, params)[1]

    def request(self, mechanism: str, params: list[bytes]) -> tuple[int, Deferred[DovecotAnswer]]:
        """L{authenticate}, with the request's id for L{continueRequest}."""
        assert self.transport is not None and self.mechanisms is not None
        if self.lost:
            raise DovecotUnavailable("connection to Dovecot lost")
        requestId = self._nextId
        self._nextId = self._nextId % 0xFFFFFFFF + 1
        waiting = self._await(requestId)
        self.sendLine(b"\t".join([b"AUTH", b"%d" % requestId, mechanism.encode("ascii"), *params]))
        return requestId, waiting

    def continueRequest(self, requestId: int, data: bytes) -> Deferred[DovecotAnswer]:
        """
        Send ``CONT id base64(data)``, the client's answer to Dovecot's
        last CONT for this request, and return Dovecot's next answer.
        """
        if self.lost:
            raise DovecotUnavailable("connection to Dovecot lost")
        waiting = self._await(requestId)
        self.sendLine(b"CONT\t%d\t%s" % (requestId, base64.b64encode(data)))
        return waiting

    def cancelRequest(self, requestId: int) -> None:
        """Tell Dovecot to forget a request (one waiting for the client)."""
        self._pending.pop(requestId, None)
        if not self.lost and self.transport is not None:
            self.sendLine(b"CANCEL\t%d" % requestId)

    def _await(self, requestId: int) -> Deferred[DovecotAnswer]:
        def cancel(d: Deferred[DovecotAnswer]) -> None:
            if self._pending.pop(requestId, None) is not None and not self.lost:
                self.sendLine(b"CANCEL\t%d" % requestId)

        waiting: Deferred[DovecotAnswer] = Deferred(cancel)
        self._pending[requestId] = waiting
        return waiting

    def connectionLost(self, reason: Failure = _DONE) -> None:
        self.lost = True
        pending, self._pending = self._pending, {}
        if self.mechanisms is None:
            self.ready.errback(DovecotUnavailable("Dovecot closed the connection in its handshake"))
        for waiting in pending.values():
            waiting.errback(DovecotUnavailable("connection to Dovecot lost"))
