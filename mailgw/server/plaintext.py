"""
Plaintext on the implicit-TLS (submissions) port: a client configured for
STARTTLS or no TLS at all, or a scanner, sends SMTP or HTTP where a TLS
ClientHello belongs. The TLS layer only sees a failed handshake; this
wrapper, outside TLS, looks at the first bytes of each connection and logs
once, with what the client sent (bounded and made printable), so that an
operator can tell a misconfigured client from a broken TLS stack:

    plaintext on implicit-TLS port client=192.0.2.7 listener=submissions first='EHLO laptop'
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

_log = Logger(namespace="mailgw.server.plaintext")

#: Every TLS connection starts with a handshake record (RFC 8446 5.1).
_HANDSHAKE = 0x16
#: Characters of the client's first bytes shown in the log line.
SHOWN = 40


def shown(data: bytes) -> str:
    """
    ``data``'s first line, printable ASCII only, at most L{SHOWN} characters;
    of an AUTH command only its verb and mechanism (AUTH payloads are never
    logged, not even sent in the clear to the wrong port).
    """
    first = data.split(b"\n", 1)[0].rstrip(b"\r")
    words = first.split(b" ")
    if words[0].upper() == b"AUTH":
        first = b" ".join(words[:2]) + (b" ..." if len(words) > 2 else b"")
    first = first[:SHOWN]
    return "".join(chr(b) if 32 <= b < 127 else "?" for b in first)


class _Sniffer(ProtocolWrapper):
    _checked = False

    def dataReceived(self, data: bytes) -> None:
        if not self._checked and data:
            self._checked = True
            if data[0] != _HANDSHAKE:
                peer = self.transport.getPeer() if self.transport is not None else None
                _log.info(
                    "plaintext on implicit-TLS port client={client} listener={listener} "
                    "first={first!r}",
                    client=getattr(peer, "host", "unknown"),
                    listener=self.factory.listenerName,
                    first=shown(data),
                )
        super().dataReceived(data)


class PlaintextSniffingFactory(WrappingFactory):
    """Wraps the TLS factory of an implicit-TLS listener (see the module docstring)."""

    protocol = _Sniffer

    def __init__(self, wrappedFactory: Any, listenerName: str = "submissions") -> None:
        super().__init__(wrappedFactory)
        self.listenerName = listenerName

    def logPrefix(self) -> str:
        return self.wrappedFactory.logPrefix()  # type: ignore[no-any-return]
