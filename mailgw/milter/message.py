"""
The end of message: each milter, in order, is asked for its verdict once
every milter has read the whole message; its changes (header fields, body,
recipients, quarantine) count only if it then continues or accepts. The
first refusal or discard ends the round.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailgw.envelope import Address
from mailgw.milter import codec
from mailgw.milter.edits import MessageEdits, cleanValue, normaliseBody, safeName
from mailgw.milter.link import Link, decision, fallback, parseRecipient
from mailgw.milter.verdict import REJECT, MessageVerdict

if TYPE_CHECKING:
    from mailgw.milter.chain import MilterSession

_log = Logger(namespace="mailgw.milter")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")

#: The action each modification needs to have been negotiated.
_NEEDS = {
    codec.ADDHEADER: codec.ADDHDRS,
    codec.INSHEADER: codec.ADDHDRS,
    codec.CHGHEADER: codec.CHGHDRS,
    codec.REPLBODY: codec.CHGBODY,
    codec.ADDRCPT: codec.ADDRCPT_ACTION,
    codec.DELRCPT: codec.DELRCPT_ACTION,
    codec.QUARANTINE: codec.QUARANTINE_ACTION,
}


class _Refused(Exception):
    """A milter broke the rules in its changes; its default action applies."""


@attrs.define
class _Changes:
    """One milter's changes, merged into the round's only when it continues or accepts."""

    edits: MessageEdits
    recipients: list[Address]
    holdReason: str | None
    bodyParts: list[bytes] = attrs.field(factory=list)
    bodySize: int = 0
    recipientsChanged: bool = False


class EndOfMessage:
    """One round of end-of-message verdicts for L{MilterSession}."""

    def __init__(self, session: MilterSession, links: list[Link], recipients: list[Address]):
        self._session, self._links = session, links
        self._edits = MessageEdits()
        self._recipients = recipients
        self._changed = False
        self._holdReason: str | None = None
        self._holdBy = ""

    def run(self) -> Deferred[MessageVerdict]:
        waits = [self._session._drained(link) for link in self._links]
        d = gatherResults(waits)
        return d.addCallback(lambda _: self._next(iter(self._links)))

    def _next(self, links: Iterator[Link]) -> Any:
        for link in links:
            if link.stuck is not None:
                return self._finish(reply=link.stuck, by=link.server.address)
            if not (link.usable and link.inMessage) or link.messageOff:
                link.inMessage = False
                continue
            if link.outcome is not None:
                link.inMessage = False
                kind, reply = link.outcome
                if kind == "discard":
                    return self._finish(discard=True, by=link.server.address)
                return self._finish(reply=reply, by=link.server.address)
            if self._session.discarded:
                return self._finish(discard=True, by="")
            d: Deferred[Any] = self._ask(link)
            return d.addCallback(self._then, links)
        if self._session.discarded:
            return self._finish(discard=True, by="")
        return self._finish()

    def _then(self, verdict: MessageVerdict | None, links: Iterator[Link]) -> Any:
        return verdict if verdict is not None else self._next(links)

    def _ask(self, link: Link) -> Deferred[MessageVerdict | None]:
        client = link.client
        assert client is not None
        client.send(codec.macros(codec.BODYEOB, {"i": self._session._queueId}))
        d = client.ask(codec.packet(codec.BODYEOB), link.server.contentTimeout)
        link.inMessage = False  # libmilter ends the message context with its reply

        def answered(responses: list[codec.Response]) -> MessageVerdict | None:
            try:
                changes = self._changes(link, responses[:-1])
            except _Refused as e:
                return failed(Failure(e))
            final = responses[-1]
            if final.code in (codec.CONTINUE, codec.ACCEPT):
                self._merge(changes, link)
                return None
            kind, reply = decision(final, REJECT)
            if kind == "discard":
                return self._finish(discard=True, by=link.server.address)
            return self._finish(reply=reply, by=link.server.address)

        def failed(failure: Failure) -> MessageVerdict | None:
            fallback(link, failure.getErrorMessage())
            if link.stuck is not None:
                return self._finish(reply=link.stuck, by=link.server.address)
            return None

        return d.addCallbacks(answered, failed)

    def _changes(self, link: Link, responses: list[codec.Response]) -> _Changes:
        chain = self._session._chain
        leading = link.has(codec.HDR_LEADSPC)
        changes = _Changes(MessageEdits(), list(self._recipients), None)
        for r in responses:
            if not link.options.actions & _NEEDS.get(r.code, 0):
                raise _Refused(f"change {r.code!r} not negotiated")
            if r.code in (codec.ADDHEADER, codec.INSHEADER, codec.CHGHEADER):
                if not safeName(r.name):
                    raise _Refused("bad header name")
                value = cleanValue(r.value, leading)
                if r.code == codec.ADDHEADER:
                    changes.edits.add(r.name, value)
                elif r.code == codec.INSHEADER:
                    changes.edits.insert(r.index, r.name, value)
                else:
                    changes.edits.change(r.index, r.name, value if r.value else b"")
            elif r.code == codec.REPLBODY:
                changes.bodySize += len(r.data)
                if changes.bodySize > chain.maxMessageSize:
                    raise _Refused("replaced body too large")
                changes.bodyParts.append(r.data)
            elif r.code in (codec.ADDRCPT, codec.DELRCPT):
                address = parseRecipient(r.text)
                if address is None:
                    raise _Refused("bad recipient")
                changes.recipientsChanged = True
                self._recipient(changes.recipients, address, r.code == codec.ADDRCPT)
                if len(changes.recipients) > chain.maxRecipients:
                    raise _Refused("too many recipients")
            else:  # QUARANTINE
                changes.holdReason = _UNPRINTABLE.sub("?", r.text)[:200] or "quarantined"
        return changes

    @staticmethod
    def _recipient(recipients: list[Address], address: Address, add: bool) -> None:
        key = str(address).lower()
        present = [r for r in recipients if str(r).lower() == key]
        if add and not present:
            recipients.append(address)
        elif not add:
            for r in present:
                recipients.remove(r)

    def _merge(self, changes: _Changes, link: Link) -> None:
        self._edits.operations.extend(changes.edits.operations)
        if changes.bodyParts:
            self._edits.body = normaliseBody(b"".join(changes.bodyParts))
        if changes.recipientsChanged:
            self._recipients, self._changed = changes.recipients, True
        if changes.holdReason is not None:
            self._holdReason, self._holdBy = changes.holdReason, link.server.address

    def _finish(self, reply: object = None, discard: bool = False, by: str = "") -> MessageVerdict:
        for link in self._links:
            if link.inMessage and link.client is not None and not link.busy:
                link.client.send(codec.packet(codec.ABORT))
            link.inMessage = False
        if reply is not None or discard:
            return MessageVerdict(reply=reply, discard=discard, by=by)  # type: ignore[arg-type]
        return MessageVerdict(
            edits=self._edits,
            recipients=tuple(self._recipients) if self._changed else None,
            holdReason=self._holdReason,
            by=self._holdBy,
        )
