"""
Delivery status notifications: bounces and delay warnings (RFC 3464,
RFC 3461, RFC 6522), built as the bytes of a new message to the original
envelope sender, from the null reverse-path.

Upstream diagnostics are attacker-controlled text: every piece of it is
stripped of control characters and line breaks and cut to a bounded length
before it goes anywhere near a header field, and the MIME boundary is random
and checked against the content, so nothing in it can add header fields or
parts. Only the original message's header section is quoted, never its body.
"""

from __future__ import annotations

import quopri
import re
import secrets
import textwrap
import unicodedata
from collections.abc import Iterable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import BinaryIO

from mailgw.envelope import (
    Address,
    BodyType,
    Envelope,
    QueuedMessage,
    RecipientState,
    RecipientStatus,
)

#: At most this many bytes of the original message are read for its header
#: section (RFC 6522 text/rfc822-headers); the body is never read.
HEADERS_LIMIT = 64 * 1024

#: Upstream diagnostics are cut to this many characters: a reply line is at
#: most 512 octets (RFC 5321 4.5.3.1.5), and a field stays far below 998.
DIAGNOSTIC_LIMIT = 400

_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}\Z")
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?\Z")
# RFC 6533 3: QCHAR, the ASCII characters an xtext address keeps as is.
_QCHAR = re.compile(r"[\x21-\x2a\x2c-\x3c\x3e-\x5b\x5d-\x7e]")
_CRLF = b"\r\n"
_BOUNCED = "Undelivered Mail Returned to Sender"
_DELAYED = "Delayed Mail (still being retried)"
# RFC 5322 2.1.1: a line is at most 998 octets; longer ones may be refused.
_MAX_LINE = 998


def buildBounce(
    message: QueuedMessage,
    original: BinaryIO,
    reportingMTA: str,
    now: float,
    *,
    recipients: Iterable[Address] | None = None,
    headersLimit: int = HEADERS_LIMIT,
) -> tuple[Envelope, bytes]:
    """
    A non-delivery report for the BOUNCED recipients of ``message`` (or
    only those of them in ``recipients``), sent by ``reportingMTA`` at
    ``now``; ``original`` is the queued message file, read only for its
    header section (at most ``headersLimit`` bytes).

    @return: the envelope (null sender, to the original sender) and the
        message bytes, CRLF line endings.
    @raise ValueError: ``message`` is itself a bounce (never a bounce for a
        bounce, RFC 3461 4.1 / RFC 5321 6.1), it has no bounced recipients,
        or ``reportingMTA`` is not a host name.
    """
    states = _select(message, RecipientStatus.BOUNCED, recipients)
    return _build(message, original, reportingMTA, now, states, None, headersLimit)


def buildDelayWarning(
    message: QueuedMessage,
    original: BinaryIO,
    reportingMTA: str,
    now: float,
    *,
    willRetryUntil: float,
    recipients: Iterable[Address] | None = None,
    headersLimit: int = HEADERS_LIMIT,
) -> tuple[Envelope, bytes]:
    """
    A delay warning (RFC 3464 Action: delayed) for the PENDING recipients
    of ``message`` (or only those of them in ``recipients``), which will be
    retried until ``willRetryUntil`` (a POSIX timestamp).

    @return: the envelope and the message bytes, as L{buildBounce}.
    @raise ValueError: as L{buildBounce}, for pending recipients.
    """
    states = _select(message, RecipientStatus.PENDING, recipients)
    return _build(message, original, reportingMTA, now, states, willRetryUntil, headersLimit)


def _intro(
    message: QueuedMessage, reportingMTA: str, now: float, count: int, retryUntil: float | None
) -> list[str]:
    """The paragraphs that open the human-readable part."""
    first = f"This is the mail system at host {reportingMTA}."
    if retryUntil is None:
        return [
            first,
            "Your message could not be delivered to "
            + ("one recipient." if count == 1 else f"{count} recipients.")
            + " This is a permanent error; the mail system has given up. The"
            " recipients and the reasons are listed below, and the headers of"
            " your message are attached.",
            "If you need help, please contact your postmaster and include this report.",
        ]
    hours = max(0.0, now - message.arrival) / 3600
    return [
        first,
        "THIS IS A WARNING ONLY. YOU DO NOT NEED TO RESEND YOUR MESSAGE.",
        f"Your message was accepted {hours:.1f} hours ago and has not yet been"
        " delivered to the recipients listed below. The mail system will keep"
        f" trying until {_date(retryUntil)}, and will tell you if it gives up.",
    ]


def _select(
    message: QueuedMessage, status: RecipientStatus, only: Iterable[Address] | None
) -> list[RecipientState]:
    if message.isBounce:
        raise ValueError(f"{message.queueId} is a bounce: never a bounce for a bounce")
    wanted = None if only is None else set(only)
    states = [
        r
        for r in message.recipients
        if r.status is status and (wanted is None or r.address in wanted)
    ]
    if not states:
        raise ValueError(f"{message.queueId} has no {status.value} recipients to report")
    return states


