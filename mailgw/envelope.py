"""
Values that travel with a message: who sent it, to whom, over what session,
and what became of each recipient.

Everything here is an immutable value (``attrs.frozen``) that can be turned
into JSON and back without loss; the spool stores them that way.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs

from mailgw.dsnparams import NO_DSN, RecipientDSN, Ret


@attrs.frozen
class Address:
    """
    A mailbox as it stands in an SMTP path (RFC 5321 4.1.2), source route
    removed.

    ``local`` is kept in its wire form: a quoted local part keeps its quotes
    and backslashes, so the address can be sent on exactly as received.
    """

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def isASCII(self) -> bool:
        return str(self).isascii()


class BodyType(enum.Enum):
    """The BODY= parameter of MAIL (RFC 6152)."""

    SEVENBIT = "7BIT"
    EIGHTBITMIME = "8BITMIME"
    BINARYMIME = "BINARYMIME"  # RFC 3030: only in BDAT chunks, relayed only so


#: The version of the spool's state files this code writes. Files without a
#: version are of version 1.
SPOOL_FORMAT = 1

#: Keys of a stored record that this version does not know, kept as read
#: and written back, so that an older gateway running on a newer one's spool
#: (a rollback) loses nothing. Not part of equality.
_EXTRA: Any = attrs.field(factory=dict, eq=False, repr=False, kw_only=True)


def _split(data: dict[str, Any], names: frozenset[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``data`` as (the keys in ``names``, the others)."""
    if names.issuperset(data):
        return dict(data), {}
    known = {k: v for k, v in data.items() if k in names}
    return known, {k: v for k, v in data.items() if k not in names}


def _withExtra(extra: dict[str, Any], known: dict[str, Any]) -> dict[str, Any]:
    return {**extra, **known} if extra else known


_SESSION_KEYS = frozenset(
    ["clientAddress", "clientPort", "helo", "user", "tlsProtocol", "tlsCipher", "listener"]
) | {"sessionId"}
_ENVELOPE_KEYS = frozenset(
    [
        "sender",
        "recipients",
        "body",
        "smtputf8",
        "declaredSize",
        "ret",
        "envid",
        "requireTLS",
        "dsn",
        "contentFilter",
    ]
)
_RECIPIENT_KEYS = frozenset(
    ["address", "status", "attempts", "lastAttempt", "code", "enhanced", "diagnostic", "remote"]
)
_MESSAGE_KEYS = frozenset(
    [
        "version",
        "queueId",
        "envelope",
        "session",
        "arrival",
        "size",
        "recipients",
        "nextAttempt",
        "held",
        "warned",
        "holdReason",
    ]
)


@attrs.frozen
class Session:
    """
    What the server knows about the client when a message is accepted.

    ``user`` is the authenticated identity (AUTH), ``tlsProtocol`` and
    ``tlsCipher`` are ``None`` on a connection without TLS.
    """

    clientAddress: str
    clientPort: int | None = None
    helo: str = ""
    user: str | None = None
    tlsProtocol: str | None = None
    tlsCipher: str | None = None
    listener: str = "submission"
    #: The session's id in the log lines (``session``), linking its events
    #: to the messages it queued (``mailgw explain``); not part of equality.
    sessionId: str | None = attrs.field(default=None, eq=False, kw_only=True)
    extra: dict[str, Any] = _EXTRA

    def toJSON(self) -> dict[str, Any]:
        # By hand: attrs.asdict is several times slower, once per message.
        known: dict[str, Any] = {
            "clientAddress": self.clientAddress,
            "clientPort": self.clientPort,
            "helo": self.helo,
            "user": self.user,
            "tlsProtocol": self.tlsProtocol,
            "tlsCipher": self.tlsCipher,
            "listener": self.listener,
        }
        if self.sessionId is not None:
            known["sessionId"] = self.sessionId  # written only when known, as older files lack it
        return _withExtra(self.extra, known)

    @classmethod
    def fromJSON(cls, data: dict[str, Any]) -> Session:
        known, extra = _split(data, _SESSION_KEYS)
        return cls(**known, extra=extra)


def _dsnTuple(value: Any) -> tuple[RecipientDSN, ...]:
    """Empty when no recipient asked for anything: one form for "nothing"."""
    value = tuple(value)
    return value if any(not d.isDefault for d in value) else ()


