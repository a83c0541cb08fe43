"""
Issue 8's "done when", tried as a new site would: one gateway (the embedded
service on 127.0.0.1) in front of users kept in three places at once, the
real servers from Debian's packages:

  - PostgreSQL (``sql:``): a SHA512-CRYPT user, a Dovecot {SCRAM-SHA-256}
    user and a {PLAIN} user;
  - OpenLDAP (``ldap:``, search-then-bind over StartTLS): an SSHA user;
  - Dovecot (``dovecot:``): a {CRAM-MD5} user and a {SCRAM-SHA-256} user.

Each logs in with PLAIN and LOGIN, and where the stored value allows with
CRAM-MD5 and SCRAM-SHA-256, from real clients: smtplib, swaks (PLAIN,
LOGIN, CRAM-MD5) and scramp (SCRAM-SHA-256, which also checks the server's
signature). Then each backend in turn is stopped by its pid: its users get
454 4.7.0 (the others still log in), and once it is started again they log
in, without a restart of the gateway.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest

from tests.integration.servers import LDAPServer, PostgreSQLServer
from tests.integration.support import GatewayTestCase, haveCommand, shortDirectory
from tests.integration.test_dovecot import DOVEADM, DOVECOT, Dovecot, _hash, smtpAuth
from tests.integration.test_ldap_backend import PEOPLE, SERVICE_DN, person, treeLDIF

ALL = ("PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256")
PLAIN_LOGIN = ("PLAIN", "LOGIN")

# login: (password, where, mechanisms the stored value serves)
USERS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "paula@sql.test": ("paula pass 1", "sql", PLAIN_LOGIN),
    "sam@sql.test": ("sam pass 2", "sql", ("PLAIN", "LOGIN", "SCRAM-SHA-256")),
    "pat@sql.test": ("pat pass 3", "sql", ALL),
    "lara@ldap.test": ("lara pass 4", "ldap", PLAIN_LOGIN),
    "dirk@dovecot.test": ("dirk pass 5", "dovecot", ("PLAIN", "LOGIN", "CRAM-MD5")),
    "dora@dovecot.test": ("dora pass 6", "dovecot", ("PLAIN", "LOGIN", "SCRAM-SHA-256")),
}
SQL_STORED = {
    "paula@sql.test": "SHA512-CRYPT",
    "sam@sql.test": "SCRAM-SHA-256",
    "pat@sql.test": "PLAIN",
}
DOVECOT_USERS = [
    ("dirk@dovecot.test", "CRAM-MD5", USERS["dirk@dovecot.test"][0]),
    ("dora@dovecot.test", "SCRAM-SHA-256", USERS["dora@dovecot.test"][0]),
]
SCHEMA = """
CREATE TABLE mailbox (username varchar(255) PRIMARY KEY, password varchar(255) NOT NULL,
                      active boolean NOT NULL DEFAULT true);
CREATE ROLE mailgw LOGIN PASSWORD 'db secret';
GRANT SELECT ON mailbox TO mailgw
"""


def swaks(port: int, mechanism: str, user: str, password: str) -> int:
    """Runs in a thread: swaks over STARTTLS, up to AUTH; the code of the AUTH's last reply."""
    result = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{port}", "--tls", "--auth", mechanism,
         "--auth-user", user, "--auth-password", password, "--quit-after", "AUTH",
         "--helo", "client.test", "--timeout", "30"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    codes = re.findall(r"^<~\*? +(\d{3}) ", result.stdout, re.MULTILINE)
    codes = [c for c in codes if c in ("235", "454", "535", "504")]
    if not codes:
        raise AssertionError(f"swaks gave no AUTH answer:\n{result.stdout}\n{result.stderr}")
    return int(codes[-1])