def _build(
    message: QueuedMessage,
    original: BinaryIO,
    reportingMTA: str,
    now: float,
    states: list[RecipientState],
    willRetryUntil: float | None,
    headersLimit: int,
) -> tuple[Envelope, bytes]:
    """A bounce, or a delay warning when ``willRetryUntil`` is given."""
    delayed = willRetryUntil is not None
    if not _HOSTNAME.match(reportingMTA):
        raise ValueError(f"reporting MTA {reportingMTA!r} is not a host name")
    sender = message.envelope.sender
    assert sender is not None  # _select refused bounces
    senderText = _clean(str(sender), 512)

    intro = _intro(message, reportingMTA, now, len(states), willRetryUntil)
    human = _humanPart(intro, states, delayed)
    report = _reportPart(message, reportingMTA, states, willRetryUntil)
    headers = readHeaders(original, headersLimit)
    headersPart = _part(
        [
            b"Content-Description: "
            + (b"Delayed" if delayed else b"Undelivered")
            + b" Message Headers",
            b"Content-Type: text/rfc822-headers"
            + (b'; charset="utf-8"' if _isUTF8(headers) else b""),
            b"Content-Transfer-Encoding: " + (b"7bit" if headers.isascii() else b"8bit"),
        ],
        headers,
    )
    parts = [human, report, headersPart]
    boundary = _boundary(parts)

    top = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reportingMTA}>",
        f"To: <{senderText}>",
        f"Subject: {_DELAYED if delayed else _BOUNCED}",
        f"Date: {_date(now)}",
        f"Message-ID: <{int(now)}.{secrets.token_hex(12)}@{reportingMTA}>",
        # RFC 3834 5: an automatic response; RFC 3464 needs no reply to it.
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
    ]
    out = [line.encode("utf-8") + _CRLF for line in top]
    out.append(_CRLF)
    out.append(b"This is a MIME-encapsulated message." + _CRLF)
    for part in parts:
        out.append(_CRLF + b"--" + boundary.encode("ascii") + _CRLF)
        out.append(part)
    out.append(_CRLF + b"--" + boundary.encode("ascii") + b"--" + _CRLF)
    data = b"".join(out)

    envelope = Envelope(
        sender=None,
        recipients=(sender,),
        # RFC 6152: 8-bit content (a UTF-8 To:, 8-bit original headers)
        # must be sent with BODY=8BITMIME, a UTF-8 address with SMTPUTF8.
        body=BodyType.SEVENBIT if data.isascii() else BodyType.EIGHTBITMIME,
        smtputf8=not sender.isASCII,
        declaredSize=len(data),
    )
    return envelope, data


def _humanPart(intro: list[str], states: list[RecipientState], delayed: bool) -> bytes:
    lines: list[str] = []
    for paragraph in intro:
        if lines:
            lines.append("")
        lines.extend(textwrap.wrap(paragraph, 72))
    for state in states:
        address = _clean(str(state.address), 512)
        reason = _humanReason(state, delayed)
        lines.append("")
        lines.extend(textwrap.wrap(f"<{address}>: {reason}", 72, subsequent_indent="    "))
    text = "\r\n".join(lines) + "\r\n"
    if text.isascii():
        charset, encoding, body = "us-ascii", "7bit", text.encode("ascii")
    else:
        # Non-ASCII addresses or diagnostics: quoted-printable keeps this
        # part 7-bit whatever the upstream said.
        charset, encoding = "utf-8", "quoted-printable"
        body = quopri.encodestring(text.replace("\r\n", "\n").encode("utf-8"))
        body = body.replace(b"\n", _CRLF)
    return _part(
        [
            b"Content-Description: Notification",
            f'Content-Type: text/plain; charset="{charset}"'.encode("ascii"),
            f"Content-Transfer-Encoding: {encoding}".encode("ascii"),
        ],
        body,
    )


def _humanReason(state: RecipientState, delayed: bool) -> str:
    remote = _clean(state.remote, 255)
    diagnostic = _clean(state.diagnostic, DIAGNOSTIC_LIMIT)
    if state.code:
        said = _replyText(state)
        if remote:
            return f"host {remote} said: {said}"
        return f"the mail server said: {said}"
    if diagnostic:
        return diagnostic
    if delayed:
        return "delivery has not succeeded yet"
    return "delivery failed"


def _reportPart(
    message: QueuedMessage,
    reportingMTA: str,
    states: list[RecipientState],
    willRetryUntil: float | None,
) -> bytes:
    delayed = willRetryUntil is not None
    # RFC 3464 2.2: the per-message fields, then one block per recipient.
    fields = [
        f"Reporting-MTA: dns; {reportingMTA}",
        f"X-Mailgw-Queue-ID: {_ascii(_clean(message.queueId, 64))}",
        f"Arrival-Date: {_date(message.arrival)}",
    ]
    blocks = ["\r\n".join(fields)]
    for state in states:
        blocks.append("\r\n".join(_recipientFields(state, delayed, willRetryUntil)))
    text = "\r\n\r\n".join(blocks) + "\r\n"
    return _part(
        [
            b"Content-Description: Delivery report",
            b"Content-Type: message/delivery-status",
        ],
        text.encode("ascii"),
    )


