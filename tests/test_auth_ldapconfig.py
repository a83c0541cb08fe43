"""
The ldap: backend's settings and escaping (mailgw.auth.ldapconfig), and its
checker's refusals that never reach a directory (mailgw.auth.ldap).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from mailgw.auth.ldap import LDAPChecker
from mailgw.auth.ldapconfig import (
    LDAPSettingsError,
    escapeDNValue,
    escapeFilterValue,
    fillTemplate,
    loadLDAPSettings,
    parseLDAPSettings,
)
from twisted.plugins.mailgw_auth import theLDAPCheckerFactory


class EscapingTests(TestCase):
    def test_dn(self) -> None:
        """RFC 4514 2.4: the specials, a leading '#' or space, a trailing space, NUL."""
        self.assertEqual(escapeDNValue("alice"), "alice")
        self.assertEqual(escapeDNValue('a,b+c"d\\e<f>g;h=i'), 'a\\,b\\+c\\"d\\\\e\\<f\\>g\\;h\\=i')
        self.assertEqual(escapeDNValue("#x"), "\\#x")
        self.assertEqual(escapeDNValue(" x "), "\\ x\\ ")
        self.assertEqual(escapeDNValue("a\x00b"), "a\\00b")
        self.assertEqual(escapeDNValue("x#y"), "x#y")
        self.assertEqual(escapeDNValue("rené"), "rené")

    def test_filter(self) -> None:
        """RFC 4515 3: '*', '(', ')', '\\' and NUL as \\XX."""
        self.assertEqual(escapeFilterValue("*)(uid=*"), "\\2a\\29\\28uid=\\2a")
        self.assertEqual(escapeFilterValue("a\\b\x00"), "a\\5cb\\00")
        self.assertEqual(escapeFilterValue("rené@example.com"), "rené@example.com")

    def test_fillTemplate(self) -> None:
        self.assertEqual(
            fillTemplate("(&(uid={localpart})(dc={domain}))", "a*@ex.org", escapeFilterValue),
            "(&(uid=a\\2a)(dc=ex.org))",
        )
        # A value that looks like a field is not filled again.
        self.assertEqual(fillTemplate("uid={user}", "{domain}", escapeDNValue), "uid={domain}")


class SettingsTests(TestCase):
    def setUp(self) -> None:
        self.ca = Path(self.mktemp())
        self.ca.write_text("not used before a connection\n")

    def settings(self, **values: Any) -> Any:
        data: dict[str, Any] = {
            "uri": "ldap://ldap.example.org",
            "ca_file": str(self.ca),
            "bind_dn": "uid={user},ou=people,dc=example,dc=org",
        }
        data.update(values)
        return parseLDAPSettings({k: v for k, v in data.items() if v is not None}, "ldap.toml")

    def assertProblem(self, key: str, **values: Any) -> None:
        e = self.assertRaises(LDAPSettingsError, self.settings, **values)
        self.assertIn(f"ldap.toml: {key}:", str(e))

    def test_defaults(self) -> None:
        s = self.settings()
        self.assertEqual(
            (s.host, s.port, s.ldaps, s.startTLS), ("ldap.example.org", 389, False, True)
        )
        s = self.settings(uri="ldaps://ldap.example.org:1636")
        self.assertEqual((s.port, s.ldaps, s.startTLS), (1636, True, False))

    def test_tlsRequired(self) -> None:
        """Passwords never cross the network in clear."""
        self.assertProblem("start_tls", start_tls=False)
        self.assertProblem("start_tls", uri="ldaps://x", start_tls=True)
        self.assertProblem("uri", uri="ldapi:///run/slapd/ldapi")
        self.assertProblem("uri", uri="http://x")
        self.assertProblem("ca_file", ca_file=str(self.ca) + ".missing")

    def test_modes(self) -> None:
        self.assertProblem("bind_dn", bind_dn=None)  # neither
        self.assertProblem("bind_dn", filter="(uid={user})", base="dc=x")  # both
        self.assertProblem("bind_dn", bind_dn="uid=alice,dc=x")  # no {user}
        self.assertProblem("bind_dn", bind_dn="uid={login},dc=x")
        self.assertProblem("bind_dn", bind_dn="uid={user.__class__},dc=x")
        self.assertProblem("base", bind_dn=None, filter="(uid={user})")
        s = self.settings(bind_dn=None, filter="(uid={user})", base="dc=x")
        self.assertEqual((s.filter, s.base, s.sendersFilter, s.sendersBase),
                         ("(uid={user})", "dc=x", "(uid={user})", "dc=x"))  # fmt: skip

    def test_serviceAccount(self) -> None:
        self.assertProblem("service_password", service_dn="cn=mailgw,dc=x")
        secret = Path(self.mktemp())
        secret.write_text("s3cret\nignored\n")
        s = self.settings(service_dn="cn=mailgw,dc=x", service_password_file=str(secret))
        self.assertEqual(s.servicePassword, "s3cret")
        self.assertNotIn("s3cret", repr(s))
        self.assertProblem(
            "service_password", service_password="x", service_password_file=str(secret)
        )
        self.assertProblem("service_password_file", service_password_file=str(secret) + ".x")

    def test_senders(self) -> None:
        self.assertProblem("senders_attributes", senders_attributes="mail")
        self.assertProblem("senders_attributes", senders_attributes=["mail)(x"])
        self.assertProblem("senders_filter", senders_attributes=["mail"])  # direct bind: no filter
        s = self.settings(
            senders_attributes=["mail", "mailAlternateAddress"],
            senders_filter="(uid={localpart})",
            senders_base="ou=people,dc=x",
        )
        self.assertEqual(s.sendersAttributes, ("mail", "mailAlternateAddress"))

    def test_others(self) -> None:
        self.assertProblem("pool_size", pool_size=0)
        self.assertProblem("timeout", timeout="5")
        self.assertProblem("bindDN", bindDN="x")

    def test_file(self) -> None:
        e = self.assertRaises(LDAPSettingsError, loadLDAPSettings, "/nonexistent/ldap.toml")
        self.assertIn("/nonexistent/ldap.toml: cannot read", str(e))
        self.assertRaises(ValueError, theLDAPCheckerFactory.generateChecker, "")


class CheckerRefusalTests(TestCase):
    """Logins the checker refuses itself, before any directory request."""

    def setUp(self) -> None:
        self.asked: list[str] = []

        class Directory:
            def check(inner, login: str, password: bytes) -> Any:
                self.asked.append(login)
                return defer.succeed(login)

        self.checker = LDAPChecker(Directory())  # type: ignore[arg-type]

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(ICredentialsChecker, self.checker))

    def test_refusedWithoutAsking(self) -> None:
        for user, password in [
            (b"alice", b""),  # an unauthenticated bind to LDAP
            (b"\xffalice", b"pw"),
            (b"", b"pw"),
            (b" alice", b"pw"),
            (b"alice\t", b"pw"),
            (b"ali\x00ce", b"pw"),
        ]:
            d = self.checker.requestAvatarId(UsernamePassword(user, password))
            self.failureResultOf(d, UnauthorizedLogin)
        self.assertEqual(self.asked, [])

    def test_asked(self) -> None:
        d = self.checker.requestAvatarId(UsernamePassword("rené".encode(), b"pw"))
        self.assertEqual(self.successResultOf(d), "rené".encode())
