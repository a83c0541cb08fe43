"""
``[server] accept_bare_lf`` in a session: an authenticated client's bare-LF
lines are stored as CRLF lines, only CRLF "." CRLF ends the data, and the
option is off by default (the message is refused whole, as before).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mailgw.config import ConfigError, configFromDict
from mailgw.service import serverSettings
from tests.helpers import Harness

# An LF file with a line "." and what looks like a second transaction in it.
SMUGGLE = b"Subject: x\n\nhello\n.\nMAIL FROM:<evil@b.c>\nRCPT TO:<victim@x.y>\nDATA\n..dot\n"


def transaction(h: Harness) -> None:
    h.login()
    assert h.command(b"MAIL FROM:<a@b.c>").startswith(b"250 ")
    assert h.command(b"RCPT TO:<d@e.f>").startswith(b"250 ")
    assert h.command(b"DATA").startswith(b"354 ")


class SessionTests(SynchronousTestCase):
    def test_convertedWhenOn(self) -> None:
        for split in (None, 1, 5):
            h = Harness(acceptBareLF=True)
            transaction(h)
            wire = SMUGGLE + b"\r\n.\r\nNOOP\r\n"
            chunks = (
                [wire]
                if split is None
                else [wire[i : i + split] for i in range(0, len(wire), split)]
            )
            for chunk in chunks:
                h.send(chunk)
            replies = h.take().split(b"\r\n")
            self.assertTrue(replies[0].startswith(b"250 2.0.0"), replies)
            self.assertTrue(replies[1].startswith(b"250 2.0.0 Ok"), replies)
            [(message, data)] = h.spool.committed.values()
            body = data[data.index(b"Subject: x") :]
            self.assertEqual(
                body,
                b"Subject: x\r\n\r\nhello\r\n.\r\nMAIL FROM:<evil@b.c>\r\n"
                b"RCPT TO:<victim@x.y>\r\nDATA\r\n..dot\r\n\r\n",
            )
            self.assertEqual([str(r) for r in message.envelope.recipients], ["d@e.f"])

    def test_refusedByDefault(self) -> None:
        h = Harness()
        transaction(h)
        h.send(SMUGGLE + b"\r\n.\r\n")
        self.assertTrue(h.take().startswith(b"554 5.6.0"))
        self.assertEqual(h.spool.committed, {})
        self.assertTrue(h.command(b"NOOP").startswith(b"250 "))

    def test_bareCRStillRefused(self) -> None:
        h = Harness(acceptBareLF=True)
        transaction(h)
        h.send(b"Subject: x\n\nhello\r.\r\n.\r\n")
        self.assertTrue(h.take().startswith(b"554 5.6.0"))
        self.assertEqual(h.spool.committed, {})


class ConfigTests(SynchronousTestCase):
    def test_setting(self) -> None:
        base = {"server": {"hostname": "mx.test"}}
        self.assertFalse(serverSettings(configFromDict(base, source="t")).acceptBareLF)
        on = {"server": {"hostname": "mx.test", "accept_bare_lf": True}}
        self.assertTrue(serverSettings(configFromDict(on, source="t")).acceptBareLF)
        bad = {"server": {"hostname": "mx.test", "accept_bare_lf": "yes"}}
        error = self.assertRaises(ConfigError, configFromDict, bad, source="t")
        self.assertIn("accept_bare_lf", str(error))
