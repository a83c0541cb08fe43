"""
The ``Received:`` trace header (RFC 5321 4.4) prepended to every accepted
message, with the protocol keyword of RFC 3848 (ESMTPSA: ESMTP with TLS
and AUTH) or RFC 6531 (UTF8SMTPSA).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email.utils import format_datetime

from mailgw.envelope import Envelope, Session

# Anything the client chose (its HELO name) is reduced to characters that
# cannot end a header or open a comment we did not write.
_UNSAFE = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")


def _clean(text: str, limit: int = 255) -> str:
    return _UNSAFE.sub("?", text)[:limit] or "unknown"


def protocolKeyword(session: Session, envelope: Envelope) -> str:
    """RFC 3848 / RFC 6531 ``with`` keyword for this session."""
    keyword = "UTF8SMTP" if envelope.smtputf8 else "ESMTP"
    if session.tlsProtocol:
        keyword += "S"
    if session.user is not None:
        keyword += "A"
    return keyword


def receivedHeader(
    session: Session,
    envelope: Envelope,
    hostname: str,
    queueId: str,
    when: float,
    clientAddress: bool = True,
) -> bytes:
    """
    The header, folded over several lines, CRLF-terminated; without the
    client's IP address when ``clientAddress`` is false (privacy).

    Only one recipient is named (``for``), and only when there is exactly
    one, so a message to many recipients does not disclose the others
    (RFC 5321 7.2).
    """
    address = _clean(session.clientAddress, 64)
    literal = f"[IPv6:{address}]" if ":" in address else f"[{address}]"
    lines = [f"Received: from {_clean(session.helo)}" + (f" ({literal})" if clientAddress else "")]
    lines.append(f"\tby {_clean(hostname)} (mailgw) with {protocolKeyword(session, envelope)}")
    lines.append(f"\tid {queueId}")
    if session.tlsProtocol:
        cipher = _clean(session.tlsCipher or "unknown")
        lines.append(f"\t(using {_clean(session.tlsProtocol)} with cipher {cipher})")
    date = format_datetime(datetime.fromtimestamp(when, UTC))
    if len(envelope.recipients) == 1:
        lines.append(f"\tfor <{envelope.recipients[0]}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")
