"""
The default connection limits against a Postfix relayhost's burst: each of
its 20 parallel deliveries (``default_destination_concurrency_limit``)
opens a new TLS and AUTH session per message and, not waiting for the
answer to QUIT (``smtp_skip_quit_response = yes``), opens the next one
before the gateway has seen the last one close.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailgw.config import LimitsConfig
from mailgw.limits import TOO_MANY_FROM_ADDRESS, ConnectionLimiter

POSTFIX_CONCURRENCY = 20
ADDRESS = "192.0.2.25"


class PostfixBurstTests(SynchronousTestCase):
    def test_overlappingSessionsAccepted(self) -> None:
        """
        100 messages, each process's next connection counted before its
        previous one is closed: none refused with the defaults.
        """
        clock = Clock()
        limiter = ConnectionLimiter(clock, LimitsConfig())
        previous: list[bool] = [False] * POSTFIX_CONCURRENCY
        sent = 0
        while sent < 100:
            for process in range(POSTFIX_CONCURRENCY):
                self.assertIsNone(limiter.open(ADDRESS), (sent, limiter.openFrom(ADDRESS)))
                limiter.authenticated(ADDRESS)
                if previous[process]:
                    # The gateway sees the last one go only now.
                    limiter.close(ADDRESS, authenticated=True)
                previous[process] = True
                sent += 1
                clock.advance(0.01)
        # Logged-in sessions leave the address's count; the total holds them.
        self.assertEqual(limiter.openFrom(ADDRESS), 0)
        self.assertEqual(limiter.openConnections, POSTFIX_CONCURRENCY)

    def test_unauthenticatedFloodStillRefused(self) -> None:
        """Connections that never log in still meet the per-address limits."""
        limiter = ConnectionLimiter(Clock(), LimitsConfig())
        replies = [limiter.open(ADDRESS) for _ in range(200)]
        accepted = replies.count(None)
        self.assertLessEqual(accepted, LimitsConfig().maxConnectionsPerAddress)
        self.assertEqual(set(replies[accepted:]), {TOO_MANY_FROM_ADDRESS})