class BackendsEndToEndTests(GatewayTestCase):
    timeout = 240

    def setUp(self) -> Any:
        if not os.access(DOVECOT, os.X_OK) or not os.access(DOVEADM, os.X_OK):
            raise SkipTest("dovecot-core is not installed (apt-get install dovecot-core)")
        if not haveCommand("swaks"):
            raise SkipTest("swaks is not installed (apt-get install swaks)")
        base = Path(self.mktemp())
        base.mkdir(parents=True)
        # PostgreSQL: users as a PostfixAdmin-style table holds them.
        self.db = PostgreSQLServer()
        self.addCleanup(self.db.close)
        self.db.sql("CREATE DATABASE mail")
        rows = [
            f"INSERT INTO mailbox (username, password) VALUES ('{login}', '{stored}')"
            for login, stored in (
                (login, "{PLAIN}" + USERS[login][0] if scheme == "PLAIN"
                 else _hash(scheme, USERS[login][0]))
                for login, scheme in SQL_STORED.items()
            )
        ]  # fmt: skip
        self.db.sql(*[s for s in SCHEMA.split(";") if s.strip()], *rows, dbname="mail")
        self.sqlSettings = base / "sql.toml"
        self.sqlSettings.write_text(
            'driver = "postgresql"\n'
            f'dsn = "host=127.0.0.1 port={self.db.port} dbname=mail user=mailgw'
            " password='db secret'\"\n"
            'password_query = "SELECT password FROM mailbox WHERE username = %(user)s'
            ' AND active"\n'
            "allow_plain = true\n"
            'mechanisms = ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256"]\n'
            "timeout = 5\n"
        )
        # OpenLDAP: the test tree and one more person, found by mail.
        password = USERS["lara@ldap.test"][0]
        self.ldap = LDAPServer(treeLDIF() + "\n" + person("lara", ["lara@ldap.test"], password))
        self.addCleanup(self.ldap.close)
        secret = base / "ldap.secret"
        secret.write_text("service secret\n")
        self.ldapSettings = base / "ldap.toml"
        self.ldapSettings.write_text(
            f'uri = "ldap://localhost:{self.ldap.port}"\nstart_tls = true\n'
            f'ca_file = "{self.ldap.tls["ca"]}"\nbase = "{PEOPLE}"\n'
            'filter = "(&(objectClass=inetOrgPerson)(mail={user}))"\n'
            f'service_dn = "{SERVICE_DN}"\nservice_password_file = "{secret}"\n'
            "timeout = 5\n"
        )
        # Dovecot: auth service only, no failure delay (the chain asks it for others' users).
        self.dovecot = Dovecot(
            shortDirectory(self),
            DOVECOT_USERS,
            extra="auth_failure_delay = 0\nauth_mechanisms = plain login cram-md5 scram-sha-256\n",
        )
        self.dovecot.start()
        self.addCleanup(self.dovecot.stop)
        return super().setUp()

    def adjustConfig(self, data: dict[str, Any]) -> dict[str, Any]:
        data["auth"]["backends"] = [
            f"sql:{self.sqlSettings}",
            f"ldap:{self.ldapSettings}",
            f"dovecot:{self.dovecot.socket}",
        ]
        return data

    def tearDown(self) -> None:
        for checker in self.service.checkers:
            getattr(checker, "stop", getattr(checker, "retire", lambda: None))()

    def login(self, client: str, mechanism: str, user: str, password: str | None = None) -> Any:
        password = USERS[user][0] if password is None else password
        if client == "swaks":
            return deferToThread(swaks, self.submissionPort, mechanism, user, password)

        def smtplibLogin() -> int:
            port, cert = self.submissionPort, self.files["cert"]
            return smtpAuth(port, cert, mechanism, user, password)[0]

        return deferToThread(smtplibLogin)

    @inlineCallbacks
    def test_everyUserEveryMechanism(self) -> Any:
        tried = []
        for user, (_, _where, mechanisms) in USERS.items():
            for mechanism in mechanisms:
                clients = ["swaks", "smtplib"] if mechanism != "SCRAM-SHA-256" else ["scramp"]
                for client in clients:
                    code = yield self.login(client, mechanism, user)
                    tried.append((user, mechanism, client, code))
        failed = [t for t in tried if t[3] != 235]
        self.assertEqual(failed, [], self.dovecot.log())
        self.assertEqual(len(tried), 31)  # 14 with swaks and smtplib each, 3 with scramp
        # A wrong password is a plain 535, whoever keeps the user.
        for user in ("paula@sql.test", "lara@ldap.test", "dirk@dovecot.test"):
            code = yield self.login("smtplib", "PLAIN", user, "wrong password")
            self.assertEqual(code, 535, user)
        # Mechanisms a stored value cannot serve are refused with 535 too.
        code = yield self.login("smtplib", "SCRAM-SHA-256", "paula@sql.test")
        self.assertEqual(code, 535)
        code = yield self.login("smtplib", "CRAM-MD5", "lara@ldap.test")
        self.assertEqual(code, 535)

    @inlineCallbacks
    def test_eachBackendDownAndBack(self) -> Any:
        servers = {"sql": self.db, "ldap": self.ldap, "dovecot": self.dovecot}
        byBackend = {where: user for user, (_, where, _m) in USERS.items()}
        for where, server in servers.items():
            user = byBackend[where]
            self.assertEqual((yield self.login("smtplib", "PLAIN", user)), 235, where)
            yield deferToThread(server.stop)  # by its pid
            code = yield self.login("smtplib", "PLAIN", user)
            self.assertEqual(code, 454, f"{where} stopped: {code}")
            code = yield self.login("swaks", "LOGIN", user)
            self.assertEqual(code, 454, f"{where} stopped (swaks): {code}")
            # The users of the other backends are not held up.
            for other, otherUser in byBackend.items():
                if other != where:
                    self.assertEqual((yield self.login("smtplib", "PLAIN", otherUser)), 235)
            yield deferToThread(server.start)
            for _ in range(100):
                code = yield self.login("smtplib", "LOGIN", user)
                if code == 235:
                    break
                self.assertEqual(code, 454)
                yield deferToThread(time.sleep, 0.2)
            self.assertEqual(code, 235, f"{where} back, but its users still cannot log in")
        self.flushLoggedErrors()