@attrs.frozen
class Envelope:
    """
    One SMTP transaction's envelope: reverse-path and forward-paths.

    ``sender`` is ``None`` for the null reverse-path ``<>`` (bounces).
    ``ret``, ``envid`` and ``dsn`` are the DSN parameters (RFC 3461):
    ``dsn`` is empty, or one L{RecipientDSN} per recipient, in order.
    ``requireTLS``: MAIL had REQUIRETLS (RFC 8689).
    ``contentFilter`` names the content filter the message waits for
    (``smtp:127.0.0.1:10024``), set when it was queued; "" for none.
    """

    sender: Address | None
    recipients: tuple[Address, ...]
    body: BodyType = BodyType.SEVENBIT
    smtputf8: bool = False
    declaredSize: int | None = None
    ret: Ret | None = None
    envid: str | None = None
    requireTLS: bool = False
    dsn: tuple[RecipientDSN, ...] = attrs.field(default=(), kw_only=True, converter=_dsnTuple)
    contentFilter: str = ""
    extra: dict[str, Any] = _EXTRA

    @dsn.validator
    def _checkDSN(self, attribute: Any, value: tuple[RecipientDSN, ...]) -> None:
        if value and len(value) != len(self.recipients):
            raise ValueError("dsn must be empty or one per recipient")

    def dsnFor(self) -> dict[Address, RecipientDSN]:
        """Each recipient's DSN requests (the default for those without)."""
        if not self.dsn:
            return dict.fromkeys(self.recipients, NO_DSN)
        return dict(zip(self.recipients, self.dsn, strict=True))

    def toJSON(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "sender": None if self.sender is None else str(self.sender),
            "recipients": [str(r) for r in self.recipients],
            "body": self.body.value,
            "smtputf8": self.smtputf8,
            "declaredSize": self.declaredSize,
        }
        # Written only when used: the files of messages without them stay
        # as older versions wrote them.
        if self.ret is not None:
            data["ret"] = self.ret.value
        if self.envid is not None:
            data["envid"] = self.envid
        if self.requireTLS:
            data["requireTLS"] = True
        if self.dsn:
            data["dsn"] = [d.toJSON() for d in self.dsn]
        if self.contentFilter:
            data["contentFilter"] = self.contentFilter
        return _withExtra(self.extra, data)

    @classmethod
    def fromJSON(cls, data: dict[str, Any]) -> Envelope:
        sender = data["sender"]
        return cls(
            sender=None if sender is None else splitAddress(sender),
            recipients=tuple(splitAddress(r) for r in data["recipients"]),
            body=BodyType(data.get("body", "7BIT")),
            smtputf8=bool(data.get("smtputf8", False)),
            declaredSize=data.get("declaredSize"),
            ret=None if data.get("ret") is None else Ret(data["ret"]),
            envid=data.get("envid"),
            requireTLS=bool(data.get("requireTLS", False)),
            dsn=tuple(RecipientDSN.fromJSON(d) for d in data.get("dsn", ())),
            contentFilter=str(data.get("contentFilter", "")),
            extra=_split(data, _ENVELOPE_KEYS)[1],
        )


def splitAddress(text: str) -> Address:
    """
    Split an address already validated on the way in (``local@domain``) at
    its last ``@``; a quoted local part may itself contain ``@``.
    """
    local, at, domain = text.rpartition("@")
    if not at:
        raise ValueError(f"not an address: {text!r}")
    return Address(local, domain)


class RecipientStatus(enum.Enum):
    """Where one recipient of a queued message stands."""

    PENDING = "pending"
    DELIVERED = "delivered"
    BOUNCED = "bounced"


@attrs.frozen
class DeliveryResult:
    """
    The outcome of one delivery attempt for one recipient.

    ``permanent`` is true for a 5xx reply or a failure that retrying cannot
    fix; ``code``/``enhanced``/``text`` hold the upstream reply when there was
    one (``code`` 0 for network, TLS and timeout failures).
    """

    recipient: Address
    success: bool
    permanent: bool = False
    code: int = 0
    enhanced: str = ""
    text: str = ""
    remote: str = ""
    #: The upstream offered DSN and was given this recipient's NOTIFY/ORCPT
    #: (RFC 3461 5.2): it reports on its own, so we send no "relayed" report.
    dsnPassed: bool = False

    @property
    def transient(self) -> bool:
        return not self.success and not self.permanent


