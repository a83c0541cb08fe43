"""
Abuse resistance as pure, clock-driven logic: each limiter reads the time
from an L{IReactorTime} and returns a decision; none does I/O or schedules
anything, so the server protocol decides what to send and when.

  - L{AuthThrottle}: AUTH failure budgets, delays, caps on verifications
    in flight and trust (auth.py); each attempt it lets through is an
    L{AuthAttempt} whose outcome the server reports;
  - L{ConnectionLimiter}: connections in total, per address and per minute,
    the last refunded once a connection authenticates (connections.py);
  - L{SubmissionQuota}: messages and recipients per user (quota.py).

Settings come from L{mailgw.config.LimitsConfig} (the ``[limits]`` section);
docs/security.md describes every defence.
"""

from mailgw.limits._counters import DEFAULT_MAX_KEYS, Client, client
from mailgw.limits.auth import AuthAttempt, AuthDecision, AuthThrottle
from mailgw.limits.authlog import accountKey, formatLogLine
from mailgw.limits.connections import ConnectionLimiter
from mailgw.limits.quota import SubmissionQuota
from mailgw.replies import (
    AUTH_BUSY,
    AUTH_THROTTLED,
    AUTH_THROTTLED_CLOSE,
    MESSAGE_RATE,
    RECIPIENT_RATE,
    TOO_MANY_CONNECTIONS,
    TOO_MANY_FROM_ADDRESS,
)

__all__ = [
    "AUTH_BUSY",
    "AUTH_THROTTLED",
    "AUTH_THROTTLED_CLOSE",
    "DEFAULT_MAX_KEYS",
    "MESSAGE_RATE",
    "RECIPIENT_RATE",
    "TOO_MANY_CONNECTIONS",
    "TOO_MANY_FROM_ADDRESS",
    "AuthAttempt",
    "AuthDecision",
    "AuthThrottle",
    "Client",
    "ConnectionLimiter",
    "SubmissionQuota",
    "accountKey",
    "client",
    "formatLogLine",
]
