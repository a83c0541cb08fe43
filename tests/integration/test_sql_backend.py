"""
The sql: backend against a real PostgreSQL (a throwaway cluster) behind a
real gateway, with smtplib over STARTTLS: the PostfixAdmin-style layout most
Postfix/Dovecot sites have, each stored-hash format Dovecot writes, the
database stopped mid-run (454) and back (235 again, by itself), and the
sender login map read from the same database.
"""

from __future__ import annotations

import smtplib
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import bcrypt
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread

from mailgw.auth.passwd import hashPassword
from mailgw.auth.sql import SQLUnavailable
from tests.integration.servers import PostgreSQLServer
from tests.integration.support import GatewayTestCase, clientContext

USERS = {
    # login: (password, stored value)
    # openssl passwd -6 -salt saltstring 'Hello world!' (smtplib sends ASCII passwords only)
    "alice@example.com": (
        "Hello world!",
        "{SHA512-CRYPT}$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI6"
        "8u4OTLiBFdcbYEdFCoEOfaS35inz1",
    ),
    "bob@example.com": ("bob's password", "{ARGON2ID}" + hashPassword("bob's password")),
    "carol@example.com": (
        "carol's password",
        "{BLF-CRYPT}" + bcrypt.hashpw(b"carol's password", bcrypt.gensalt(4)).decode(),
    ),
}
SCHEMA = """
CREATE TABLE mailbox (
    username varchar(255) PRIMARY KEY,
    password varchar(255) NOT NULL,
    domain varchar(255) NOT NULL,
    active boolean NOT NULL DEFAULT true
);
CREATE TABLE alias (
    address varchar(255) PRIMARY KEY,
    goto text NOT NULL,
    domain varchar(255) NOT NULL,
    active boolean NOT NULL DEFAULT true
);
CREATE ROLE mailgw LOGIN PASSWORD 'db secret';
GRANT SELECT ON mailbox, alias TO mailgw;
"""
SETTINGS = """\
driver = "postgresql"
dsn = "host=127.0.0.1 port={port} dbname=mail user=mailgw password='db secret'"
password_query = "SELECT password FROM mailbox WHERE username = %(user)s AND active"
senders_query = \"\"\"
    SELECT address FROM alias
    WHERE %(user)s = ANY (string_to_array(replace(goto, ' ', ''), ',')) AND active
\"\"\"
pool_size = 2
timeout = 5
"""


def message(sender: str) -> EmailMessage:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = sender, "rcpt@example.net", "sql"
    m.set_content("hello\n")
    return m


class PostgreSQLGatewayTests(GatewayTestCase):
    timeout = 90

    def setUp(self) -> Any:
        self.db = PostgreSQLServer()
        self.addCleanup(self.db.close)
        self.db.sql("CREATE DATABASE mail")
        statements = [s for s in SCHEMA.split(";") if s.strip()]
        statements += [
            "INSERT INTO mailbox (username, password, domain) VALUES"
            f" ('{login}', '{stored}', 'example.com')"
            for login, (_, stored) in USERS.items()
        ]
        statements += [
            "INSERT INTO alias VALUES ('sales@example.com', 'alice@example.com, bob@example.com',"
            " 'example.com')",
            "INSERT INTO alias VALUES ('old@example.com', 'alice@example.com', 'example.com',"
            " false)",
        ]
        self.db.sql(*statements, dbname="mail")
        self.settingsPath = Path(self.mktemp())
        self.settingsPath.parent.mkdir(parents=True, exist_ok=True)
        self.settingsPath.write_text(SETTINGS.format(port=self.db.port))
        return super().setUp()

    def adjustConfig(self, data: dict[str, Any]) -> dict[str, Any]:
        data["auth"]["backends"] = [f"sql:{self.settingsPath}"]
        data.setdefault("policy", {})["sender_login_maps"] = f"sql:{self.settingsPath}"
        return data

    def session(self, login: str, password: str, mechanism: str = "PLAIN") -> Any:
        """Runs in a thread: log in; return the AUTH reply and the open session."""
        smtp = smtplib.SMTP("127.0.0.1", self.submissionPort, timeout=30)
        try:
            smtp.ehlo("client.test")
            smtp.starttls(context=clientContext(self.files["cert"]))
            smtp.ehlo("client.test")
            smtp.user, smtp.password = login, password
            method = smtp.auth_plain if mechanism == "PLAIN" else smtp.auth_login
            smtp.auth(mechanism, method)
        except smtplib.SMTPAuthenticationError as e:
            smtp.close()
            return e.smtp_code, e.smtp_error, None
        except BaseException:
            smtp.close()
            raise
        return 235, b"", smtp

    def loginCode(self, login: str, password: str, mechanism: str = "PLAIN") -> Any:
        def attempt() -> tuple[int, bytes]:
            code, text, smtp = self.session(login, password, mechanism)
            if smtp is not None:
                smtp.quit()
            return code, text

        return deferToThread(attempt)

    @inlineCallbacks
    def test_everyFormatWithPlainAndLogin(self) -> Any:
        """Each user logs in with PLAIN and LOGIN and sends a message."""

        def send(login: str, password: str, mechanism: str) -> Any:
            code, _, smtp = self.session(login, password, mechanism)
            self.assertEqual(code, 235, (login, mechanism))
            with smtp:
                smtp.send_message(message(login))

        for login, (password, _) in USERS.items():
            for mechanism in ("PLAIN", "LOGIN"):
                yield deferToThread(send, login, password, mechanism)
        self.assertEqual(len(self.spooled()), 6)

    @inlineCallbacks
    def test_refused(self) -> Any:
        """Wrong passwords, unknown users and injection attempts get 535."""
        for login, password in [
            ("alice@example.com", "wrong"),
            ("nobody@example.com", "Hello world!"),
            ("' OR '1'='1", "Hello world!"),
            ("alice@example.com' --", "Hello world!"),
        ]:
            code, _ = yield self.loginCode(login, password)
            self.assertEqual(code, 535, login)
        self.db.sql("SELECT 1 FROM mailbox", dbname="mail")  # the table is still there

    @inlineCallbacks
    def test_databaseDownThenBack(self) -> Any:
        """A stopped database answers 454 4.7.0; started again, logins work by themselves."""
        code, _ = yield self.loginCode("bob@example.com", "bob's password")
        self.assertEqual(code, 235)
        self.db.stop()
        code, text = yield self.loginCode("bob@example.com", "bob's password")
        self.assertEqual((code, text[:5]), (454, b"4.7.0"))
        code, _ = yield self.loginCode("alice@example.com", "Hello world!")
        self.assertEqual(code, 454)
        self.db.start()
        code, _ = yield self.loginCode("alice@example.com", "Hello world!")
        self.assertEqual(code, 235)
        self.flushLoggedErrors(SQLUnavailable)

    @inlineCallbacks
    def test_sendersFromDatabase(self) -> Any:
        """The senders query grants alias addresses; inactive ones and others are refused."""

        def senders(login: str, password: str) -> list[int]:
            code, _, smtp = self.session(login, password)
            self.assertEqual(code, 235)
            codes = []
            with smtp:
                for sender in (login, "sales@example.com", "old@example.com", "ceo@example.com"):
                    codes.append(smtp.mail(sender)[0])
                    smtp.rset()
            return codes

        self.assertEqual((yield deferToThread(senders, "alice@example.com", "Hello world!")),
                         [250, 250, 553, 553])  # fmt: skip
        self.assertEqual((yield deferToThread(senders, "carol@example.com", "carol's password")),
                         [250, 553, 553, 553])  # fmt: skip
