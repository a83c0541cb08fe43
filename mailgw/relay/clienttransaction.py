"""
The per-message side of mailgw's ESMTP client: what an upstream's EHLO
offers, whether a message may go to it at all, the MAIL command, and the
bookkeeping that turns replies and failures into one
L{DeliveryResult} per pending recipient.

Classification (RFC 5321 4.2.1, 4.5.3.1): 2xx to RCPT and to the final dot
is success; 5xx is permanent for the recipients it concerns, 4xx transient;
530 (authentication required) is transient, being our configuration's
fault; session-ending failures are transient for all that is unfinished.
"""

from __future__ import annotations

import re

import attrs

from mailgw.dsnparams import NO_DSN, RecipientDSN, encodeXtext
from mailgw.envelope import Address, BodyType, DeliveryResult, QueuedMessage
from mailgw.relay.clientprotocol import RelayError, Reply


def wireSafe(text: str) -> bool:
    """Whether C{text} may go into a command line: no control characters."""
    return not any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")


@attrs.frozen
class Capabilities:
    """
    What an upstream's EHLO reply offers (RFC 5321 4.1.1.1): upper-cased
    keywords, the SIZE limit (None when SIZE is not offered, 0 when offered
    without a fixed limit, RFC 1870) and the AUTH mechanisms.
    """

    keywords: frozenset[str] = frozenset()
    sizeLimit: int | None = None
    authMechanisms: frozenset[str] = frozenset()

    def offers(self, keyword: str) -> bool:
        return keyword in self.keywords

    @classmethod
    def fromEHLO(cls, reply: Reply) -> Capabilities:
        keywords: set[str] = set()
        sizeLimit: int | None = None
        mechanisms: set[str] = set()
        for line in reply.lines[1:]:
            words = line.split()
            if not words or not _KEYWORD.match(words[0]):
                continue
            keyword, params = words[0].upper(), words[1:]
            keywords.add(keyword)
            if keyword == "SIZE":
                limit = params[0] if params else ""
                # A limit of more digits than any disk holds is no limit.
                sizeLimit = int(limit) if limit.isdigit() and len(limit) <= 20 else 0
            elif keyword == "AUTH":
                mechanisms.update(p.upper() for p in params)
        return cls(frozenset(keywords), sizeLimit, frozenset(mechanisms))


@attrs.frozen
class Outcome:
    """A DeliveryResult without its recipient and remote."""

    success: bool
    permanent: bool
    code: int = 0
    enhanced: str = ""
    text: str = ""

    @classmethod
    def fromError(cls, error: RelayError) -> Outcome:
        """Transient; the upstream's code is kept only when it was a 4xx."""
        reply = error.reply
        if reply is not None and reply.code < 500:
            return cls(False, False, reply.code, reply.enhanced, str(error))
        return cls(False, False, 0, "", str(error))


def classify(reply: Reply) -> Outcome:
    """The outcome for the recipients a 2xx, 4xx or 5xx C{reply} concerns."""
    if reply.positive:
        return Outcome(True, False, reply.code, reply.enhanced, reply.text)
    if reply.code == 530:
        # The upstream wants AUTH and we were not configured for it: a bounce
        # would punish the sender for our mistake (RFC 4954 6).
        return Outcome.fromError(
            RelayError(f"upstream requires authentication ({reply}); check the relay configuration")
        )
    return Outcome(False, reply.code >= 500, reply.code, reply.enhanced, reply.text)


CANNOT_8BIT = Outcome(
    False, True, 554, "5.6.3", "upstream does not support 8BITMIME; cannot take this 8-bit message"
)
CANNOT_BINARY = Outcome(
    False,
    True,
    554,
    "5.6.3",
    "upstream does not support BINARYMIME with CHUNKING; cannot take this binary message",
)
CANNOT_UTF8 = Outcome(
    False, True, 554, "5.6.7", "upstream does not support SMTPUTF8 and cannot take this message"
)
TOO_BIG = Outcome(False, True, 552, "5.3.4", "message too big for upstream")
BAD_SENDER = Outcome(False, True, 553, "5.1.7", "sender address cannot be sent safely")
BAD_RECIPIENT = Outcome(False, True, 553, "5.1.3", "recipient address cannot be sent safely")
# RFC 8689 4.2.1: a REQUIRETLS message goes only over verified TLS to an
# upstream that offers REQUIRETLS; else it is returned (5.7.30, RFC 8689 7.2).
REQUIRETLS_NO_TLS = Outcome(
    False,
    True,
    550,
    "5.7.30",
    "REQUIRETLS support required: the message requires TLS with a verified certificate,"
    " and the connection to the upstream had none",
)
REQUIRETLS_NOT_OFFERED = Outcome(
    False,
    True,
    550,
    "5.7.30",
    "REQUIRETLS support required: the upstream does not offer REQUIRETLS",
)


