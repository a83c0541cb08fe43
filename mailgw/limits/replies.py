"""
The replies of the limiters, kept apart from L{mailgw.server.replies} (the
server's own catalogue) but built the same way.
"""

from __future__ import annotations

from mailgw.server.replies import SMTPReply

#: AUTH refused without checking the password: a network or account budget
#: is spent. Transient: the budget comes back over the window.
AUTH_THROTTLED = SMTPReply(454, "4.7.0", "Too many authentication failures; try again later")

#: The client address spent its own AUTH budget: the connection is closed.
AUTH_THROTTLED_CLOSE = SMTPReply(
    421, "4.7.0", "Too many authentication failures; closing connection"
)

#: AUTH refused without checking the password: as many verifications as
#: ``auth_concurrent_per_address``, ``auth_concurrent_per_account`` or
#: ``auth_concurrent_total`` allow are under way. Transient: a slot comes
#: back as soon as one of them is answered.
AUTH_BUSY = SMTPReply(454, "4.7.0", "Too many authentication attempts in progress; try again later")

#: The server holds ``max_connections`` connections (RFC 5321 3.8: 421).
TOO_MANY_CONNECTIONS = SMTPReply(421, "4.3.2", "Too many connections; try again later")

#: The client address holds ``max_connections_per_address`` connections, or
#: opened more than ``connection_rate_per_address`` in the last minute.
TOO_MANY_FROM_ADDRESS = SMTPReply(421, "4.7.0", "Too many connections from your address")

#: ``messages_per_user`` spent (at MAIL). Format with ``user``.
MESSAGE_RATE = SMTPReply(
    451, "4.7.1", "Message rate limit exceeded for user {user}; try again later"
)

#: ``recipients_per_user`` spent (at RCPT; RFC 5321 4.5.3.1.10 allows 452).
#: Format with ``user``.
RECIPIENT_RATE = SMTPReply(
    452, "4.5.3", "Recipient rate limit exceeded for user {user}; try again later"
)
