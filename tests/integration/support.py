"""
Shared set-up for the real-socket tests: a gateway on 127.0.0.1 with a
generated certificate, a passwd file and an on-disk spool.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mailgw.auth.passwd import addUser
from mailgw.config import configFromDict
from mailgw.queue.spool import SpoolReader
from mailgw.service import GatewayService
from mailgw.tls import makeSelfSigned

USER = "alice@example.com"
PASSWORD = "correct horse battery"
ROOT = Path(__file__).resolve().parents[2]


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clientContext(cafile: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=cafile)
    context.check_hostname = True
    return context


def makeFixtures(base: Path) -> dict[str, str]:
    base.mkdir(parents=True, exist_ok=True)
    cert, key, passwd = base / "cert.pem", base / "key.pem", base / "passwd"
    makeSelfSigned(str(cert), str(key), "localhost")
    addUser(str(passwd), USER, PASSWORD, cram=True)
    return {"cert": str(cert), "key": str(key), "passwd": str(passwd), "spool": str(base / "spool")}


def run(
    *argv: str, timeout: float = 60, **kwargs: Any
) -> Deferred[subprocess.CompletedProcess[str]]:
    """Run a command in a thread (the reactor keeps serving) and capture its output."""
    return deferToThread(
        subprocess.run, list(argv), capture_output=True, text=True, timeout=timeout, **kwargs
    )


class GatewayTestCase(TestCase):
    """Starts a GatewayService on two loopback ports for each test."""

    timeout = 60
    extraConfig: dict[str, Any] = {}

    @inlineCallbacks
    def setUp(self) -> Any:
        self.base = Path(self.mktemp())
        self.files = makeFixtures(self.base)
        data = {
            "server": {
                "hostname": "localhost",
                "submission": ["tcp:0:interface=127.0.0.1"],
                "submissions": ["tcp:0:interface=127.0.0.1"],
                **self.extraConfig.get("server", {}),
            },
            "tls": {"certificate": self.files["cert"], "key": self.files["key"]},
            "auth": {"backends": [f"passwd:{self.files['passwd']}"]},
            "spool": {"directory": self.files["spool"]},
        }
        self.config = configFromDict(data, source="test")
        self.service = GatewayService(self.config, reactor)
        self.service.startService()
        ports = yield self.service.whenListening()
        self.submissionPort = ports[0].getHost().port
        self.submissionsPort = ports[1].getHost().port
        self.addCleanup(self.service.stopService)

    def spooled(self) -> list[Any]:
        """The messages in the spool, read from disk by a fresh Spool."""
        return SpoolReader(self.files["spool"]).pending()

    def spooledBytes(self, queueId: str) -> bytes:
        with SpoolReader(self.files["spool"]).openMessage(queueId) as f:
            return f.read()


def haveCommand(name: str) -> bool:
    return any(
        os.access(os.path.join(d, name), os.X_OK) for d in os.environ.get("PATH", "").split(":")
    )
