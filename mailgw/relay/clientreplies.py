"""
Upstream replies parsed under hard limits, the errors that end a relay
session, and short texts for connection failures.

Every byte here comes from an upstream we do not control: a reply line
longer than L{MAX_REPLY_LINE} octets, a reply of more than
L{MAX_REPLY_LINES} lines, or a malformed code is a L{ProtocolError}, which
ends the session (transient for everything not yet finished).
"""

from __future__ import annotations

import re

import attrs
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import error
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure

MAX_REPLY_LINE = 4096
MAX_REPLY_LINES = 100

# RFC 5321 4.2: three digits, the first 2-5 (no 1yz reply exists in SMTP),
# the second 0-5; then SP, "-" or the end of the line.
_REPLY_LINE = re.compile(rb"([2-5][0-5][0-9])([ -]|$)")
# RFC 3463 2: class.subject.detail; the class must match the reply's.
_ENHANCED = re.compile(r"([245])\.(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})(?: +|$)")


@attrs.frozen
class Reply:
    """
    One upstream reply: its code, its enhanced status code (RFC 2034; empty
    when absent) and its text lines, the enhanced code removed from each
    and every non-printable character replaced by "?".
    """

    code: int
    enhanced: str
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        """All lines joined by a space: safe for one line of a log or DSN."""
        return " ".join(line for line in self.lines if line)

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 300

    def __str__(self) -> str:
        return " ".join(part for part in (str(self.code), self.enhanced, self.text) if part)


class RelayError(Exception):
    """
    A failure that ends the session: every recipient not yet finished gets
    a transient result whose text is C{str(self)}.

    @ivar reply: the upstream reply behind it, if any.
    @ivar polite: the connection is still in step, so QUIT may be sent.
    """

    def __init__(self, text: str, reply: Reply | None = None, polite: bool = False) -> None:
        super().__init__(text)
        self.reply = reply
        self.polite = polite


class ProtocolError(RelayError):
    """The upstream broke the protocol (or a limit of ours)."""


class ReplyTimeout(RelayError):
    """The upstream did not answer, or did not take data, in time."""


class ConnectionFailed(RelayError):
    """The connection could not be made, or was lost; TLS failures included."""


class LocalError(RelayError):
    """Our side failed (e.g. the spool file could not be read)."""


def _printable(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace")
    return "".join(c if c.isprintable() else "?" for c in text)


class ReplyParser:
    """
    Turn upstream bytes into L{Reply} values, enforcing the limits.

    A bare LF is accepted as a line end (being lenient costs a client
    nothing); a CR before it is dropped.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._code = b""
        self._lines: list[bytes] = []

    @property
    def pending(self) -> bool:
        """Whether bytes of an unfinished reply are held."""
        return bool(self._buffer or self._lines)

    def feed(self, data: bytes) -> list[Reply]:
        """
        @return: the replies completed by C{data}, in order.
        @raise ProtocolError: the upstream broke a rule or a limit.
        """
        self._buffer += data
        replies = []
        start = 0
        while (end := self._buffer.find(b"\n", start)) >= 0:
            line = self._buffer[start:end]
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            reply = self._line(line)
            if reply is not None:
                replies.append(reply)
        self._buffer = self._buffer[start:]
        if len(self._buffer) > MAX_REPLY_LINE + 1:
            raise ProtocolError(f"protocol error: reply line longer than {MAX_REPLY_LINE} octets")
        return replies

    def _line(self, line: bytes) -> Reply | None:
        if len(line) > MAX_REPLY_LINE:
            raise ProtocolError(f"protocol error: reply line longer than {MAX_REPLY_LINE} octets")
        match = _REPLY_LINE.match(line)
        if match is None:
            raise ProtocolError(f"protocol error: malformed reply line {_printable(line[:60])!r}")
        code = match.group(1)
        if self._lines and code != self._code:
            # RFC 5321 4.2.1: every line of a multiline reply has the same code.
            raise ProtocolError("protocol error: multiline reply changes its code")
        self._code = code
        self._lines.append(line[4:])
        if len(self._lines) > MAX_REPLY_LINES:
            raise ProtocolError(f"protocol error: reply longer than {MAX_REPLY_LINES} lines")
        if match.group(2) == b"-":
            return None
        lines, self._lines = self._lines, []
        return _makeReply(int(code), lines)


def _makeReply(code: int, raw: list[bytes]) -> Reply:
    lines = [_printable(line) for line in raw]
    enhanced = ""
    first = _ENHANCED.match(lines[0])
    if first is not None and first.group(1) == str(code)[0]:
        enhanced = ".".join(first.group(1, 2, 3))
        # RFC 2034 3: the code prefixes the text of every line.
        lines = [_ENHANCED.sub("", line, count=1) for line in lines]
    return Reply(code, enhanced, tuple(lines))


def describeFailure(reason: Failure) -> str:
    """
    A short text for a connection failure or loss, TLS and certificate
    verification failures told apart.
    """
    exc = reason.value
    if isinstance(exc, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, error.DNSLookupError):
        return "host name lookup failed"
    if isinstance(exc, error.TimeoutError | CancelledError):
        return "timeout connecting to upstream"
    if isinstance(exc, VerificationError):
        return f"certificate verification failed: {_mismatches(exc)}"
    if isinstance(exc, SSL.Error):
        text = "; ".join(
            str(part[-1]) if isinstance(part, tuple) else str(part) for part in _sslErrors(exc)
        )
        if "certificate verify failed" in text:
            return f"certificate verification failed: {text}"
        return f"TLS handshake failed: {text}"
    if isinstance(exc, error.ConnectionDone):
        return "upstream closed the connection"
    if isinstance(exc, error.ConnectionLost):
        return "connection lost"
    return f"connection failed: {exc.__class__.__name__}: {exc}"


def _mismatches(exc: VerificationError) -> str:
    names = []
    for mismatch in getattr(exc, "errors", []):
        wanted = getattr(mismatch, "mismatched_id", None)
        name = getattr(wanted, "hostname", None) or getattr(wanted, "ip", None)
        if isinstance(name, bytes):
            name = name.decode("ascii", "replace")
        if name is not None:
            names.append(str(name))
    if not names:
        return str(exc)
    return "certificate does not name " + ", ".join(names)


def _sslErrors(exc: SSL.Error) -> list[object]:
    args = exc.args[0] if exc.args and isinstance(exc.args[0], list) else list(exc.args)
    return args or ["unknown error"]
