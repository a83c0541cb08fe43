"""
``mailgw reload`` against a running ``twistd mailgw``: the certificate
replaced on disk is served to new sessions after the command, as after
SIGHUP; a broken configuration is refused, the command says so (exit 1) and
the gateway keeps serving. And the control socket's ``reload`` in process.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mailgw.auth.passwd import addUser
from mailgw.control import sendCommand
from mailgw.tls import makeSelfSigned
from tests.integration.support import (
    PASSWORD,
    USER,
    GatewayTestCase,
    freePort,
    run,
    shortDirectory,
    spawnTwistd,
    waitForPort,
)
from tests.integration.test_reload import fileDER, replaceCertificate, served


class ControlReloadTests(GatewayTestCase):
    @inlineCallbacks
    def test_reloadOverTheSocket(self) -> Any:
        path = f"{self.files['spool']}/control.sock"
        before = yield deferToThread(served, self.submissionsPort, False)
        replaceCertificate(self.base, self.files["cert"], self.files["key"])
        answer = yield deferToThread(sendCommand, path, "reload")
        self.assertEqual(answer, {"ok": True, "count": 0})
        after = yield deferToThread(served, self.submissionsPort, False)
        self.assertNotEqual(after, before)
        self.assertEqual(after, fileDER(self.files["cert"]))

    @inlineCallbacks
    def test_refusedIsReported(self) -> Any:
        path = f"{self.files['spool']}/control.sock"
        self.service.reloader = lambda: False
        answer = yield deferToThread(sendCommand, path, "reload")
        self.assertFalse(answer["ok"])
        self.assertIn("reload refused", answer["error"])


class ReloadCommandTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_mailgwReload(self) -> Any:
        base = shortDirectory(self)
        cert, key, passwd = str(base / "cert.pem"), str(base / "key.pem"), str(base / "passwd")
        makeSelfSigned(cert, key, "localhost")
        addUser(passwd, USER, PASSWORD)
        port = freePort()
        config = base / "mailgw.toml"
        config.write_text(
            f"""
[server]
hostname = "localhost"
submissions = ["tcp:port={port}:interface=127.0.0.1"]
[tls]
certificate = "{cert}"
key = "{key}"
[auth]
backends = ["passwd:{passwd}"]
[spool]
directory = "{base}/spool"
"""
        )
        log = base / "twistd.log"
        process = spawnTwistd(self, config, log)
        yield deferToThread(waitForPort, port, process, str(log))
        replaceCertificate(base, cert, key)
        new = fileDER(cert)
        command = [sys.executable, "-m", "mailgw", "reload", "--config", str(config)]
        result = yield run(*command)
        self.assertEqual((result.returncode, result.stdout), (0, "reloaded\n"), result.stderr)
        after = yield deferToThread(served, port, False)
        self.assertEqual(after, new, log.read_text())
        self.assertIn("Reloaded the configuration", log.read_text())

        # The file is read again, as on SIGHUP: a broken one is refused.
        config.write_text(
            config.read_text().replace("[server]", '[server]\nmax_recipients = "ten"')
        )
        result = yield run(*command)
        self.assertEqual(result.returncode, 1)
        self.assertIn("reload refused", result.stderr)
        self.assertIn("max_recipients", log.read_text())
        self.assertIsNone(process.poll())
        again = yield deferToThread(served, port, False)
        self.assertEqual(again, new)
