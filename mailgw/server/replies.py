"""
Moved to L{mailgw.replies}, below every phase that answers; this name is
kept so that code written against the old place still imports.
"""

from mailgw.replies import *  # noqa: F403
from mailgw.replies import SMTPReply, reply  # noqa: F401
