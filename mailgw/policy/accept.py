"""
Submission policy: what an authenticated client may send.
"""

from __future__ import annotations

from zope.interface import implementer

from mailgw.envelope import Address, Envelope, Session
from mailgw.interfaces import ISubmissionPolicy
from mailgw.replies import SMTPReply


@implementer(ISubmissionPolicy)
class AcceptAll:
    """
    Lets every authenticated user use any sender and any recipient; the
    server's own limits (size, recipients per message) still apply.
    """

    def checkSender(self, session: Session, sender: Address | None) -> SMTPReply | None:
        return None

    def checkRecipient(
        self, session: Session, sender: Address | None, recipient: Address
    ) -> SMTPReply | None:
        return None

    def checkMessage(
        self, session: Session, envelope: Envelope, headers: bytes
    ) -> SMTPReply | None:
        return None
