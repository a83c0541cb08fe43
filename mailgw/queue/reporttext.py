"""
Text for the fields of delivery status notifications (RFC 3464): upstream
words made safe for one header line, host names, addresses and dates.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import UTC, datetime
from email.utils import format_datetime

from mailgw.envelope import Address

# RFC 6533 3: QCHAR, the ASCII characters an xtext address keeps as is.
_QCHAR = re.compile(r"[\x21-\x2a\x2c-\x3c\x3e-\x5b\x5d-\x7e]")


def remoteHost(remote: str) -> str:
    """The upstream's host name, safe for a field; empty when unknown."""
    host = asciiOnly(clean(remote, 255)).split(" ")[0]
    # "mx.example.com[192.0.2.1]" -> Remote-MTA names the host (RFC 3464 2.3.5).
    if "[" in host and not host.startswith("["):
        host = host[: host.index("[")]
    return host


def addressField(address: Address) -> str:
    """An RFC 3464 address field; utf-8 type in xtext form (RFC 6533 3)."""
    text = clean(str(address), 512)
    if text.isascii():
        return f"rfc822; {text}"
    encoded = "".join(c if _QCHAR.match(c) else f"\\x{{{ord(c):X}}}" for c in text)
    return f"utf-8; {encoded}"


def clean(text: str, limit: int) -> str:
    """
    ``text`` on one line: control, format and line/paragraph separator
    characters removed (CR and LF become spaces), runs of white space
    collapsed, cut to ``limit`` characters.
    """
    chars = []
    for c in text:
        category = unicodedata.category(c)
        if category in ("Cc", "Zl", "Zp"):
            chars.append(" ")
        elif category in ("Cf", "Cs", "Co", "Cn"):
            continue
        else:
            chars.append(c)
    cleaned = " ".join("".join(chars).split())
    if len(cleaned) > limit:
        cleaned = cleaned[: limit - 3].rstrip() + "..."
    return cleaned


def date(when: float) -> str:
    """An RFC 5322 date-time in UTC, "+0000" (RFC 5322 3.3)."""
    return format_datetime(datetime.fromtimestamp(when, UTC))


def asciiOnly(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")
