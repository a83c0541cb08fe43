"""
The delivery status notification parameters of MAIL and RCPT (RFC 3461):
their values, the xtext encoding they travel in, and their strict parsing.

``RET=FULL|HDRS`` and ``ENVID=xtext`` on MAIL; ``NOTIFY=NEVER`` or a comma
list of ``SUCCESS``, ``FAILURE`` and ``DELAY``, and ``ORCPT=addr-type;xtext``
on RCPT. Every parse function returns a value or raises
L{DSNParameterError}, whose text is ours (never the client's bytes), made
to be sent in a 501 reply.

This module imports nothing of mailgw: the envelope values use it.
"""

from __future__ import annotations

import enum
import re
from typing import Any

import attrs

#: RFC 3461 4.4: the ENVID value is at most 100 characters.
MAX_ENVID = 100
#: RFC 3461 4.2: the ORCPT value is at most 500 characters.
MAX_ORCPT = 500

# RFC 3461 4: xtext = *( xchar / hexchar ); xchar is "!" to "~" but "+" and
# "="; hexchar is "+" and two upper-case hexadecimal digits.
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*\Z")
_HEXCHAR = re.compile(r"\+([0-9A-F]{2})")
# RFC 3461 4.2: addr-type is an atom (RFC 5322 3.2.3).
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+\Z")
# RFC 3461 4.2, 4.4: the decoded value is printable US-ASCII (graphic and space).
_PRINTABLE = re.compile(r"[\x20-\x7e]*\Z")


class DSNParameterError(ValueError):
    """A DSN parameter is malformed; the text says how, for a 501 reply."""


class Notify(enum.Enum):
    """The NOTIFY keywords of RCPT (RFC 3461 4.1)."""

    NEVER = "NEVER"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    DELAY = "DELAY"


class Ret(enum.Enum):
    """The RET parameter of MAIL (RFC 3461 4.3)."""

    FULL = "FULL"
    HDRS = "HDRS"


@attrs.frozen
class RecipientDSN:
    """
    What one recipient's RCPT asked of delivery status notifications.

    ``notify`` is None when NOTIFY was not given (the default: reports on
    failure and delay, RFC 3461 4.1); else ``{NEVER}`` or a non-empty set of
    the others. ``orcpt`` is the ORCPT parameter as (address type, address
    decoded from xtext), or None.
    """

    notify: frozenset[Notify] | None = None
    orcpt: tuple[str, str] | None = None

    def wants(self, event: Notify) -> bool:
        """Whether a report on ``event`` (SUCCESS, FAILURE or DELAY) is wanted."""
        if self.notify is None:
            return event is not Notify.SUCCESS
        return event in self.notify

    @property
    def isDefault(self) -> bool:
        return self.notify is None and self.orcpt is None

    def toJSON(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self.notify is not None:
            data["notify"] = sorted(n.value for n in self.notify)
        if self.orcpt is not None:
            data["orcpt"] = list(self.orcpt)
        return data

    @classmethod
    def fromJSON(cls, data: dict[str, Any] | None) -> RecipientDSN:
        if not data:
            return NO_DSN
        notify = data.get("notify")
        orcpt = data.get("orcpt")
        return cls(
            notify=None if notify is None else frozenset(Notify(n) for n in notify),
            orcpt=None if orcpt is None else (str(orcpt[0]), str(orcpt[1])),
        )

    def parameters(self) -> str:
        """The RCPT parameters that pass these requests on, with a leading space (or "")."""
        words = []
        if self.notify is not None:
            order = [n for n in Notify if n in self.notify]
            words.append("NOTIFY=" + ",".join(n.value for n in order))
        if self.orcpt is not None:
            words.append(f"ORCPT={self.orcpt[0]};{encodeXtext(self.orcpt[1])}")
        return "".join(" " + w for w in words)


#: A recipient without DSN parameters.
NO_DSN = RecipientDSN()


def decodeXtext(text: str) -> str:
    """
    Decode RFC 3461 xtext; the result must be printable US-ASCII.

    @raise DSNParameterError: not xtext, or it decodes to control or 8-bit
        characters.
    """
    if not _XTEXT.match(text):
        raise DSNParameterError("not valid xtext (RFC 3461 4)")
    decoded = _HEXCHAR.sub(lambda m: chr(int(m.group(1), 16)), text)
    if not _PRINTABLE.match(decoded):
        raise DSNParameterError("must decode to printable US-ASCII")
    return decoded


def encodeXtext(text: str) -> str:
    """``text`` (printable US-ASCII) as xtext: "+", "=" and the rest as +XX."""
    return "".join(c if "!" <= c <= "~" and c not in "+=" else f"+{ord(c):02X}" for c in text)


def parseNotify(value: str | None) -> frozenset[Notify]:
    """
    ``NOTIFY=``: NEVER alone, or a comma list of SUCCESS, FAILURE and
    DELAY, each at most once (case does not matter).
    """
    if not value:
        raise DSNParameterError("NOTIFY needs a value: NEVER, or SUCCESS, FAILURE, DELAY")
    seen: set[Notify] = set()
    for word in value.upper().split(","):
        try:
            keyword = Notify(word)
        except ValueError:
            raise DSNParameterError(
                "NOTIFY takes NEVER, or a comma list of SUCCESS, FAILURE and DELAY"
            ) from None
        if keyword in seen:
            raise DSNParameterError(f"NOTIFY lists {keyword.value} twice")
        seen.add(keyword)
    if Notify.NEVER in seen and len(seen) > 1:
        raise DSNParameterError("NOTIFY=NEVER cannot be combined with other values")
    return frozenset(seen)


def parseORCPT(value: str | None) -> tuple[str, str]:
    """``ORCPT=addr-type;xtext``: (address type, decoded address)."""
    if not value:
        raise DSNParameterError("ORCPT needs a value: addr-type;address")
    if len(value) > MAX_ORCPT:
        raise DSNParameterError(f"ORCPT is longer than {MAX_ORCPT} characters")
    addrType, semicolon, encoded = value.partition(";")
    if not semicolon or not _ATOM.match(addrType):
        raise DSNParameterError("ORCPT must be addr-type;address (e.g. rfc822;user@example.org)")
    try:
        address = decodeXtext(encoded)
    except DSNParameterError as e:
        raise DSNParameterError(f"ORCPT address {e}") from None
    if not address:
        raise DSNParameterError("ORCPT has an empty address")
    return addrType.lower() if addrType.lower() in ("rfc822", "utf-8") else addrType, address


def parseEnvid(value: str | None) -> str:
    """``ENVID=xtext``: the decoded envelope identifier."""
    if not value:
        raise DSNParameterError("ENVID needs a value")
    if len(value) > MAX_ENVID:
        raise DSNParameterError(f"ENVID is longer than {MAX_ENVID} characters")
    try:
        return decodeXtext(value)
    except DSNParameterError as e:
        raise DSNParameterError(f"ENVID {e}") from None


def parseRet(value: str | None) -> Ret:
    """``RET=FULL`` or ``RET=HDRS`` (case does not matter)."""
    try:
        return Ret((value or "").upper())
    except ValueError:
        raise DSNParameterError("RET takes FULL or HDRS") from None
