"""
What the milters made of a message at its end (L{MessageVerdict}), and the
SMTP reply a milter's REPLYCODE may give (checked: 4xx or 5xx, one line of
printable text).
"""

from __future__ import annotations

import re

import attrs

from mailgw import replies
from mailgw.envelope import Address
from mailgw.milter.edits import MessageEdits
from mailgw.replies import SMTPReply

_REPLY = re.compile(r"([45])(\d\d)(?:[ -](?:([45])\.(\d{1,3})\.(\d{1,3}))?)?(?: (.*))?\Z", re.S)
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
MAX_TEXT = 400


def milterReply(text: str, fallback: SMTPReply) -> SMTPReply:
    """
    The reply of a milter's SMFIR_REPLYCODE (``"550 5.7.1 text"``), or
    ``fallback`` when the code is no 4xx/5xx, the enhanced code's class
    disagrees with it, or the class is not ``fallback``'s. Only the first
    line is kept and unprintable characters become ``?``: no CR/LF reaches
    the client, so no reply can be forged.
    """
    first = text.split("\r", 1)[0].split("\n", 1)[0].strip()
    match = _REPLY.match(first)
    if match is None:
        return fallback
    klass, rest, eklass, esubject, edetail, message = match.groups()
    code = int(klass + rest)
    if code // 100 != fallback.code // 100:
        return fallback
    enhanced = fallback.enhanced
    if eklass is not None:
        if eklass != klass:
            return fallback
        enhanced = f"{eklass}.{esubject}.{edetail}"
    message = _UNPRINTABLE.sub("?", (message or "").strip())[:MAX_TEXT]
    return SMTPReply(code, enhanced, message or fallback.text)


REJECT = replies.MILTER_REJECT
TEMPFAIL = replies.MILTER_TEMPFAIL


@attrs.frozen
class MessageVerdict:
    """
    The outcome at end of message. ``reply``: refuse with it (nothing is
    queued). ``discard``: answer 250 and drop the message (logged).
    Otherwise queue it, with ``edits`` applied, with ``recipients`` (None:
    unchanged), held with ``holdReason`` when that is set (quarantine).
    ``by`` names the milter that refused, discarded or quarantined.
    """

    reply: SMTPReply | None = None
    discard: bool = False
    holdReason: str | None = None
    edits: MessageEdits = attrs.field(factory=MessageEdits)
    recipients: tuple[Address, ...] | None = None
    by: str = ""
