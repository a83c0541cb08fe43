"""
Shared set-up for the real-socket tests: a gateway on 127.0.0.1 with a
generated certificate, a passwd file and an on-disk spool.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
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


def shortDirectory(testCase: TestCase) -> Path:
    """A fresh directory with a short path (a UNIX socket path has ~107 octets)."""
    path = Path(tempfile.mkdtemp(prefix="mailgw-"))
    testCase.addCleanup(shutil.rmtree, path, True)
    return path


def makeFixtures(base: Path, spool: Path | None = None, cram: bool = True) -> dict[str, str]:
    base.mkdir(parents=True, exist_ok=True)
    cert, key, passwd = base / "cert.pem", base / "key.pem", base / "passwd"
    makeSelfSigned(str(cert), str(key), "localhost")
    addUser(str(passwd), USER, PASSWORD, cram=cram)
    spool = spool if spool is not None else base / "spool"
    return {"cert": str(cert), "key": str(key), "passwd": str(passwd), "spool": str(spool)}


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
    #: Whether the test user has a CRAM-MD5 secret (``mailgw passwd add --cram``).
    cramSecrets = True

    @inlineCallbacks
    def setUp(self) -> Any:
        self.base = Path(self.mktemp())
        self.files = makeFixtures(self.base, shortDirectory(self) / "spool", self.cramSecrets)
        data: dict[str, Any] = {
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
        for section, values in self.extraConfig.items():
            if section != "server":
                data.setdefault(section, {}).update(values)
        data = self.adjustConfig(data)
        self.config = configFromDict(data, source="test")
        self.service = GatewayService(self.config, reactor)
        self.service.startService()
        ports = yield self.service.whenListening()
        self.submissionPort = ports[0].getHost().port
        self.submissionsPort = ports[1].getHost().port
        self.addCleanup(self.service.stopService)

    def adjustConfig(self, data: dict[str, Any]) -> dict[str, Any]:
        """Subclasses change the configuration here (e.g. to add a relay)."""
        return data

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


def stopProcess(process: subprocess.Popen[Any]) -> None:
    """SIGTERM ``process`` if it still runs; SIGKILL it after 20 s."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def twistdCommand(*args: str) -> list[str]:
    """``twistd`` in the foreground with this Python, then ``args``."""
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", *args]


def spawnTwistd(
    testCase: TestCase, config: Path, log: Path, *options: str
) -> subprocess.Popen[bytes]:
    """
    ``twistd mailgw --config CONFIG`` in the foreground (twistd ``options``
    before ``mailgw``), its output in ``log``, stopped at the test's end.
    """
    with open(log, "wb") as out:
        process = subprocess.Popen(
            twistdCommand(
                "--nodaemon",
                "--pidfile=",
                "--logfile=-",
                *options,
                "mailgw",
                "--config",
                str(config),
            ),  # fmt: skip
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    testCase.addCleanup(stopProcess, process)
    return process


def waitForPort(
    port: int, process: subprocess.Popen[bytes], log: str | None = None, limit: float = 30
) -> None:
    """Wait until ``process`` listens on ``port``; fail with its log if it exits."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process.poll() is not None:
            text = Path(log).read_text(errors="replace") if log else ""
            raise AssertionError(f"twistd exited with {process.returncode}:\n{text}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port} after {limit} s")
