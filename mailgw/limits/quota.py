"""
Submission quotas: how many messages and recipients one authenticated user
may submit per window, so that a stolen password sends little spam.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

from mailgw.config import LimitsConfig
from mailgw.limits._counters import DEFAULT_MAX_KEYS
from mailgw.limits.shared import SyncedCounters, makeTable
from mailgw.replies import MESSAGE_RATE, RECIPIENT_RATE, SMTPReply

# A user name in a reply: printable, and short enough for one reply line.
_USER_IN_REPLY = 64


def _forReply(user: str) -> str:
    shown = "".join(ch if ch.isprintable() else "?" for ch in user[:_USER_IN_REPLY])
    return shown + ("..." if len(user) > _USER_IN_REPLY else "")


class SubmissionQuota:
    """
    Messages (``settings.messagesPerUser``) and recipients
    (``settings.recipientsPerUser``) per user over a sliding window of
    ``settings.quotaWindow`` seconds; a quota of 0 is no quota. Users are
    case-folded. Check L{checkMessage} at MAIL and L{checkRecipient} at each
    RCPT; L{record} each message once it is queued. Replies are transient:
    the quota comes back over the window.

    With ``shared`` both are counted across the site (tables
    ``quota-messages`` and ``quota-recipients``, see L{mailgw.limits.shared}).
    """

    def __init__(
        self,
        clock: IReactorTime,
        settings: LimitsConfig,
        maxKeys: int = DEFAULT_MAX_KEYS,
        shared: SyncedCounters | None = None,
    ) -> None:
        self._settings = settings
        window = settings.quotaWindow
        s = settings
        self._messages = makeTable(
            clock, shared, "quota-messages", s.messagesPerUser, window, maxKeys
        )
        self._recipients = makeTable(
            clock, shared, "quota-recipients", s.recipientsPerUser, window, maxKeys
        )

    def checkMessage(self, user: str) -> SMTPReply | None:
        """None when ``user`` may start a message; else the 451 4.7.1 reply."""
        limit = self._settings.messagesPerUser
        if self._settings.recipientsPerUser:
            self._recipients.prefetch(user.casefold())  # shared: RCPT follows
        if limit and self._messages.count(user.casefold()) >= limit:
            return MESSAGE_RATE.withText(MESSAGE_RATE.text.format(user=_forReply(user)))
        return None

    def checkRecipient(self, user: str, recipientsSoFarInThisMessage: int) -> SMTPReply | None:
        """
        None when ``user`` may add one more recipient to a message that
        already has ``recipientsSoFarInThisMessage`` accepted ones; else the
        452 4.5.3 reply.
        """
        limit = self._settings.recipientsPerUser
        used = self._recipients.count(user.casefold()) if limit else 0
        if limit and used + recipientsSoFarInThisMessage >= limit:
            return RECIPIENT_RATE.withText(RECIPIENT_RATE.text.format(user=_forReply(user)))
        return None

    def record(self, user: str, recipients: int) -> None:
        """Count one queued message of ``user`` with ``recipients`` recipients."""
        key = user.casefold()
        if self._settings.messagesPerUser:
            self._messages.add(key)
        if self._settings.recipientsPerUser and recipients > 0:
            self._recipients.add(key, recipients)

    def usage(self, user: str) -> dict[str, float | int]:
        """What ``user`` has used of the quotas now (a limit of 0: none)."""
        key = user.casefold()
        return {
            "messages": self._messages.count(key) if self._settings.messagesPerUser else 0,
            "messagesLimit": self._settings.messagesPerUser,
            "recipients": self._recipients.count(key) if self._settings.recipientsPerUser else 0,
            "recipientsLimit": self._settings.recipientsPerUser,
            "window": self._settings.quotaWindow,
        }

    def trackedKeys(self) -> int:
        """How many keys the quota holds."""
        return len(self._messages) + len(self._recipients)
