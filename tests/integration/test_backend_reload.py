"""
A reload of a running gateway whose C{sql:} settings file changed: the new
checker gets its own pool, and the old checker's pool is closed once its
queries under way are done (it was left open before). Through
L{GatewayService.reload}, as SIGHUP does.
"""

from __future__ import annotations

import smtplib
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread

from tests.integration.support import GatewayTestCase, clientContext
from tests.test_auth_sql import makeUsersDB

QUERY = 'password_query = "SELECT password FROM users WHERE login = :user"\n'


class SQLReloadTests(GatewayTestCase):
    def setUp(self) -> Any:
        self.db = Path(self.mktemp())
        self.db.parent.mkdir(parents=True, exist_ok=True)
        makeUsersDB(self.db, {"alice@example.com": "{PLAIN}pencil"})
        self.settings = Path(self.mktemp())
        self.writeSettings(poolSize=1)
        return super().setUp()

    def writeSettings(self, poolSize: int) -> None:
        self.settings.write_text(
            f'driver = "sqlite"\ndsn = "{self.db}"\nallow_plain = true\n'
            f"pool_size = {poolSize}\n{QUERY}"
        )

    def adjustConfig(self, data: dict[str, Any]) -> dict[str, Any]:
        data["auth"]["backends"] = [f"sql:{self.settings}"]
        return data

    def login(self) -> int:
        with smtplib.SMTP("127.0.0.1", self.submissionPort, timeout=30) as smtp:
            smtp.ehlo("client.test")
            smtp.starttls(context=clientContext(self.files["cert"]))
            smtp.ehlo("client.test")
            try:
                return int(smtp.login("alice@example.com", "pencil")[0])
            except smtplib.SMTPAuthenticationError as e:
                return int(e.smtp_code)

    def database(self) -> Any:
        return self.service.checkers[0].fetch.__self__

    @inlineCallbacks
    def test_changedSettingsCloseOldPool(self) -> Any:
        self.assertEqual((yield deferToThread(self.login)), 235)
        old = self.database()
        self.assertTrue(self.service.reload())  # the file unchanged: the same pool
        self.assertIs(self.database(), old)
        self.assertFalse(old.workers.closed)
        self.writeSettings(poolSize=2)
        self.assertTrue(self.service.reload())
        new = self.database()
        self.addCleanup(new.close)
        self.assertIsNot(new, old)
        self.assertTrue(old.workers.closed, "the old checker's pool is still open")
        self.assertEqual((yield deferToThread(self.login)), 235)
        self.assertFalse(new.workers.closed)

    @inlineCallbacks
    def test_refusedReloadLetsGoOfWhatItMade(self) -> Any:
        """
        A reload refused after its checkers were made (here: a bad sender
        map) closes their new pool, and keeps the running one.
        """
        from mailgw.auth.sql import loadSQLSettings, sharedDatabase
        from mailgw.config import configFromDict

        old = self.database()
        self.writeSettings(poolSize=3)
        data = {
            "server": {
                "hostname": "localhost",
                "submission": list(self.config.server.submission),
                "submissions": list(self.config.server.submissions),
            },
            "tls": {"certificate": self.files["cert"], "key": self.files["key"]},
            "auth": {"backends": [f"sql:{self.settings}"]},
            "spool": {"directory": self.files["spool"]},
            "policy": {"sender_login_maps": f"sql:{self.settings}.missing"},
        }
        from mailgw.auth import sql

        made: list[Any] = []
        acquire = sql._databases.acquire

        def recorded(*args: Any) -> Any:
            made.append(acquire(*args))
            return made[-1]

        self.patch(sql._databases, "acquire", recorded)
        self.assertFalse(self.service.reload(configFromDict(data, source="test2")))
        self.assertIs(self.database(), old)
        self.assertFalse(old.workers.closed)
        [new] = made
        self.assertIsNot(new, old)
        self.assertTrue(new.workers.closed, "the refused reload's pool is still open")
        fresh = sharedDatabase(loadSQLSettings(str(self.settings)), self.service.reactor)
        self.addCleanup(fresh.close)
        self.assertIsNot(fresh, new)  # forgotten: never handed out closed
        self.assertEqual((yield deferToThread(self.login)), 235)
