"""
What the relay client does with TLS beyond starting it: the check of the
upstream once the handshake is done (RelaySettings.peerCheck), which says
whether TLS authenticated the upstream, and the plain-text settings of the
``may`` level's second try.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.logger import Logger

from mailgw.config import TLSMode
from mailgw.relay.clientreplies import RelayError
from mailgw.relay.clientsettings import RelaySettings

__all__ = ["checkPeer", "withoutTLS"]

log = Logger()


def checkPeer(settings: RelaySettings, transport: Any) -> bool:
    """
    Run ``settings.peerCheck`` on the TLS connection of ``transport``.

    @return: whether TLS authenticated the upstream: the creator did
        (``tlsVerifies``) or the check passed.
    @raise RelayError: the check failed and is enforced (transient).
    """
    check = settings.peerCheck
    if check is None:
        return settings.tlsVerifies
    problem = check.check(transport.getHandle())
    if problem is None:
        return True
    if check.report is not None:
        check.report(problem.resultType)
    if check.enforce:
        raise RelayError(f"TLS peer check failed: {problem.text}", polite=True)
    log.info(
        "TLS peer check of {remote} failed, delivering anyway (policy in testing mode): {why}",
        remote=settings.hostname,
        why=problem.text,
    )
    return False


def withoutTLS(settings: RelaySettings) -> RelaySettings:
    """``settings`` for the plain-text try after a failed handshake (level may)."""
    return attrs.evolve(
        settings,
        tlsMode=TLSMode.NONE,
        tlsCreator=None,
        peerCheck=None,
        tlsVerifies=False,
        plaintextFallback=False,
    )
