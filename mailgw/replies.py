"""
SMTP replies: one value type and a named catalogue of every reply the
server sends, so that wording and enhanced status codes (RFC 3463, RFC 5248)
live in one place.

RFC 2034 puts no enhanced code on the greeting, on the replies to HELO and
EHLO, nor on the intermediate 334 and 354 replies; every other reply has one.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class SMTPReply:
    """
    One reply: a three-digit ``code``, an ``enhanced`` status code (may be
    empty where RFC 2034 says so) and one or more lines of ``text``.
    """

    code: int
    enhanced: str
    text: str

    def withText(self, text: str) -> SMTPReply:
        return attrs.evolve(self, text=text)

    @property
    def isError(self) -> bool:
        return self.code >= 400

    @property
    def isTransient(self) -> bool:
        return 400 <= self.code < 500

    def toBytes(self) -> bytes:
        """
        The reply on the wire, CRLF-terminated, multi-line where ``text`` has
        several lines (RFC 5321 4.2.1).
        """
        lines = self.text.split("\n") or [""]
        prefix = f"{self.enhanced} " if self.enhanced else ""
        out = []
        last = len(lines) - 1
        for i, line in enumerate(lines):
            sep = " " if i == last else "-"
            out.append(f"{self.code}{sep}{prefix}{line}\r\n")
        return "".join(out).encode("utf-8")


def reply(code: int, enhanced: str, text: str) -> SMTPReply:
    return SMTPReply(code, enhanced, text)


# 2xx
OK = reply(250, "2.0.0", "Ok")
SENDER_OK = reply(250, "2.1.0", "Ok")
RECIPIENT_OK = reply(250, "2.1.5", "Ok")
RESET_OK = reply(250, "2.0.0", "Ok")
QUEUED = reply(250, "2.0.0", "Ok: queued as {queueId}")
BYE = reply(221, "2.0.0", "Bye")
HELP = reply(
    214,
    "2.0.0",
    "See RFC 5321 and RFC 6409; commands: EHLO HELO STARTTLS AUTH "
    "MAIL RCPT DATA BDAT RSET NOOP QUIT HELP VRFY",
)
VRFY = reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
AUTH_OK = reply(235, "2.7.0", "Authentication successful")
READY_TLS = reply(220, "2.0.0", "Ready to start TLS")
CHUNK_OK = reply(250, "2.0.0", "{size} octets received")

# intermediate (no enhanced code, RFC 2034)
START_DATA = reply(354, "", "End data with <CR><LF>.<CR><LF>")

# 4xx
SHUTDOWN = reply(421, "4.3.2", "Service shutting down, closing connection")
TIMEOUT = reply(421, "4.4.2", "Timeout exceeded, closing connection")
TOO_MANY_ERRORS = reply(421, "4.7.0", "Too many errors, closing connection")
LOCAL_ERROR = reply(451, "4.3.0", "Local error in processing; try again later")
POLICY_ERROR = reply(451, "4.3.0", "Temporary failure checking the request; try again later")
DISK_FULL = reply(452, "4.3.1", "Insufficient system storage; try again later")
TOO_MANY_RECIPIENTS = reply(452, "4.5.3", "Too many recipients")
AUTH_TEMPFAIL = reply(454, "4.7.0", "Temporary authentication failure")

# 5xx: syntax and sequence
UNRECOGNISED = reply(502, "5.5.1", "Command not recognised")
NOT_IMPLEMENTED = reply(502, "5.5.1", "Command not implemented")
SYNTAX = reply(501, "5.5.4", "Syntax error in parameters or arguments")
BAD_COMMAND_BYTES = reply(500, "5.5.2", "Syntax error: command contains invalid characters")
LINE_TOO_LONG = reply(500, "5.5.6", "Line too long")
NEED_HELO = reply(503, "5.5.1", "Send EHLO or HELO first")
NEED_EHLO = reply(503, "5.5.1", "Send EHLO first")
NESTED_MAIL = reply(503, "5.5.1", "Sender already given")
NEED_MAIL = reply(503, "5.5.1", "Send MAIL first")
NEED_RCPT = reply(503, "5.5.1", "Send RCPT first")
DATA_AFTER_BDAT = reply(503, "5.5.1", "DATA not allowed after BDAT; transaction failed")
BINARYMIME_NEEDS_BDAT = reply(503, "5.5.1", "BODY=BINARYMIME needs BDAT, not DATA")
BAD_CHUNK_SIZE = reply(501, "5.5.4", "BDAT needs a chunk size (and LAST); closing connection")
NO_VALID_RECIPIENTS = reply(554, "5.5.1", "No valid recipients")
IN_TRANSACTION = reply(503, "5.5.1", "Not allowed during a mail transaction")
ALREADY_TLS = reply(503, "5.5.1", "TLS already active")
NO_TLS_HERE = reply(502, "5.5.1", "STARTTLS not available")
ALREADY_AUTHENTICATED = reply(503, "5.5.1", "Already authenticated")
UNKNOWN_PARAMETER = reply(555, "5.5.4", "Unsupported parameter: {name}")
BAD_PARAMETER = reply(501, "5.5.4", "Bad value for parameter {name}")
# RFC 3461 parameters: the text is the parser's own words (never the client's).
BAD_DSN_PARAMETER = reply(501, "5.5.4", "{problem}")
HTTP_REFUSED = reply(421, "4.7.0", "This is an SMTP server, not a web server")
REINJECT_REFUSED = reply(554, "5.7.1", "Not allowed to reinject mail from this address")

# 5xx: addresses
BAD_SENDER = reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = reply(501, "5.1.3", "Bad recipient address syntax")
NEED_SMTPUTF8 = reply(553, "5.6.7", "Non-ASCII address requires the SMTPUTF8 parameter")

# 5xx: message
TOO_BIG = reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
BAD_LINE_ENDINGS = reply(
    554,
    "5.6.0",
    "Message contains a bare CR or LF or a NUL; send CRLF line endings only",
)
HEADERS_TOO_BIG = reply(552, "5.3.4", "Message header section too large")
MAIL_LOOP = reply(554, "5.4.6", "Too many Received: headers: mail loop detected")
SESSION_TIMEOUT = reply(421, "4.4.2", "Session time limit exceeded, closing connection")
DATA_LINE_TOO_LONG = reply(554, "5.6.0", "Message has a line longer than {limit} octets")

# 5xx: security
AUTH_REQUIRED = reply(530, "5.7.0", "Authentication required")
# RFC 8689 4.1: REQUIRETLS is offered, and taken, only on a TLS session.
REQUIRETLS_NEEDS_TLS = reply(530, "5.7.10", "REQUIRETLS needs a TLS session: use STARTTLS first")
AUTH_INVALID = reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_CANCELLED = reply(501, "5.7.0", "Authentication cancelled")
AUTH_BAD_BASE64 = reply(501, "5.5.2", "Cannot decode response")
AUTH_UNKNOWN_MECHANISM = reply(504, "5.5.4", "Unrecognised authentication mechanism")
RECIPIENT_DOMAIN_REFUSED = reply(550, "5.7.1", "This account may not send to that recipient domain")
AUTH_NEED_TLS = reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTHZID_REFUSED = reply(535, "5.7.8", "Authentication credentials invalid")
PREAUTH_TIMEOUT = reply(421, "4.7.0", "Authentication required in time, closing connection")
TOO_MANY_JUNK = reply(421, "4.7.0", "Too many commands that do nothing, closing connection")


# -- the limiters (mailgw.limits) ---------------------------------------------

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

# milters ([milter] servers: the milter's own reply when it gives one)
MILTER_REJECT = reply(550, "5.7.1", "Command rejected")
MILTER_REJECT_CONNECT = reply(554, "5.7.1", "Connection rejected")
MILTER_TEMPFAIL = reply(451, "4.7.1", "Service unavailable - try again later")
