"""
The relay client and DSN (RFC 3461 5.2) and REQUIRETLS (RFC 8689 4.2.1):
the requests travel on when the upstream offers DSN, and only then; a
REQUIRETLS message goes only over verified TLS to an upstream that offers
REQUIRETLS, and is refused permanently (5.7.30) otherwise.
"""

from __future__ import annotations

import os
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailgw.config import TLSMode
from mailgw.dsnparams import NO_DSN, Notify, RecipientDSN, Ret
from mailgw.envelope import QueuedMessage
from mailgw.relay.client import RelaySettings, deliverBatch
from tests.test_relay_client import Dialog, makeMessage, opener, settingsFor
from tests.upstream import makeTLSFiles, startUpstream

S, F, D, N = Notify.SUCCESS, Notify.FAILURE, Notify.DELAY, Notify.NEVER


def dsnMessage(requireTLS: bool = False, **kw: Any) -> QueuedMessage:
    message = makeMessage(recipients=["bob@example.net", "carol@example.org"], **kw)
    envelope = attrs.evolve(
        message.envelope,
        ret=Ret.HDRS,
        envid="QQ 3+1",
        requireTLS=requireTLS,
        dsn=(RecipientDSN(frozenset({S, F}), ("rfc822", "b+x@example.net")), NO_DSN),
    )
    return attrs.evolve(message, envelope=envelope)


