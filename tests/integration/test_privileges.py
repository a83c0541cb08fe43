"""
``twistd -u nobody -g nogroup``: twistd binds as root, then becomes nobody.
The spool tree and the control socket must then belong to nobody, and a
submission must be queued by the unprivileged process. Root only.
"""

from __future__ import annotations

import os
import smtplib
import time
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
    USER,
    clientContext,
    freePort,
    shortDirectory,
    spawnTwistd,
    waitForPort,
)

NOBODY = 65534


class DroppedPrivilegesTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        if os.getuid() != 0:
            raise SkipTest("needs root: twistd -u/-g changes user")

    @inlineCallbacks
    def test_spoolAndControlSocketOwned(self) -> Any:
        base = shortDirectory(self)
        os.chmod(base, 0o755)  # nobody must reach the spool under it
        cert, key, passwd = str(base / "cert.pem"), str(base / "key.pem"), str(base / "passwd")
        makeSelfSigned(cert, key, "localhost")
        addUser(passwd, USER, PASSWORD)
        os.chown(passwd, 0, NOBODY)  # root:nogroup 0640, the usual way
        os.chmod(passwd, 0o640)
        spool = base / "spool"
        # A spool left from a run as root: its files too go to the service user.
        spool.mkdir(mode=0o700)
        (spool / "tmp").mkdir(mode=0o700)
        port = freePort()
        config = base / "mailgw.toml"
        config.write_text(
            f"""
[server]
hostname = "localhost"
submission = ["tcp:port={port}:interface=127.0.0.1"]
[tls]
certificate = "{cert}"
key = "{key}"
[auth]
backends = ["passwd:{passwd}"]
[spool]
directory = "{spool}"
"""
        )
        log = base / "twistd.log"
        process = spawnTwistd(self, config, log, f"--uid={NOBODY}", f"--gid={NOBODY}")
        yield deferToThread(waitForPort, port, process, str(log))
        socketPath = spool / "control.sock"

        def waitForSocket() -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not socketPath.exists():
                time.sleep(0.05)

        yield deferToThread(waitForSocket)
        text = log.read_text(errors="replace")
        self.assertIn(f"set uid/gid {NOBODY}/{NOBODY}", text)
        owners = {
            str(path.relative_to(base)): (path.lstat().st_uid, path.lstat().st_gid)
            for path in [spool, *spool.rglob("*")]
        }
        self.assertIn("spool/control.sock", owners, text)
        self.assertIn("spool/queue", owners)
        self.assertEqual({o for o in owners.values()}, {(NOBODY, NOBODY)}, owners)

        def submit() -> None:
            with smtplib.SMTP("localhost", port, timeout=30) as smtp:
                smtp.starttls(context=clientContext(cert))
                smtp.login(USER, PASSWORD)
                smtp.sendmail(USER, ["bob@example.org"], b"Subject: p\r\n\r\nx\r\n")

        yield deferToThread(submit)
        [queued] = SpoolReader(str(spool)).pending()
        self.assertEqual(queued.session.user, USER)
        messages = list(Path(spool, "queue").iterdir())
        self.assertTrue(messages)
        self.assertEqual({p.stat().st_uid for p in messages}, {NOBODY})
