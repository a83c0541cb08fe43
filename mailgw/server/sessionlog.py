"""
What one session did, for the line logged at its disconnect (Postfix's
``disconnect from`` line) and for the metrics (docs/operations.md, "Logs").

    disconnect from client=192.0.2.7 listener=submission tls=TLSv1.3/TLS_AES_256_GCM_SHA384
    user=alice@example.org mech=PLAIN ehlo=2 starttls=1 auth=1 mail=1 rcpt=1 data=1 quit=1
    commands=8 outcome=quit

A command count is the number of times the client sent it; ``auth=0/2``
says that none of two AUTH attempts succeeded (as Postfix writes it).
Every field is also a key of the log event (the JSON log format writes
them), and ``commands`` is a mapping there.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.logger import Logger

from mailgw import replies
from mailgw.replies import SMTPReply

_log = Logger(namespace="mailgw.server.session")

#: The commands counted by name, in the order they are written; any other
#: line (an unknown verb) counts as ``unknown``.
COUNTED = (
    "ehlo",
    "helo",
    "starttls",
    "auth",
    "mail",
    "rcpt",
    "data",
    "bdat",
    "rset",
    "noop",
    "vrfy",
    "expn",
    "help",
    "quit",
    "unknown",
)
_KNOWN = frozenset(COUNTED)

#: How a session ended (the ``outcome`` field and the connections metric).
QUIT, TIMEOUT, SHUTDOWN, LIMIT, DROPPED, LOST, TLS_FAILED = (
    "quit",
    "timeout",
    "shutdown",
    "limit",
    "dropped",
    "lost",
    "tls_failed",
)
_BY_REPLY = {
    replies.BYE: QUIT,
    replies.TIMEOUT: TIMEOUT,
    replies.SESSION_TIMEOUT: TIMEOUT,
    replies.PREAUTH_TIMEOUT: TIMEOUT,
    replies.SHUTDOWN: SHUTDOWN,
}


def _printable(text: str, limit: int = 128) -> str:
    return "".join(c if c.isprintable() and c != " " else "?" for c in text[:limit])


@attrs.define
class SessionRecord:
    """Counts and facts of one session, filled in as it goes."""

    client: str = "unknown"
    listener: str = "submission"
    tlsVersion: str | None = None
    tlsCipher: str | None = None
    user: str | None = None
    mechanism: str | None = None
    authOK: int = 0
    outcome: str | None = None
    counts: dict[str, int] = attrs.field(factory=dict)
    total: int = 0
    sessionId: str | None = None

    def command(self, verb: str) -> None:
        name = verb.lower()
        if name not in _KNOWN:
            name = "unknown"
        self.counts[name] = self.counts.get(name, 0) + 1
        self.total += 1

    def closedWith(self, reply: SMTPReply | None, refusedByLimit: bool = False) -> None:
        """The server closes the session, with ``reply`` (the first close counts)."""
        if self.outcome is None:
            known = _BY_REPLY.get(reply, DROPPED) if reply is not None else DROPPED
            self.outcome = LIMIT if refusedByLimit else known

    def ended(self, tlsExpected: bool) -> str:
        """The outcome, once the connection is gone."""
        if self.outcome is None:
            self.outcome = LOST
        if tlsExpected and self.tlsVersion is None and self.outcome != LIMIT:
            self.outcome = TLS_FAILED
        return self.outcome

    def tls(self) -> str:
        if self.tlsVersion is None:
            return "none"
        return f"{self.tlsVersion}/{self.tlsCipher}" if self.tlsCipher else self.tlsVersion

    def commandText(self) -> str:
        parts = []
        for name in COUNTED:
            count = self.counts.get(name)
            if not count:
                continue
            if name == "auth" and self.authOK != count:
                parts.append(f"auth={self.authOK}/{count}")
            else:
                parts.append(f"{name}={count}")
        parts.append(f"commands={self.total}")
        return " ".join(parts)

    def log(self) -> None:
        """The ``disconnect from`` line; call once, after L{ended}."""
        fields: dict[str, Any] = {
            "client": self.client,
            "listener": self.listener,
            "tls": self.tls(),
            "user": _printable(self.user) if self.user is not None else None,
            "mech": self.mechanism,
            "commands": dict(self.counts),
            "commandCount": self.total,
            "authOK": self.authOK,
            "outcome": self.outcome,
            "session": self.sessionId,
        }
        who = ""
        if self.user is not None:
            who = f" user={fields['user']} mech={self.mechanism or 'unknown'}"
        _log.info(
            "disconnect from client={client} listener={listener} tls={tls}{who} "
            "{commandText} outcome={outcome}",
            who=who,
            commandText=self.commandText(),
            **fields,
        )