class ParametersDialogTests(SynchronousTestCase):
    def test_passedWhenDSNOffered(self) -> None:
        d = Dialog(self, settingsFor(), [dsnMessage()])
        d.hello(["PIPELINING", "DSN"])
        self.assertEqual(
            d.client(),
            b"MAIL FROM:<alice@example.com> RET=HDRS ENVID=QQ+203+2B1\r\n"
            b"RCPT TO:<bob@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+2Bx@example.net\r\n"
            b"RCPT TO:<carol@example.org>\r\n"
            b"DATA\r\n",
        )
        d.server(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        d.pumpBody()
        d.client()
        d.server(b"250 2.0.0 queued\r\n")
        [results] = d.quit()
        self.assertEqual([(r.success, r.dsnPassed) for r in results], [(True, True)] * 2)

    def test_notPassedWithoutDSN(self) -> None:
        d = Dialog(self, settingsFor(), [dsnMessage()])
        d.hello(["PIPELINING"])
        self.assertEqual(
            d.client(),
            b"MAIL FROM:<alice@example.com>\r\n"
            b"RCPT TO:<bob@example.net>\r\nRCPT TO:<carol@example.org>\r\nDATA\r\n",
        )
        d.server(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        d.pumpBody()
        d.client()
        d.server(b"250 2.0.0 queued\r\n")
        [results] = d.quit()
        self.assertEqual([(r.success, r.dsnPassed) for r in results], [(True, False)] * 2)

    def test_neverPassedOn(self) -> None:
        message = makeMessage()
        envelope = attrs.evolve(message.envelope, dsn=(RecipientDSN(frozenset({N})),))
        d = Dialog(self, settingsFor(), [attrs.evolve(message, envelope=envelope)])
        d.hello(["DSN"])
        d.expect(b"MAIL FROM:<alice@example.com>\r\n")
        d.server(b"250 ok\r\n")
        d.expect(b"RCPT TO:<bob@example.net> NOTIFY=NEVER\r\n")

    def test_requireTLSWithoutTLSRefused(self) -> None:
        """No TLS at all (mode none): 550 5.7.30 for every recipient, no MAIL sent."""
        d = Dialog(self, settingsFor(), [dsnMessage(requireTLS=True)])
        d.hello(["PIPELINING", "DSN", "REQUIRETLS"])
        [results] = d.quit()
        self.assertEqual(
            [(r.permanent, r.code, r.enhanced) for r in results], [(True, 550, "5.7.30")] * 2
        )
        self.assertIn("REQUIRETLS support required", results[0].text)
        self.assertIn("verified certificate", results[0].text)

    def test_requireTLSOpportunisticNotOffered(self) -> None:
        """Opportunistic TLS that the upstream does not offer: refused, never sent in clear."""
        d = Dialog(self, settingsFor(TLSMode.OPPORTUNISTIC), [dsnMessage(requireTLS=True)])
        d.hello(["PIPELINING", "REQUIRETLS"])
        [results] = d.quit()
        self.assertEqual({(r.permanent, r.enhanced) for r in results}, {(True, "5.7.30")})


class LoopbackTests(TestCase):
    """Real sessions over 127.0.0.1 with the recording upstream."""

    timeout = 60

    def setUp(self) -> None:
        self.tlsFiles = makeTLSFiles(os.path.join(self.mktemp(), "good"))

    @inlineCallbacks
    def upstream(self, **knobs: Any) -> Any:
        upstream = yield startUpstream(reactor, **knobs)
        self.addCleanup(upstream.stop)
        return upstream

    def deliver(self, upstream: Any, mode: TLSMode, message: QueuedMessage) -> Any:
        kw: dict[str, Any] = {}
        if mode is not TLSMode.NONE:
            kw["tlsCreator"] = self.tlsFiles.clientCreator("localhost")
        settings = RelaySettings("localhost", "gw.example.com", mode, **kw)
        body = opener({message.queueId: b"Subject: hi\r\n\r\nHello.\r\n"})
        return deliverBatch(reactor, upstream.endpoint(reactor), settings, [(message, body)])

    def rcptLines(self, upstream: Any) -> list[bytes]:
        return [line for line in upstream.commandLines() if line.startswith(b"RCPT")]

    @inlineCallbacks
    def test_upstreamWithDSN(self) -> Any:
        upstream = yield self.upstream(dsn=True)
        [results] = yield self.deliver(upstream, TLSMode.NONE, dsnMessage())
        self.assertTrue(all(r.success and r.dsnPassed for r in results), results)
        [received] = upstream.transactions
        self.assertEqual(received.mailParams, ("RET=HDRS", "ENVID=QQ+203+2B1"))
        self.assertEqual(
            self.rcptLines(upstream),
            [
                b"RCPT TO:<bob@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+2Bx@example.net",
                b"RCPT TO:<carol@example.org>",
            ],
        )

    @inlineCallbacks
    def test_upstreamWithoutDSN(self) -> Any:
        upstream = yield self.upstream()
        [results] = yield self.deliver(upstream, TLSMode.NONE, dsnMessage())
        self.assertTrue(all(r.success and not r.dsnPassed for r in results), results)
        [received] = upstream.transactions
        self.assertEqual(received.mailParams, ())
        self.assertEqual(
            self.rcptLines(upstream), [b"RCPT TO:<bob@example.net>", b"RCPT TO:<carol@example.org>"]
        )

    @inlineCallbacks
    def test_requireTLSOverVerifiedTLS(self) -> Any:
        upstream = yield self.upstream(
            tlsOptions=self.tlsFiles.serverOptions(), requireTLS=True, dsn=True
        )
        [results] = yield self.deliver(upstream, TLSMode.STARTTLS, dsnMessage(requireTLS=True))
        self.assertTrue(all(r.success for r in results), results)
        [received] = upstream.transactions
        self.assertTrue(received.tls)
        self.assertIn("REQUIRETLS", received.mailParams)

    @inlineCallbacks
    def test_requireTLSUpstreamWithoutIt(self) -> Any:
        """Verified TLS, but the upstream does not offer REQUIRETLS: 5.7.30, no MAIL."""
        upstream = yield self.upstream(tlsOptions=self.tlsFiles.serverOptions())
        [results] = yield self.deliver(upstream, TLSMode.STARTTLS, dsnMessage(requireTLS=True))
        self.assertEqual(
            {(r.permanent, r.code, r.enhanced) for r in results}, {(True, 550, "5.7.30")}
        )
        self.assertIn("does not offer REQUIRETLS", results[0].text)
        self.assertFalse(any(line.startswith(b"MAIL") for line in upstream.commandLines()))

    @inlineCallbacks
    def test_requireTLSWithoutTLS(self) -> Any:
        """The relay's TLS is off: never sent, whatever the upstream offers."""
        upstream = yield self.upstream(requireTLS=True, dsn=True)
        [results] = yield self.deliver(upstream, TLSMode.NONE, dsnMessage(requireTLS=True))
        self.assertEqual({(r.permanent, r.enhanced) for r in results}, {(True, "5.7.30")})
        self.assertEqual(upstream.transactions, [])
        self.assertFalse(any(line.startswith(b"MAIL") for line in upstream.commandLines()))

    @inlineCallbacks
    def test_plainMessageUnchanged(self) -> Any:
        """A message without DSN parameters or REQUIRETLS: no new parameters."""
        upstream = yield self.upstream(dsn=True)
        [[result]] = yield self.deliver(upstream, TLSMode.NONE, makeMessage())
        self.assertTrue(result.success)
        self.assertEqual(upstream.transactions[0].mailParams, ())
        self.assertEqual(self.rcptLines(upstream), [b"RCPT TO:<bob@example.net>"])
