"""
The ldap: backend against a real OpenLDAP (slapd with a test tree, StartTLS
and ldaps with a generated CA): direct DN binds and search-then-bind,
RFC 4514/4515 escaping against injection, the empty-password
(unauthenticated bind) hole closed, certificate verification, the directory
stopped and back; then logins through a real gateway with smtplib and the
sender login map read from the directory.
"""

from __future__ import annotations

import base64
import hashlib
import os
import smtplib
from pathlib import Path
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mailgw.auth.ldap import LDAPChecker, LDAPDirectory, LDAPUnavailable
from mailgw.auth.ldapconfig import parseLDAPSettings
from tests.integration.servers import LDAPServer, makeCA
from tests.integration.support import GatewayTestCase, clientContext, haveCommand, run

PEOPLE = "ou=people,dc=example,dc=org"
SERVICE_DN = "cn=mailgw,ou=services,dc=example,dc=org"


def ssha(password: str) -> str:
    salt = os.urandom(8)
    digest = hashlib.sha1(password.encode() + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


def person(uid: str, mails: list[str], password: str | None) -> str:
    lines = [
        f"dn: uid={uid},{PEOPLE}",
        "objectClass: inetOrgPerson",
        f"uid: {uid}",
        f"cn: {uid}",
        f"sn: {uid}",
    ]
    lines += [f"mail: {m}" for m in mails]
    if password is not None:
        lines.append(f"userPassword: {ssha(password)}")
    return "\n".join(lines) + "\n"


def treeLDIF() -> str:
    """A tree as a Postfix/Dovecot site keeps it: people with mail attributes, a service account."""
    parts = [
        "dn: dc=example,dc=org\nobjectClass: dcObject\nobjectClass: organization\n"
        "o: Example\ndc: example\n",
        f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n",
        "dn: ou=services,dc=example,dc=org\nobjectClass: organizationalUnit\nou: services\n",
        f"dn: {SERVICE_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
        f"cn: mailgw\nuserPassword: {ssha('service secret')}\n",
        person("alice", ["alice@example.com", "sales@example.com"], "alice password"),
        person("bob", ["Bob@Example.com"], "bob password"),
        person("twin1", ["twin@example.com"], "twin password"),
        person("twin2", ["twin@example.com"], "twin password"),
        person("nopass", ["nopass@example.com"], None),
    ]
    # A uid with characters a DN must escape (RFC 4514): "o'brien, jr".
    parts.append(
        f"dn: uid=o'brien\\, jr,{PEOPLE}\nobjectClass: inetOrgPerson\nuid: o'brien, jr\n"
        f"cn: ob\nsn: ob\nmail: ob@example.com\nuserPassword: {ssha('ob password')}\n"
    )
    return "\n".join(parts)


class DirectoryTests(TestCase):
    """LDAPDirectory and LDAPChecker against slapd, without a gateway."""

    timeout = 60

    def setUp(self) -> None:
        self.server = LDAPServer(treeLDIF())
        self.addCleanup(self.server.close)

    def checker(self, **settings: Any) -> LDAPChecker:
        data: dict[str, Any] = {
            "uri": f"ldap://127.0.0.1:{self.server.port}",
            "ca_file": self.server.tls["ca"],
        }
        data.update(settings)
        directory = LDAPDirectory(parseLDAPSettings(data, "ldap.toml"), reactor)
        self.addCleanup(directory.close)
        return LDAPChecker(directory)

    def direct(self, **settings: Any) -> LDAPChecker:
        return self.checker(bind_dn=f"uid={{user}},{PEOPLE}", **settings)

    def search(self, **settings: Any) -> LDAPChecker:
        values: dict[str, Any] = {
            "base": PEOPLE,
            "filter": "(&(objectClass=inetOrgPerson)(mail={user}))",
            "service_dn": SERVICE_DN,
            "service_password": "service secret",
            "login_attribute": "mail",
        }
        values.update(settings)
        return self.checker(**values)

    def login(self, checker: LDAPChecker, user: str, password: str) -> Any:
        return checker.requestAvatarId(UsernamePassword(user.encode(), password.encode()))

    @inlineCallbacks
    def assertRefused(self, checker: LDAPChecker, user: str, password: str) -> Any:
        yield self.assertFailure(self.login(checker, user, password), UnauthorizedLogin)

    @inlineCallbacks
    def test_directBind(self) -> Any:
        checker = self.direct()
        self.assertEqual((yield self.login(checker, "alice", "alice password")), b"alice")
        self.assertEqual((yield self.login(checker, "o'brien, jr", "ob password")), b"o'brien, jr")
        yield self.assertRefused(checker, "alice", "wrong")
        yield self.assertRefused(checker, "nobody", "alice password")
        yield self.assertRefused(checker, "nopass", "anything")

    @inlineCallbacks
    def test_dnInjection(self) -> Any:
        """
        A login that would name another DN when pasted unescaped names no
        entry; one with surrounding blanks (which the uid matching rule
        ignores, so it would bind as alice under another name) is refused.
        """
        checker = self.direct()
        for login in ["alice,ou=people,dc=example,dc=org", "alice+cn=x", "#alice", " alice",
                      "alice ", "alice\00"]:  # fmt: skip
            yield self.assertRefused(checker, login, "alice password")

    @inlineCallbacks
    def test_unauthenticatedBindRefused(self) -> Any:
        """
        This slapd accepts a DN with an empty password (an unauthenticated
        bind, RFC 4513 5.1.2): the checker refuses it itself, as a wrong
        password (535), before the directory sees it.
        """
        if haveCommand("ldapwhoami"):
            result = yield run(
                "ldapwhoami", "-x", "-ZZ", "-H", f"ldap://127.0.0.1:{self.server.port}",
                "-D", f"uid=alice,{PEOPLE}", "-w", "",
                env={**os.environ, "LDAPTLS_CACERT": self.server.tls["ca"]},
            )  # fmt: skip
            self.assertEqual((result.returncode, result.stdout.strip()), (0, "anonymous"))
        # UnauthorizedLogin (535), not a bind attempt ldap3 would turn
        # into an error (454) or a directory would accept.
        yield self.assertRefused(self.direct(), "alice", "")
        yield self.assertRefused(self.search(), "alice@example.com", "")

    @inlineCallbacks
    def test_searchThenBind(self) -> Any:
        checker = self.search()
        self.assertEqual(
            (yield self.login(checker, "alice@example.com", "alice password")), b"alice@example.com"
        )
        # The login as the directory spells it (login_attribute).
        self.assertEqual((yield self.login(checker, "bob@example.com", "bob password")),
                         b"Bob@Example.com")  # fmt: skip
        yield self.assertRefused(checker, "alice@example.com", "bob password")
        yield self.assertRefused(checker, "nobody@example.com", "x")
        # Two entries match: refused, never the first one.
        yield self.assertRefused(checker, "twin@example.com", "twin password")

    @inlineCallbacks
    def test_filterInjection(self) -> Any:
        """Filter metacharacters in the login are escaped: they match nothing."""
        checker = self.search()
        for login in ["*", "alice*", "*)(uid=alice", "alice@example.com)(|(mail=*", "\\2a"]:
            yield self.assertRefused(checker, login, "alice password")

    @inlineCallbacks
    def test_ldaps(self) -> Any:
        checker = self.direct(uri=f"ldaps://127.0.0.1:{self.server.tlsPort}")
        self.assertEqual((yield self.login(checker, "alice", "alice password")), b"alice")

    @inlineCallbacks
    def test_untrustedCertificate(self) -> Any:
        """A certificate from another CA: 454 (LDAPUnavailable), never a login."""
        other = Path(self.mktemp())
        other.mkdir()
        ca = makeCA(other)["ca"]
        for uri in (f"ldap://127.0.0.1:{self.server.port}",
                    f"ldaps://127.0.0.1:{self.server.tlsPort}"):  # fmt: skip
            checker = self.direct(uri=uri, ca_file=ca)
            yield self.assertFailure(
                self.login(checker, "alice", "alice password"), LDAPUnavailable
            )
        self.flushLoggedErrors()

    @inlineCallbacks
    def test_certificateForAnotherName(self) -> Any:
        """A certificate from the right CA for another host: 454, with StartTLS and ldaps."""
        self.server.close()
        self.server = LDAPServer(treeLDIF(), certificateName="ldap.example.net")
        self.addCleanup(self.server.close)
        for uri in (f"ldap://127.0.0.1:{self.server.port}",
                    f"ldaps://127.0.0.1:{self.server.tlsPort}"):  # fmt: skip
            checker = self.direct(uri=uri)
            yield self.assertFailure(
                self.login(checker, "alice", "alice password"), LDAPUnavailable
            )

    @inlineCallbacks
    def test_wrongServiceAccount(self) -> Any:
        checker = self.search(service_password="wrong")
        d = self.login(checker, "alice@example.com", "alice password")
        yield self.assertFailure(d, LDAPUnavailable)

    @inlineCallbacks
    def test_downThenBack(self) -> Any:
        checker = self.search()
        yield self.login(checker, "alice@example.com", "alice password")
        self.server.stop()
        d = self.login(checker, "alice@example.com", "alice password")
        yield self.assertFailure(d, LDAPUnavailable)
        self.server.start()
        name = yield self.login(checker, "alice@example.com", "alice password")
        self.assertEqual(name, b"alice@example.com")

    @inlineCallbacks
    def test_senders(self) -> Any:
        checker = self.search(senders_attributes=["mail"])
        found = yield checker.directory.senders("alice@example.com")
        self.assertEqual(sorted(found), ["alice@example.com", "sales@example.com"])
        self.assertEqual((yield checker.directory.senders("*")), [])


class LDAPGatewayTests(GatewayTestCase):
    """Logins and sender ownership through a real gateway, settings from a file."""

    timeout = 60

    def setUp(self) -> Any:
        self.server = LDAPServer(treeLDIF())
        self.addCleanup(self.server.close)
        base = Path(self.mktemp())
        base.mkdir(parents=True)
        secret = base / "ldap.secret"
        secret.write_text("service secret\n")
        self.settingsPath = base / "ldap.toml"
        self.settingsPath.write_text(
            f'uri = "ldap://localhost:{self.server.port}"\n'
            "start_tls = true\n"
            f'ca_file = "{self.server.tls["ca"]}"\n'
            f'base = "{PEOPLE}"\n'
            'filter = "(&(objectClass=inetOrgPerson)(mail={user}))"\n'
            f'service_dn = "{SERVICE_DN}"\n'
            f'service_password_file = "{secret}"\n'
            'senders_attributes = ["mail"]\n'
        )
        return super().setUp()

    def adjustConfig(self, data: dict[str, Any]) -> dict[str, Any]:
        data["auth"]["backends"] = [f"ldap:{self.settingsPath}"]
        data.setdefault("policy", {})["sender_login_maps"] = f"ldap:{self.settingsPath}"
        return data

    def dialog(self, login: str, password: str, mechanism: str) -> tuple[int, list[int]]:
        """Runs in a thread: log in, then try three senders."""
        with smtplib.SMTP("127.0.0.1", self.submissionPort, timeout=30) as smtp:
            smtp.ehlo("client.test")
            smtp.starttls(context=clientContext(self.files["cert"]))
            smtp.ehlo("client.test")
            smtp.user, smtp.password = login, password
            try:
                smtp.auth(mechanism, smtp.auth_plain if mechanism == "PLAIN" else smtp.auth_login)
            except smtplib.SMTPAuthenticationError as e:
                return e.smtp_code, []
            codes = []
            for sender in (login, "sales@example.com", "ceo@example.com"):
                codes.append(smtp.mail(sender)[0])
                smtp.rset()
            return 235, codes

    @inlineCallbacks
    def test_loginsAndSenders(self) -> Any:
        for mechanism in ("PLAIN", "LOGIN"):
            result = yield deferToThread(
                self.dialog, "alice@example.com", "alice password", mechanism
            )
            self.assertEqual(result, (235, [250, 250, 553]))
        result = yield deferToThread(self.dialog, "alice@example.com", "wrong", "PLAIN")
        self.assertEqual(result, (535, []))
        self.server.stop()
        result = yield deferToThread(self.dialog, "alice@example.com", "alice password", "PLAIN")
        self.assertEqual(result, (454, []))
        self.server.start()
        result = yield deferToThread(self.dialog, "alice@example.com", "alice password", "PLAIN")
        self.assertEqual(result[0], 235)
        self.flushLoggedErrors(LDAPUnavailable)
