"""
What one step of the AUTH phase asks the session to do (L{AuthStep}): answer
now, send a challenge, close, or wait for an outcome (L{LoginOutcome}).
"""

from __future__ import annotations

import attrs
from twisted.internet.defer import Deferred

from mailgw.replies import SMTPReply

__all__ = ["AuthStep", "ChallengeLine", "CloseWith", "LoginOutcome", "ServerFinal", "asOutcome"]


@attrs.frozen
class ChallengeLine:
    """Send this 334 line and read the client's response."""

    line: bytes


@attrs.frozen
class CloseWith:
    """Send ``reply`` and close the connection."""

    reply: SMTPReply


@attrs.frozen
class ServerFinal:
    """A login succeeded; the client acknowledges the server's final data, then gets ``outcome``."""

    outcome: LoginOutcome


@attrs.frozen
class LoginOutcome:
    """
    The answer to a completed exchange; ``user`` is set when it succeeded;
    ``close``: send ``reply`` and close (the throttle's verdict).
    """

    reply: SMTPReply
    user: str | None = None
    close: bool = False


# What one step of AUTH asks the session to do: answer now, send a
# challenge, close, or wait for the portal's answer.
AuthStep = SMTPReply | ChallengeLine | CloseWith | Deferred[LoginOutcome]


def asOutcome(step: AuthStep) -> LoginOutcome | Deferred[LoginOutcome]:
    """An L{AuthStep} where only an outcome can go (mid-exchange, after a lookup)."""
    if isinstance(step, SMTPReply):
        return LoginOutcome(step)
    if isinstance(step, CloseWith):
        return LoginOutcome(step.reply, close=True)
    if isinstance(step, ChallengeLine):
        raise AssertionError("a relayed step answers in a Deferred")
    return step
