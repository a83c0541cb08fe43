"""
The shipped systemd units: ``systemd-analyze verify`` finds nothing to say
about them (when it is installed), and a socket handed over as systemd does
for mailgw-submission.socket (named by its FileDescriptorName=) is found by a
``systemd:...:name=`` endpoint and serves mail.
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from mailgw.auth.passwd import addUser
from mailgw.queue.spool import SpoolReader
from mailgw.tls import makeSelfSigned
from tests.integration.support import (
    PASSWORD,
    ROOT,
    USER,
    clientContext,
    run,
    shortDirectory,
    stopProcess,
)
from tests.integration.test_twistd import environment, twistdCommand

ETC = ROOT / "etc"
UNITS = ["mailgw.service", "mailgw-submission.socket", "mailgw-submissions.socket"]


def directive(unit: str, name: str) -> list[str]:
    text = (ETC / unit).read_text()
    return re.findall(rf"^{name}=(.*)$", text, re.MULTILINE)


class UnitFileTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_verify(self) -> Any:
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise SkipTest("systemd-analyze is not installed (apt-get install systemd)")
        units = shortDirectory(self)
        bindir = Path(sys.executable).parent
        for unit in UNITS:
            text = (ETC / unit).read_text()
            # As the unit's comment says for a virtualenv: absolute paths.
            for command in ("mailgw", "twistd"):
                text = re.sub(
                    rf"^(Exec\w+=){command} ", rf"\g<1>{bindir / command} ", text, flags=re.M
                )
            (units / unit).write_text(text)
        result = yield run(analyze, "verify", *(str(units / u) for u in UNITS), timeout=120)
        output = (result.stdout + result.stderr).strip()
        self.assertEqual((result.returncode, output), (0, ""))

    def test_directives(self) -> None:
        """What the docs promise the unit does."""
        self.assertEqual(directive("mailgw.service", "ExecReload")[-1], "kill -HUP $MAINPID")
        self.assertEqual(directive("mailgw.service", "StateDirectory"), ["mailgw"])
        self.assertEqual(directive("mailgw.service", "RuntimeDirectory"), ["mailgw"])
        self.assertTrue(directive("mailgw.service", "LimitNOFILE"))
        for name in ("submission", "submissions"):
            unit = f"mailgw-{name}.socket"
            self.assertEqual(directive(unit, "FileDescriptorName"), [name])
            self.assertEqual(directive(unit, "Service"), ["mailgw.service"])


class SocketActivationTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_namedSocket(self) -> Any:
        """
        twistd mailgw adopts the socket systemd passes as fd 3 with the name
        of mailgw-submission.socket's FileDescriptorName=, and serves on it.
        """
        [name] = directive("mailgw-submission.socket", "FileDescriptorName")
        base = shortDirectory(self)
        cert, key, passwd = str(base / "cert.pem"), str(base / "key.pem"), str(base / "passwd")
        makeSelfSigned(cert, key, "localhost")
        addUser(passwd, USER, PASSWORD)
        config = base / "mailgw.toml"
        config.write_text(
            f"""
[server]
hostname = "localhost"
submission = ["systemd:domain=INET:name={name}"]
[tls]
certificate = "{cert}"
key = "{key}"
[auth]
backends = ["passwd:{passwd}"]
[spool]
directory = "{base}/spool"
"""
        )
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]

        env = environment()
        env.update(LISTEN_FDS="1", LISTEN_FDNAMES=name)

        def asSystemd() -> None:
            os.dup2(listener.fileno(), 3)

        log = open(base / "twistd.log", "wb")
        self.addCleanup(log.close)
        process = subprocess.Popen(
            # LISTEN_PID must be the pid of the process that adopts the socket.
            ["/bin/sh", "-c", 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"', "sh"]
            + twistdCommand("--config", str(config)),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=asSystemd,
            pass_fds=(3,),
        )

        self.addCleanup(stopProcess, process)
        listener.close()  # only the gateway holds it now

        def submit() -> None:
            with smtplib.SMTP("localhost", port, timeout=30) as smtp:
                smtp.starttls(context=clientContext(cert))
                smtp.login(USER, PASSWORD)
                smtp.sendmail(USER, ["bob@example.org"], b"Subject: fd 3\r\n\r\nhi\r\n")

        try:
            yield deferToThread(submit)
        except Exception:
            log.flush()
            self.fail((base / "twistd.log").read_text())
        self.assertEqual(len(SpoolReader(str(base / "spool")).pending()), 1)