@attrs.frozen
class RecipientState:
    """
    The durable state of one recipient of a queued message.

    ``code``, ``enhanced``, ``diagnostic`` and ``remote`` describe the last
    attempt (the upstream's reply, or our own reason when there was none);
    a bounce (RFC 3464) is built from them.
    """

    address: Address
    status: RecipientStatus = RecipientStatus.PENDING
    attempts: int = 0
    lastAttempt: float | None = None
    code: int = 0
    enhanced: str = ""
    diagnostic: str = ""
    remote: str = ""
    extra: dict[str, Any] = _EXTRA

    def toJSON(self) -> dict[str, Any]:
        return _withExtra(
            self.extra,
            {
                "address": str(self.address),
                "status": self.status.value,
                "attempts": self.attempts,
                "lastAttempt": self.lastAttempt,
                "code": self.code,
                "enhanced": self.enhanced,
                "diagnostic": self.diagnostic,
                "remote": self.remote,
            },
        )

    @classmethod
    def fromJSON(cls, data: dict[str, Any]) -> RecipientState:
        known, extra = _split(data, _RECIPIENT_KEYS)
        known["address"] = splitAddress(known["address"])
        known["status"] = RecipientStatus(known["status"])
        return cls(**known, extra=extra)

    def withResult(self, result: DeliveryResult, when: float) -> RecipientState:
        """This state after ``result`` was seen at ``when``."""
        if result.success:
            status = RecipientStatus.DELIVERED
        elif result.permanent:
            status = RecipientStatus.BOUNCED
        else:
            status = RecipientStatus.PENDING
        return attrs.evolve(
            self,
            status=status,
            attempts=self.attempts + 1,
            lastAttempt=when,
            code=result.code,
            enhanced=result.enhanced,
            diagnostic=result.text,
            remote=result.remote,
        )


@attrs.frozen
class QueuedMessage:
    """
    A committed message as the spool describes it: its envelope, the session
    it came in on, and the state of every recipient.

    ``arrival`` and ``nextAttempt`` are POSIX timestamps. ``held`` messages
    are not tried until released; ``holdReason`` says why a message was
    held when it arrived (a milter's quarantine), "" otherwise.
    """

    queueId: str
    envelope: Envelope
    session: Session
    arrival: float
    size: int
    recipients: tuple[RecipientState, ...]
    nextAttempt: float = 0.0
    held: bool = False
    warned: bool = False
    holdReason: str = ""
    #: The format version of the file this state was read from (0: new).
    formatVersion: int = attrs.field(default=0, eq=False, repr=False, kw_only=True)
    extra: dict[str, Any] = _EXTRA

    @classmethod
    def arrived(
        cls, queueId: str, envelope: Envelope, session: Session, now: float, size: int
    ) -> QueuedMessage:
        """A message just committed: every recipient pending, due at once."""
        return cls(
            queueId=queueId,
            envelope=envelope,
            session=session,
            arrival=now,
            size=size,
            recipients=tuple(RecipientState(r) for r in envelope.recipients),
            nextAttempt=now,
        )

    @property
    def pendingRecipients(self) -> tuple[RecipientState, ...]:
        return tuple(r for r in self.recipients if r.status is RecipientStatus.PENDING)

    @property
    def finished(self) -> bool:
        return not self.pendingRecipients

    @property
    def isBounce(self) -> bool:
        return self.envelope.sender is None

    def toJSON(self) -> dict[str, Any]:
        data = self._json()
        if self.holdReason:
            data["holdReason"] = self.holdReason
        return data

    def _json(self) -> dict[str, Any]:
        return _withExtra(
            self.extra,
            {
                # A newer gateway's version is kept: its readers know what
                # they added, and ours keeps what it does not understand.
                "version": max(SPOOL_FORMAT, self.formatVersion),
                "queueId": self.queueId,
                "envelope": self.envelope.toJSON(),
                "session": self.session.toJSON(),
                "arrival": self.arrival,
                "size": self.size,
                "recipients": [r.toJSON() for r in self.recipients],
                "nextAttempt": self.nextAttempt,
                "held": self.held,
                "warned": self.warned,
            },
        )

    @classmethod
    def fromJSON(cls, data: dict[str, Any]) -> QueuedMessage:
        """
        Read what this version understands; keep every other key (a newer
        gateway's) in ``extra``, to be written back unchanged.

        @raise ValueError: the version is not a positive integer.
        """
        version = data.get("version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError(f"bad format version {version!r}")
        return cls(
            formatVersion=version,
            extra=_split(data, _MESSAGE_KEYS)[1],
            queueId=data["queueId"],
            envelope=Envelope.fromJSON(data["envelope"]),
            session=Session.fromJSON(data["session"]),
            arrival=float(data["arrival"]),
            size=int(data["size"]),
            recipients=tuple(RecipientState.fromJSON(r) for r in data["recipients"]),
            nextAttempt=float(data.get("nextAttempt", 0.0)),
            held=bool(data.get("held", False)),
            warned=bool(data.get("warned", False)),
            holdReason=str(data.get("holdReason") or ""),
        )