def _recipientFields(
    state: RecipientState, delayed: bool, willRetryUntil: float | None
) -> list[str]:
    fields = [
        f"Final-Recipient: {_addressField(state.address)}",
        f"Action: {'delayed' if delayed else 'failed'}",
        f"Status: {_status(state, delayed)}",
    ]
    remote = _remoteHost(state.remote)
    if remote:
        fields.append(f"Remote-MTA: dns; {remote}")
    if state.code:
        fields.append(f"Diagnostic-Code: smtp; {_ascii(_replyText(state))}")
    elif state.diagnostic:
        # No upstream reply (connection, TLS, DNS failure): our own words,
        # in an extension diagnostic type (RFC 3464 2.3.6).
        fields.append(f"Diagnostic-Code: X-mailgw; {_ascii(_clean(state.diagnostic, 400))}")
    if state.lastAttempt is not None:
        fields.append(f"Last-Attempt-Date: {_date(state.lastAttempt)}")
    if willRetryUntil is not None:
        fields.append(f"Will-Retry-Until: {_date(willRetryUntil)}")
    return fields


def _status(state: RecipientState, delayed: bool) -> str:
    """
    The RFC 3463 status: the upstream's enhanced code when it gave a valid
    one, else the class of its reply code, else a generic one. A delay is
    never reported with a permanent (5.x.x) status.
    """
    if _ENHANCED.match(state.enhanced) and not (delayed and state.enhanced[0] == "5"):
        return state.enhanced
    if not delayed and 500 <= state.code < 600:
        return "5.0.0"
    if 400 <= state.code < 500 or delayed:
        return "4.0.0"
    return "5.0.0"


def _replyText(state: RecipientState) -> str:
    """The upstream reply as ``550 5.1.1 text``, cleaned and bounded."""
    text = _clean(state.diagnostic, DIAGNOSTIC_LIMIT)
    # Do not say the codes twice when the text already starts with them.
    if re.match(rf"{state.code}(?:[ -]|\Z)", text):
        text = text[4:].lstrip()
    if state.enhanced and text.startswith(state.enhanced):
        text = text[len(state.enhanced) :].lstrip()
    enhanced = _clean(state.enhanced, 16) if _ENHANCED.match(state.enhanced) else ""
    return " ".join(p for p in (str(state.code), enhanced, text) if p)


def _remoteHost(remote: str) -> str:
    """The upstream's host name, safe for a field; empty when unknown."""
    host = _ascii(_clean(remote, 255)).split(" ")[0]
    # "mx.example.com[192.0.2.1]" -> Remote-MTA names the host (RFC 3464 2.3.5).
    if "[" in host and not host.startswith("["):
        host = host[: host.index("[")]
    return host


def _addressField(address: Address) -> str:
    """An RFC 3464 address field; utf-8 type in xtext form (RFC 6533 3)."""
    text = _clean(str(address), 512)
    if text.isascii():
        return f"rfc822; {text}"
    encoded = "".join(c if _QCHAR.match(c) else f"\\x{{{ord(c):X}}}" for c in text)
    return f"utf-8; {encoded}"


def _clean(text: str, limit: int) -> str:
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


def _date(when: float) -> str:
    """An RFC 5322 date-time in UTC, "+0000" (RFC 5322 3.3)."""
    return format_datetime(datetime.fromtimestamp(when, UTC))


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")


def _isUTF8(data: bytes) -> bool:
    if data.isascii():
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def readHeaders(original: BinaryIO, limit: int = HEADERS_LIMIT) -> bytes:
    """
    The header section of the message in ``original``: the lines before
    the first empty line, CRLF-terminated, never more than ``limit`` bytes
    (a longer section is cut after its last whole line), each line cut to
    998 octets. Nothing past the first ``limit + 2`` bytes is read.
    """
    # Two bytes more than the limit: a section of exactly ``limit`` bytes
    # is then seen to end (its empty line starts within them).
    data = original.read(limit + 2)
    atEnd = len(data) < limit + 2
    # Normalise line endings: the spool holds CRLF, but a stray CR or LF
    # must never end up as a line of its own in our MIME structure.
    lines = re.split(rb"\r\n|\r|\n", data)
    if not atEnd:
        # The last piece was cut by the read: not a whole line.
        del lines[-1]
    kept: list[bytes] = []
    size = 0
    for line in lines:
        if not line or size + len(line) + 2 > limit:
            break
        line = line[:_MAX_LINE]
        kept.append(line)
        size += len(line) + 2
    return b"".join(line + _CRLF for line in kept)


def _part(headers: list[bytes], body: bytes) -> bytes:
    if body and not body.endswith(_CRLF):
        body += _CRLF
    return _CRLF.join(headers) + _CRLF + _CRLF + body


def _boundary(parts: list[bytes]) -> str:
    """A boundary that occurs in none of ``parts`` (RFC 2046 5.1.1)."""
    while True:
        boundary = f"=_mailgw_{secrets.token_hex(16)}"
        if not any(boundary.encode("ascii") in part for part in parts):
            return boundary
