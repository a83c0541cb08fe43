"""
One milter within one SMTP session (L{Link}), and the rules every step
shares: what a milter's failure makes of the session (L{fallback}), what a
final response means (L{decision}), and a recipient a milter names.
"""

from __future__ import annotations

from collections import deque

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mailgw.address import AddressError, parsePath
from mailgw.envelope import Address
from mailgw.milter import codec
from mailgw.milter.client import MilterClient, Negotiated
from mailgw.milter.settings import MilterServer
from mailgw.milter.verdict import REJECT, TEMPFAIL, milterReply
from mailgw.replies import SMTPReply

_log = Logger(namespace="mailgw.milter")


@attrs.define(eq=False)
class Link:
    """One milter within one session."""

    server: MilterServer
    client: MilterClient | None = None
    options: Negotiated = Negotiated(0, 0)
    #: Left out for the rest of the session (accepted it, or down with default "accept").
    off: bool = False
    #: The reply to every later command (down with default "tempfail"/"reject").
    stuck: SMTPReply | None = None
    #: Left out for the rest of this message (accepted it, or said SKIP to the body).
    messageOff: bool = False
    skipBody: bool = False
    inMessage: bool = False
    #: What the milter decided during the content (a refusal, a discard).
    outcome: tuple[str, SMTPReply | None] | None = None
    queue: deque[tuple[bytes, bool]] = attrs.field(factory=deque)
    busy: bool = False
    pumping: bool = False
    #: Octets waiting in ``queue`` (the session stops reading past a bound).
    queuedBytes: int = 0
    #: The message was abandoned while a content command was in flight:
    #: its answer is ignored, and SMFIC_ABORT follows it.
    aborting: bool = False
    drained: list[Deferred[None]] = attrs.field(factory=list)

    @property
    def usable(self) -> bool:
        return self.client is not None and not self.off and self.stuck is None

    def has(self, step: int) -> bool:
        return self.options.has(step)


def fallback(link: Link, why: str) -> None:
    """``link``'s milter failed: apply its default action for the rest of the session."""
    action = link.server.defaultAction
    _log.warn(
        "milter {address} unavailable ({why}): default action {action}",
        address=link.server.address,
        why=why,
        action=action,
    )
    if link.client is not None:
        link.client.abortConnection()
    if action == "accept":
        link.off = True
    else:
        link.stuck = TEMPFAIL if action == "tempfail" else REJECT


def decision(final: codec.Response, fallback: SMTPReply) -> tuple[str, SMTPReply | None]:
    """A final response other than CONTINUE/ACCEPT: ``("discard", None)`` or a refusal."""
    if final.code == codec.DISCARD:
        return ("discard", None)
    if final.code == codec.REPLYCODE:
        base = TEMPFAIL if final.text[:1] == "4" else fallback
        return ("reply", milterReply(final.text, base))
    if final.code in (codec.TEMPFAIL, codec.SHUTDOWN, codec.CONN_FAIL):
        return ("reply", TEMPFAIL)
    return ("reply", fallback)


def parseRecipient(text: str) -> Address | None:
    """A recipient from SMFIR_ADDRCPT/DELRCPT (with or without angle brackets), or None."""
    text = text.strip()
    if not text.startswith("<"):
        text = f"<{text}>"
    try:
        return parsePath(text, utf8=True)
    except AddressError:
        return None
