"""
Submission policies: what an authenticated client may send
(L{mailgw.interfaces.ISubmissionPolicy}). L{AcceptAll} (accept.py) lets
everything through; L{SenderLoginPolicy} (senders.py) enforces sender
ownership, the gateway's default. The limits and quotas are in
L{mailgw.limits}.
"""

from mailgw.policy.accept import AcceptAll
from mailgw.policy.senders import SenderLoginPolicy

__all__ = ["AcceptAll", "SenderLoginPolicy"]
