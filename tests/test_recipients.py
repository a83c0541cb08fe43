"""
Tests for L{mailgw.policy.recipients} (which recipient domains a user may
send to) and its configuration, in a session at RCPT.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailgw.config import ConfigError, configFromDict
from mailgw.envelope import Session, splitAddress
from mailgw.interfaces import ISubmissionPolicy
from mailgw.policy import AcceptAll
from mailgw.policy.recipients import RecipientDomainPolicy, domainAllowed
from mailgw.policy.senders import SenderLoginPolicy
from mailgw.replies import SMTPReply
from mailgw.service import makePolicy
from tests.helpers import Harness

ALICE = Session("192.0.2.1", user="alice@example.com")
BOB = Session("192.0.2.1", user="bob@example.com")


class _Refusing(AcceptAll):
    def checkRecipient(self, session: Any, sender: Any, recipient: Any) -> Any:
        return succeed(SMTPReply(550, "5.1.1", "inner says no"))


class PolicyTests(SynchronousTestCase):
    def test_interface(self) -> None:
        self.assertTrue(verifyObject(ISubmissionPolicy, RecipientDomainPolicy(AcceptAll())))

    def test_patterns(self) -> None:
        patterns = ("example.org", ".example.net")
        self.assertTrue(domainAllowed("example.org", patterns))
        self.assertTrue(domainAllowed("EXAMPLE.org", patterns))
        self.assertFalse(domainAllowed("sub.example.org", patterns))
        self.assertTrue(domainAllowed("a.b.example.net", patterns))
        self.assertFalse(domainAllowed("example.net", patterns))
        self.assertFalse(domainAllowed("badexample.net", patterns))
        self.assertFalse(domainAllowed("[192.0.2.1]", patterns))

    def test_perUserReplacesTheGatewayList(self) -> None:
        policy = RecipientDomainPolicy(
            AcceptAll(), ("example.org",), {"alice@example.com": (".partner.example",)}
        )
        rcpt = splitAddress
        self.assertIsNone(policy.checkRecipient(BOB, None, rcpt("x@example.org")))
        refused = policy.checkRecipient(BOB, None, rcpt("x@elsewhere.example"))
        self.assertEqual((refused.code, refused.enhanced), (550, "5.7.1"))
        self.assertIsNone(policy.checkRecipient(ALICE, None, rcpt("x@mx.partner.example")))
        self.assertIsNotNone(policy.checkRecipient(ALICE, None, rcpt("x@example.org")))

    def test_innerFirst(self) -> None:
        policy = RecipientDomainPolicy(_Refusing(), ("example.org",))
        reply = self.successResultOf(
            policy.checkRecipient(BOB, None, splitAddress("x@example.org"))
        )
        self.assertEqual(reply.text, "inner says no")

    def test_emptyAllowsEverything(self) -> None:
        policy = RecipientDomainPolicy(AcceptAll())
        self.assertIsNone(policy.checkRecipient(BOB, None, splitAddress("x@anything.example")))


class ConfigTests(SynchronousTestCase):
    def test_config(self) -> None:
        config = configFromDict(
            {
                "policy": {
                    "allowed_recipient_domains": ["Example.ORG", ".bücher.example"],
                    "recipient_domains": {"Alice@Example.com": ["partner.example"]},
                }
            }
        )
        self.assertEqual(
            config.policy.allowedRecipientDomains, ("example.org", ".xn--bcher-kva.example")
        )
        self.assertEqual(
            dict(config.policy.recipientDomains), {"alice@example.com": ("partner.example",)}
        )
        policy = makePolicy(config, Clock())
        self.assertIsInstance(policy, RecipientDomainPolicy)
        self.assertIsInstance(policy.inner, SenderLoginPolicy)
        self.assertIsInstance(makePolicy(configFromDict({}), Clock()), SenderLoginPolicy)

    def test_badPattern(self) -> None:
        data = {"policy": {"allowed_recipient_domains": ["exa mple.org"]}}
        e = self.assertRaises(ConfigError, configFromDict, data)
        self.assertEqual(e.key, "policy.allowed_recipient_domains")
        data = {"policy": {"recipient_domains": {"a@b.example": "notalist"}}}
        self.assertRaises(ConfigError, configFromDict, data)


class SessionTests(SynchronousTestCase):
    """At RCPT, in a session: 550 5.7.1 with a clear text; others accepted."""

    def test_rcpt(self) -> None:
        harness = Harness()
        harness.factory.policy = RecipientDomainPolicy(
            AcceptAll(), perUser={"alice@example.com": ("example.org",)}
        )
        harness.login()
        self.assertTrue(harness.command(b"MAIL FROM:<alice@example.com>").startswith(b"250"))
        self.assertEqual(
            harness.command(b"RCPT TO:<bob@elsewhere.example>"),
            b"550 5.7.1 This account may not send to that recipient domain\r\n",
        )
        self.assertTrue(harness.command(b"RCPT TO:<bob@example.org>").startswith(b"250"))