@attrs.define
class Transaction:
    """
    One queued message in a session: its pending recipients, in order, and
    the outcome of each once known.
    """

    message: QueuedMessage
    remote: str
    recipients: list[Address]
    outcomes: list[Outcome | None]
    #: The upstream offered DSN and was given the DSN parameters (RFC 3461 5.2).
    dsnPassed: bool = False
    _requests: dict[Address, RecipientDSN] | None = attrs.field(default=None, init=False)

    @classmethod
    def forMessage(cls, message: QueuedMessage, remote: str) -> Transaction:
        recipients = [r.address for r in message.pendingRecipients]
        return cls(message, remote, recipients, [None] * len(recipients))

    @property
    def finished(self) -> bool:
        return all(o is not None for o in self.outcomes)

    def unfinished(self) -> list[tuple[int, Address]]:
        """The recipients still without an outcome, with their positions."""
        return [(i, a) for i, a in enumerate(self.recipients) if self.outcomes[i] is None]

    def finish(self, index: int, outcome: Outcome) -> None:
        if self.outcomes[index] is None:
            self.outcomes[index] = outcome

    def finishAll(self, outcome: Outcome) -> None:
        for index, _ in self.unfinished():
            self.finish(index, outcome)

    def failUnfinished(self, error: RelayError) -> None:
        self.finishAll(Outcome.fromError(error))

    def results(self) -> list[DeliveryResult]:
        missing = Outcome(False, False, 0, "", "not attempted")
        return [
            DeliveryResult(
                a, o.success, o.permanent, o.code, o.enhanced, o.text, self.remote, self.dsnPassed
            )
            for a, o in zip(self.recipients, (o or missing for o in self.outcomes), strict=True)
        ]

    @property
    def needsUTF8(self) -> bool:
        envelope = self.message.envelope
        addresses = [*self.recipients, *([envelope.sender] if envelope.sender else [])]
        return envelope.smtputf8 or not all(a.isASCII for a in addresses)

    def refuse(self, capabilities: Capabilities, verifiedTLS: bool) -> bool:
        """
        Finish, permanently, what cannot go to this upstream (RFC 6152 3,
        RFC 3030 3, RFC 6531 3.4, RFC 1870 6, RFC 8689 4.2.1, addresses with control
        characters); ``verifiedTLS``: the session's TLS verified the
        upstream's certificate.

        @return: whether nothing is left to send.
        """
        envelope, size = self.message.envelope, self.message.size
        if envelope.requireTLS and not verifiedTLS:
            self.finishAll(REQUIRETLS_NO_TLS)
        elif envelope.requireTLS and not capabilities.offers("REQUIRETLS"):
            self.finishAll(REQUIRETLS_NOT_OFFERED)
        elif envelope.body is BodyType.EIGHTBITMIME and not capabilities.offers("8BITMIME"):
            self.finishAll(CANNOT_8BIT)
        elif envelope.body is BodyType.BINARYMIME and not (
            capabilities.offers("BINARYMIME") and capabilities.offers("CHUNKING")
        ):
            self.finishAll(CANNOT_BINARY)  # RFC 3030 3: never converted
        elif self.needsUTF8 and not capabilities.offers("SMTPUTF8"):
            self.finishAll(CANNOT_UTF8)
        elif capabilities.sizeLimit and size > capabilities.sizeLimit:
            self.finishAll(TOO_BIG)
        elif envelope.sender is not None and not wireSafe(str(envelope.sender)):
            self.finishAll(BAD_SENDER)
        for index, address in self.unfinished():
            if not wireSafe(str(address)):
                self.finish(index, BAD_RECIPIENT)
        return self.finished

    def mailCommand(self, capabilities: Capabilities) -> str:
        """MAIL FROM with only the parameters needed and offered."""
        sender = self.message.envelope.sender
        params = [f"MAIL FROM:<{'' if sender is None else sender}>"]
        if capabilities.sizeLimit is not None:
            params.append(f"SIZE={self.message.size}")
        if self.message.envelope.body is BodyType.EIGHTBITMIME:
            params.append("BODY=8BITMIME")
        elif self.message.envelope.body is BodyType.BINARYMIME:
            params.append("BODY=BINARYMIME")
        if self.needsUTF8:
            params.append("SMTPUTF8")
        envelope = self.message.envelope
        if capabilities.offers("DSN"):
            # RFC 3461 5.2: the requests travel on with the message.
            self.dsnPassed = True
            if envelope.ret is not None:
                params.append(f"RET={envelope.ret.value}")
            if envelope.envid is not None:
                params.append(f"ENVID={encodeXtext(envelope.envid)}")
        if envelope.requireTLS:
            params.append("REQUIRETLS")  # refuse() made sure it is offered
        return " ".join(params)

    def rcptCommand(self, address: Address, capabilities: Capabilities) -> str:
        """RCPT TO, with NOTIFY and ORCPT when the upstream offers DSN."""
        command = f"RCPT TO:<{address}>"
        if not capabilities.offers("DSN"):
            return command
        return command + self._dsn().get(address, NO_DSN).parameters()

    def _dsn(self) -> dict[Address, RecipientDSN]:
        if self._requests is None:
            envelope = self.message.envelope
            self._requests = envelope.dsnFor() if envelope.dsn else {}
        return self._requests
