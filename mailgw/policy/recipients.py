"""
Recipient restrictions: which recipient domains each user, or every user
of the gateway, may send to (``[policy] allowed_recipient_domains`` and
``[policy.recipient_domains]``, docs/configuration.md).

A domain pattern ``example.org`` allows that domain alone, ``.example.org``
its subdomains (write both for both). A user listed in the per-user table
gets that list instead of the gateway-wide one; an empty gateway-wide list
allows every domain. A refusal is ``550 5.7.1`` at RCPT, permanent: the
account is not allowed there, retrying will not help.

L{RecipientDomainPolicy} wraps another L{ISubmissionPolicy} (the sender
policy): its answers come first, and this check runs when it accepts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import idna
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from mailgw import replies
from mailgw.config import normalizeDomain
from mailgw.envelope import Address, Envelope, Session
from mailgw.interfaces import ISubmissionPolicy
from mailgw.replies import SMTPReply

__all__ = ["RecipientDomainPolicy", "domainAllowed"]

log = Logger()


def domainAllowed(domain: str, patterns: tuple[str, ...]) -> bool:
    """Is ``domain`` one of ``patterns`` (A-labels; ``.parent`` for subdomains)?"""
    try:
        domain = normalizeDomain(domain)
    except (idna.IDNAError, UnicodeError, ValueError):
        return False  # an address literal or junk matches no domain pattern
    for pattern in patterns:
        if pattern.startswith("."):
            if domain.endswith(pattern) and len(domain) > len(pattern):
                return True
        elif domain == pattern:
            return True
    return False


@implementer(ISubmissionPolicy)
@attrs.frozen
class RecipientDomainPolicy:
    """
    ``inner`` (the sender policy) first, then the recipient domain check.
    ``everyone``: the gateway-wide patterns (empty: any domain);
    ``perUser``: login (lowercased) -> that user's patterns.
    """

    inner: Any
    everyone: tuple[str, ...] = ()
    perUser: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict, hash=False)

    def checkSender(self, session: Session, sender: Address | None) -> Any:
        return self.inner.checkSender(session, sender)

    def checkRecipient(self, session: Session, sender: Address | None, recipient: Address) -> Any:
        first = self.inner.checkRecipient(session, sender, recipient)
        if isinstance(first, Deferred):
            return first.addCallback(self._then, session, recipient)
        return self._then(first, session, recipient)

    def checkMessage(self, session: Session, envelope: Envelope, headers: bytes) -> Any:
        return self.inner.checkMessage(session, envelope, headers)

    def _then(self, first: SMTPReply | None, session: Session, recipient: Address) -> Any:
        if first is not None:
            return first
        patterns = self.everyone
        if session.user is not None:
            patterns = self.perUser.get(session.user.lower(), patterns)
        if not patterns or domainAllowed(recipient.domain, patterns):
            return None
        log.info(
            "recipient refused (domain not allowed): user={user!r} recipient={rcpt!r}",
            user=session.user,
            rcpt=str(recipient),
        )
        return replies.RECIPIENT_DOMAIN_REFUSED
