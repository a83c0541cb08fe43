"""
The embedding example in docs/examples/embedded.py, run as a user would.
"""

from __future__ import annotations

import importlib.util
import smtplib
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mailgw.queue.spool import SpoolReader
from tests.integration.support import ROOT, clientContext

EXAMPLE = ROOT / "docs" / "examples" / "embedded.py"


def loadExample() -> Any:
    spec = importlib.util.spec_from_file_location("embedded_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class EmbeddingTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_example(self) -> Any:
        example = loadExample()
        directory = self.mktemp()
        application = MultiService()
        gateway = example.buildGateway(reactor, directory, port=0)
        gateway.setServiceParent(application)
        application.startService()
        self.addCleanup(application.stopService)
        [port] = yield gateway.whenListening()

        def submit() -> None:
            with smtplib.SMTP("localhost", port.getHost().port, timeout=30) as smtp:
                smtp.starttls(context=clientContext(f"{directory}/cert.pem"))
                smtp.login("app@example.com", "app-secret")
                smtp.sendmail("app@example.com", ["x@example.org"], b"Subject: e\r\n\r\nx\r\n")

        yield deferToThread(submit)
        [queued] = SpoolReader(f"{directory}/spool").pending()
        self.assertEqual(queued.session.user, "app@example.com")
