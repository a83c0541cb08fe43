"""
Parsing of SMTP paths (RFC 5321 4.1.2) and of the parameters that follow
them in MAIL and RCPT (RFC 5321 4.1.1.11, RFC 1870, RFC 6152, RFC 6531).

Every function here either returns a value or raises L{AddressError} /
L{ParameterError}; no other exception escapes, whatever the input.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata

from mailgw.envelope import Address

# RFC 5321 4.5.3.1: a path is at most 256 octets, a local part 64, a domain 255.
MAX_PATH = 256
MAX_LOCAL = 64
MAX_DOMAIN = 255


_INVISIBLE = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})


class AddressError(ValueError):
    """The text is not a valid path."""


class ParameterError(ValueError):
    """A MAIL/RCPT parameter is malformed."""


# atext (RFC 5322 3.2.3); with SMTPUTF8 any non-ASCII UTF-8 character too (RFC 6531 3.3).
_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_DOT_STRING = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*\Z")
_DOT_STRING_UTF8 = re.compile(rf"[{_ATEXT}\u00a0-\U0010ffff]+(?:\.[{_ATEXT}\u00a0-\U0010ffff]+)*\Z")
# qtextSMTP / quoted-pairSMTP (RFC 5321 4.1.2): printable ASCII, no controls.
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"\Z')
_QUOTED_UTF8 = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u00a0-\U0010ffff]|\\[\x20-\x7e])*"\Z')
_SUBDOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\Z")
_SUBDOMAIN_UTF8 = re.compile(
    r"[A-Za-z0-9\u00a0-\U0010ffff](?:[A-Za-z0-9\u00a0-\U0010ffff-]*[A-Za-z0-9\u00a0-\U0010ffff])?\Z"
)
_ESMTP_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
# esmtp-value: any CHAR except "=", SP and control characters (RFC 5321 4.1.2).
_ESMTP_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+\Z")


def parseDomain(text: str, *, utf8: bool = False) -> str:
    """
    Validate a domain or an address literal; return it unchanged.

    @raise AddressError: not a domain.
    """
    if not text or len(text.encode("utf-8")) > MAX_DOMAIN:
        raise AddressError("bad domain length")
    if text.startswith("["):
        return _parseLiteral(text)
    labels = text.split(".")
    pattern = _SUBDOMAIN_UTF8 if utf8 else _SUBDOMAIN
    for label in labels:
        if len(label) > 63 or not pattern.match(label):
            raise AddressError("bad domain")
    return text


def _parseLiteral(text: str) -> str:
    if not text.endswith("]"):
        raise AddressError("bad address literal")
    inner = text[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        # General-address-literal (RFC 5321 4.1.3) is not accepted: nothing uses it.
        raise AddressError("bad address literal") from None
    return text


def parseMailbox(text: str, *, utf8: bool = False) -> Address:
    """
    Parse ``local@domain`` (no angle brackets).

    @raise AddressError: not a mailbox.
    """
    if not utf8 and not text.isascii():
        raise AddressError("non-ASCII address without SMTPUTF8")
    if not text.isascii() and any(
        unicodedata.category(c) in _INVISIBLE for c in text if not c.isascii()
    ):
        # Controls, format characters (bidi overrides, zero-width) and line
        # or paragraph separators: nothing a real address needs, and they
        # would reach headers and logs.
        raise AddressError("control or format character in address")
    local, at, domain = text.rpartition("@")
    if not at or not local:
        raise AddressError("no local part or domain")
    if local.startswith('"'):
        if not (_QUOTED_UTF8 if utf8 else _QUOTED).match(local):
            raise AddressError("bad quoted local part")
    elif not (_DOT_STRING_UTF8 if utf8 else _DOT_STRING).match(local):
        raise AddressError("bad local part")
    if len(local.encode("utf-8")) > MAX_LOCAL:
        raise AddressError("local part too long")
    return Address(local, parseDomain(domain, utf8=utf8))


def parsePath(text: str, *, utf8: bool = False, allowNull: bool = False) -> Address | None:
    """
    Parse a reverse- or forward-path in angle brackets. A source route
    (``<@a,@b:user@c>``) is accepted and ignored, as RFC 5321 4.1.1.3
    and Appendix C ask; the mail goes to the mailbox, never via the route.

    @return: the mailbox, or ``None`` for ``<>`` when ``allowNull``.
    @raise AddressError: not a path.
    """
    if len(text.encode("utf-8", "surrogateescape")) > MAX_PATH + 2:
        raise AddressError("path too long")
    if len(text) < 2 or text[0] != "<" or text[-1] != ">":
        raise AddressError("path must be in angle brackets")
    inner = text[1:-1]
    if inner == "":
        if allowNull:
            return None
        raise AddressError("null path not allowed here")
    if inner.startswith("@"):
        route, colon, inner = inner.partition(":")
        if not colon:
            raise AddressError("bad source route")
        for hop in route.split(","):
            if not hop.startswith("@"):
                raise AddressError("bad source route")
            parseDomain(hop[1:], utf8=utf8)
    return parseMailbox(inner, utf8=utf8)


def splitPathAndParameters(argument: str) -> tuple[str, dict[str, str | None]]:
    """
    Split ``<path> KEY=VALUE KEY`` into the path text and a dict of
    upper-cased parameter keywords to values (``None`` for a bare keyword).

    The path ends at the first ``>`` that is not inside a quoted local part.

    @raise AddressError: no path.
    @raise ParameterError: malformed or repeated parameter.
    """
    if not argument.startswith("<"):
        raise AddressError("path must be in angle brackets")
    end = _pathEnd(argument)
    path, rest = argument[: end + 1], argument[end + 1 :]
    if rest and not rest.startswith(" "):
        raise AddressError("junk after path")
    parameters: dict[str, str | None] = {}
    for item in rest.split():
        keyword, equals, value = item.partition("=")
        if not _ESMTP_KEYWORD.match(keyword):
            raise ParameterError(f"bad parameter {keyword!r}")
        if equals and not _ESMTP_VALUE.match(value):
            raise ParameterError(f"bad value for {keyword.upper()}")
        key = keyword.upper()
        if key in parameters:
            raise ParameterError(f"{key} given twice")
        parameters[key] = value if equals else None
    return path, parameters


def _pathEnd(text: str) -> int:
    quoted = escaped = False
    for i, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return i
    raise AddressError("unterminated path")
