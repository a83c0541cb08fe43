"""
The service-extension parameters of MAIL and RCPT beyond the basics that
L{mailgw.server.transaction} reads itself: DSN (RFC 3461: RET, ENVID,
NOTIFY, ORCPT) and REQUIRETLS (RFC 8689). Each turns into a value of the
envelope, or into the reply that refuses it.
"""

from __future__ import annotations

import attrs

from mailgw import replies
from mailgw.dsnparams import (
    NO_DSN,
    DSNParameterError,
    RecipientDSN,
    Ret,
    parseEnvid,
    parseNotify,
    parseORCPT,
    parseRet,
)
from mailgw.replies import SMTPReply

#: The MAIL parameters L{MailOptions.take} reads.
MAIL_PARAMETERS = frozenset(["RET", "ENVID", "REQUIRETLS"])

#: The EHLO keywords for these extensions: DSN always, REQUIRETLS only under TLS.
DSN_KEYWORD = "DSN"
REQUIRETLS_KEYWORD = "REQUIRETLS"


def _refuse(error: DSNParameterError) -> SMTPReply:
    return replies.BAD_DSN_PARAMETER.withText(str(error))


@attrs.define
class MailOptions:
    """The DSN and REQUIRETLS parameters of one MAIL command."""

    ret: Ret | None = None
    envid: str | None = None
    requireTLS: bool = False

    def take(self, name: str, value: str | None, tls: bool) -> SMTPReply | None:
        """
        Read parameter ``name`` (one of L{MAIL_PARAMETERS}, upper case) on
        a session with TLS or not: None when taken, else the refusal.
        """
        try:
            if name == "RET":
                self.ret = parseRet(value)
            elif name == "ENVID":
                self.envid = parseEnvid(value)
            elif value is not None:
                return replies.BAD_PARAMETER.withText(replies.BAD_PARAMETER.text.format(name=name))
            elif not tls:
                return replies.REQUIRETLS_NEEDS_TLS
            else:
                self.requireTLS = True
        except DSNParameterError as e:
            return _refuse(e)
        return None


def recipientDSN(parameters: dict[str, str | None]) -> RecipientDSN | SMTPReply:
    """
    The DSN requests among a RCPT command's ``parameters`` (upper-case
    keywords; each given once, L{splitPathAndParameters} refused repeats),
    or the reply that refuses the first bad or unknown one.
    """
    notify, orcpt = None, None
    for name, value in parameters.items():
        try:
            if name == "NOTIFY":
                notify = parseNotify(value)
            elif name == "ORCPT":
                orcpt = parseORCPT(value)
            else:
                return replies.UNKNOWN_PARAMETER.withText(
                    replies.UNKNOWN_PARAMETER.text.format(name=name)
                )
        except DSNParameterError as e:
            return _refuse(e)
    if notify is None and orcpt is None:
        return NO_DSN
    return RecipientDSN(notify, orcpt)
