"""
Delivery status notifications: bounces, delay warnings and "relayed"
reports (RFC 3464, RFC 3461, RFC 6522), built as the bytes of a new message
to the original envelope sender, from the null reverse-path. Which
recipients a report names follows their NOTIFY (L{wanted}); ENVID and ORCPT
come back in Original-Envelope-Id and Original-Recipient.

Upstream diagnostics are attacker-controlled text: every piece of it is
stripped of control characters and line breaks and cut to a bounded length
before it goes anywhere near a header field, and the MIME boundary is random
and checked against the content, so nothing in it can add header fields or
parts. A bounce returns the whole original message when it fits in
L{HEADERS_LIMIT} and the sender did not ask for headers only (RET=HDRS) nor
sent it with REQUIRETLS (the report travels without it, RFC 8689 5); every
other report returns the header section only (L{mailgw.queue.returned}).
"""

from __future__ import annotations

import quopri
import re
import secrets
import textwrap
from collections.abc import Iterable
from typing import BinaryIO

from mailgw.dsnparams import Notify, Ret
from mailgw.envelope import (
    Address,
    BodyType,
    Envelope,
    QueuedMessage,
    RecipientState,
    RecipientStatus,
)
from mailgw.queue.reporttext import addressField as _addressField
from mailgw.queue.reporttext import asciiOnly as _ascii
from mailgw.queue.reporttext import clean as _clean
from mailgw.queue.reporttext import date as _date
from mailgw.queue.reporttext import remoteHost as _remoteHost
from mailgw.queue.returned import HEADERS_LIMIT, readHeaders, returnedPart

__all__ = [
    "DIAGNOSTIC_LIMIT",
    "HEADERS_LIMIT",
    "buildBounce",
    "buildDelayWarning",
    "buildRelayed",
    "readHeaders",
    "wanted",
]

#: Upstream diagnostics are cut to this many characters: a reply line is at
#: most 512 octets (RFC 5321 4.5.3.1.5), and a field stays far below 998.
DIAGNOSTIC_LIMIT = 400

_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}\Z")
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?\Z")
_CRLF = b"\r\n"
_BOUNCED = "Undelivered Mail Returned to Sender"
_DELAYED = "Delayed Mail (still being retried)"
_RELAYED = "Successful Mail Delivery Report"
# What a report says of its recipients: RFC 3464 2.3.3 actions.
_FAILED, _DELAYED_ACTION, _RELAYED_ACTION = "failed", "delayed", "relayed"


def wanted(message: QueuedMessage, addresses: Iterable[Address], event: Notify) -> set[Address]:
    """
    Those of ``addresses`` whose NOTIFY asks for a report on ``event``
    (RFC 3461 4.1: without NOTIFY, on FAILURE and DELAY only).
    """
    if not message.envelope.dsn:
        return set() if event is Notify.SUCCESS else set(addresses)
    requests = message.envelope.dsnFor()
    return {a for a in addresses if a in requests and requests[a].wants(event)}


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
    envelope = message.envelope
    full = envelope.ret is not Ret.HDRS and not envelope.requireTLS
    return _build(message, original, reportingMTA, now, states, None, headersLimit, full=full)


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


def buildRelayed(
    message: QueuedMessage,
    original: BinaryIO,
    reportingMTA: str,
    now: float,
    *,
    recipients: Iterable[Address] | None = None,
    headersLimit: int = HEADERS_LIMIT,
) -> tuple[Envelope, bytes]:
    """
    A success report (RFC 3464 Action: relayed) for the DELIVERED
    recipients of ``message`` (or only those of them in ``recipients``):
    they asked for NOTIFY=SUCCESS and went to an upstream that does not
    offer DSN, so no report will come from further on (RFC 3461 5.2.2).

    @return: the envelope and the message bytes, as L{buildBounce}.
    @raise ValueError: as L{buildBounce}, for delivered recipients.
    """
    states = _select(message, RecipientStatus.DELIVERED, recipients)
    return _build(
        message, original, reportingMTA, now, states, None, headersLimit, action=_RELAYED_ACTION
    )


def _intro(
    message: QueuedMessage,
    reportingMTA: str,
    now: float,
    count: int,
    retryUntil: float | None,
    action: str,
    whole: bool,
) -> list[str]:
    """The paragraphs that open the human-readable part."""
    first = f"This is the mail system at host {reportingMTA}."
    if action == _RELAYED_ACTION:
        return [
            first,
            "Your message was delivered to the mail servers of the recipients"
            " listed below, as you asked to be told. Those servers do not send"
            " delivery reports, so this is the last report you will get about"
            " these recipients.",
        ]
    if retryUntil is None:
        return [
            first,
            "Your message could not be delivered to "
            + ("one recipient." if count == 1 else f"{count} recipients.")
            + " This is a permanent error; the mail system has given up. The"
            " recipients and the reasons are listed below, and "
            + (
                "your message is attached."
                if whole
                else "the headers of your message are attached."
            ),
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
    *,
    full: bool = False,
    action: str = _FAILED,
) -> tuple[Envelope, bytes]:
    """
    A bounce, a delay warning when ``willRetryUntil`` is given, or a
    success report (``action`` relayed); ``full``: return the whole message
    when it fits in ``headersLimit``.
    """
    delayed = willRetryUntil is not None
    if delayed:
        action = _DELAYED_ACTION
    if not _HOSTNAME.match(reportingMTA):
        raise ValueError(f"reporting MTA {reportingMTA!r} is not a host name")
    sender = message.envelope.sender
    assert sender is not None  # _select refused bounces
    senderText = _clean(str(sender), 512)

    label = {_FAILED: "Undelivered", _DELAYED_ACTION: "Delayed"}.get(action, "Delivered")
    returned, whole = returnedPart(original, full, headersLimit, label)
    intro = _intro(message, reportingMTA, now, len(states), willRetryUntil, action, whole)
    human = _humanPart(intro, states, action)
    report = _reportPart(message, reportingMTA, states, willRetryUntil, action)
    parts = [human, report, returned]
    boundary = _boundary(parts)

    top = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reportingMTA}>",
        f"To: <{senderText}>",
        f"Subject: {_SUBJECTS[action]}",
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


_SUBJECTS = {_FAILED: _BOUNCED, _DELAYED_ACTION: _DELAYED, _RELAYED_ACTION: _RELAYED}


def _humanPart(intro: list[str], states: list[RecipientState], action: str) -> bytes:
    lines: list[str] = []
    for paragraph in intro:
        if lines:
            lines.append("")
        lines.extend(textwrap.wrap(paragraph, 72))
    for state in states:
        address = _clean(str(state.address), 512)
        reason = _humanReason(state, action)
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


def _humanReason(state: RecipientState, action: str) -> str:
    remote = _clean(state.remote, 255)
    diagnostic = _clean(state.diagnostic, DIAGNOSTIC_LIMIT)
    if action == _RELAYED_ACTION:
        return f"relayed to {remote or 'the next mail server'}"
    if state.code:
        said = _replyText(state)
        if remote:
            return f"host {remote} said: {said}"
        return f"the mail server said: {said}"
    if diagnostic:
        return diagnostic
    if action == _DELAYED_ACTION:
        return "delivery has not succeeded yet"
    return "delivery failed"


def _reportPart(
    message: QueuedMessage,
    reportingMTA: str,
    states: list[RecipientState],
    willRetryUntil: float | None,
    action: str,
) -> bytes:
    # RFC 3464 2.2: the per-message fields, then one block per recipient.
    fields = [
        f"Reporting-MTA: dns; {reportingMTA}",
        f"X-Mailgw-Queue-ID: {_ascii(_clean(message.queueId, 64))}",
        f"Arrival-Date: {_date(message.arrival)}",
    ]
    envid = message.envelope.envid
    if envid is not None:
        # RFC 3464 2.2.1, RFC 3461 4.4: the ENVID, first (printable ASCII, checked on the way in).
        fields.insert(0, f"Original-Envelope-Id: {_ascii(_clean(envid, 100))}")
    requests = message.envelope.dsnFor() if message.envelope.dsn else {}
    blocks = ["\r\n".join(fields)]
    for state in states:
        recipientFields = _recipientFields(state, action, willRetryUntil)
        request = requests.get(state.address)
        if request is not None and request.orcpt is not None:
            # RFC 3464 2.3.1, RFC 3461 4.2: the ORCPT, before Final-Recipient.
            addrType, address = request.orcpt
            original = f"{_ascii(_clean(addrType, 30))};{_ascii(_clean(address, 500))}"
            recipientFields.insert(0, f"Original-Recipient: {original}")
        blocks.append("\r\n".join(recipientFields))
    text = "\r\n\r\n".join(blocks) + "\r\n"
    return _part(
        [
            b"Content-Description: Delivery report",
            b"Content-Type: message/delivery-status",
        ],
        text.encode("ascii"),
    )


def _recipientFields(state: RecipientState, action: str, willRetryUntil: float | None) -> list[str]:
    fields = [
        f"Final-Recipient: {_addressField(state.address)}",
        f"Action: {action}",
        f"Status: {_status(state, action)}",
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


def _status(state: RecipientState, action: str) -> str:
    """
    The RFC 3463 status: the upstream's enhanced code when it gave a valid
    one, else the class of its reply code, else a generic one. A delay is
    never reported with a permanent (5.x.x) status, a success always 2.x.x.
    """
    if action == _RELAYED_ACTION:
        return (
            state.enhanced
            if _ENHANCED.match(state.enhanced) and state.enhanced[0] == "2"
            else "2.0.0"
        )
    delayed = action == _DELAYED_ACTION
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
