"""
Authentication backends shipped with mailgw, found by L{twisted.plugin}:
C{twistd mailgw --auth passwd:/etc/mailgw/passwd}.

This is a plugin file, not a library module: it may import the global
reactor (inside L{PasswdCheckerFactory.generateChecker}, never at import
time, because every plugin file is imported when plugins are listed).
"""

from __future__ import annotations

from typing import Any

from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.strcred import ICheckerFactory
from twisted.plugin import IPlugin
from zope.interface import implementer

from mailgw.auth.passwd import PasswdChecker, PasswdFileError, readUsers
from mailgw.auth.relay import IRelayedCredentials
from mailgw.auth.scram import IScramCredentials

_passwdHelp = """
Checks logins against a mailgw users file, one user a line:

    login:ARGON2ID-HASH
    login:ARGON2ID-HASH[:CRAM-MD5-SECRET][:SCRAM-SHA-256-KEYS]

Manage it with `mailgw passwd add|change|remove|list LOGIN --file FILE`.
PLAIN and LOGIN work for every user; CRAM-MD5 only for users added with
--cram, whose password is then stored base64-encoded (password-equivalent:
keep the file readable by the server only), and EHLO offers CRAM-MD5 only
while at least one user has such a secret. SCRAM-SHA-256 likewise, for
users added with --scram (salted keys, not the password).
Changes to the file apply to the next login, without a restart.
"""


@implementer(ICheckerFactory, IPlugin)
class PasswdCheckerFactory:
    """
    Makes L{PasswdChecker}s whose argon2 verification runs in the
    reactor's thread pool.
    """

    authType = "passwd"
    authHelp = _passwdHelp
    argStringFormat = "FILE"
    credentialInterfaces = (IUsernamePassword, IUsernameHashedPassword, IScramCredentials)

    def generateChecker(self, argstring: str) -> PasswdChecker:
        """
        @raise ValueError: no file given, or it cannot be read or parsed
            (the message names the file): refuse to start rather than answer
            every login with a temporary failure.
        """
        path = argstring
        if not path:
            raise ValueError("passwd: needs the users file: --auth passwd:FILE")
        try:
            readUsers(path)
        except OSError as e:
            raise ValueError(f"{path}: cannot read users file: {e.strerror}") from None
        except PasswdFileError as e:
            raise ValueError(str(e)) from None

        from twisted.internet import reactor
        from twisted.internet.threads import deferToThreadPool

        def runInThread(f: Any, *args: Any) -> Any:
            return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

        return PasswdChecker(path, runInThread)


thePasswdCheckerFactory = PasswdCheckerFactory()

_sqlHelp = """
Checks logins against users and stored password hashes in PostgreSQL or
SQLite. FILE is a TOML file naming the driver, the database, the query
(parameterised: %(user)s for PostgreSQL, :user for SQLite) and the pool:

    driver = "postgresql"
    dsn = "host=/run/postgresql dbname=mail user=mailgw"
    password_query = "SELECT password FROM users WHERE login = %(user)s"
    pool_size = 4

Stored hashes: argon2id, bcrypt, SHA512-CRYPT, SHA256-CRYPT and Dovecot's
{SCHEME} values. `mechanisms = ["PLAIN", "LOGIN", "SCRAM-SHA-256"]` also
offers SCRAM-SHA-256 (for {SCRAM-SHA-256} or, with allow_plain, {PLAIN}
values); CRAM-MD5 needs {PLAIN} values and allow_plain. See docs/auth.md.
"""


@implementer(ICheckerFactory, IPlugin)
class SQLCheckerFactory:
    """Makes the C{sql:} checker (L{mailgw.auth.sql.makeSQLChecker})."""

    authType = "sql"
    authHelp = _sqlHelp
    argStringFormat = "FILE"
    credentialInterfaces = (IUsernamePassword, IUsernameHashedPassword, IScramCredentials)

    def generateChecker(self, argstring: str) -> Any:
        """
        @raise ValueError: no file given, or it cannot be read or used (the
            message names the file and key), or the driver's library is
            missing. The database itself is not contacted: a database down
            at start-up answers 454 until it is back.
        """
        from mailgw.auth.sql import loadSQLSettings, makeSQLChecker

        if not argstring:
            raise ValueError("sql: needs its settings file: --auth sql:FILE")
        settings = loadSQLSettings(argstring)
        if settings.driver == "postgresql":
            try:
                import psycopg  # noqa: F401
            except ImportError:
                raise ValueError(
                    f"{argstring}: driver: postgresql needs psycopg (pip install 'mailgw[sql]')"
                ) from None
        from twisted.internet import reactor

        return makeSQLChecker(settings, reactor)


theSQLCheckerFactory = SQLCheckerFactory()

_ldapHelp = """
Checks logins by binding to an LDAP directory as the user, over ldaps:// or
StartTLS with the server's certificate verified. FILE is a TOML file:

    uri = "ldap://ldap.example.org"
    start_tls = true
    ca_file = "/etc/ssl/certs/ca-certificates.crt"
    bind_dn = "uid={user},ou=people,dc=example,dc=org"

or, to search for the user's entry first (bound as a service account):

    base = "ou=people,dc=example,dc=org"
    filter = "(&(objectClass=inetOrgPerson)(mail={user}))"
    service_dn = "cn=mailgw,ou=services,dc=example,dc=org"
    service_password_file = "/etc/mailgw/ldap.secret"

See docs/auth.md.
"""


@implementer(ICheckerFactory, IPlugin)
class LDAPCheckerFactory:
    """Makes the C{ldap:} checker (L{mailgw.auth.ldap.LDAPChecker})."""

    authType = "ldap"
    authHelp = _ldapHelp
    argStringFormat = "FILE"
    credentialInterfaces = (IUsernamePassword,)

    def generateChecker(self, argstring: str) -> Any:
        """
        @raise ValueError: no file given, or it cannot be read or used (the
            message names the file and key), or ldap3 is missing. The
            directory itself is not contacted: one down at start-up answers
            454 until it is back.
        """
        if not argstring:
            raise ValueError("ldap: needs its settings file: --auth ldap:FILE")
        try:
            import ldap3  # noqa: F401
        except ImportError:
            raise ValueError("ldap: needs ldap3 (pip install 'mailgw[ldap]')") from None
        from twisted.internet import reactor

        from mailgw.auth.ldap import loadLDAPSettings, makeLDAPChecker

        return makeLDAPChecker(loadLDAPSettings(argstring), reactor)


theLDAPCheckerFactory = LDAPCheckerFactory()


_dovecotHelp = """
Checks logins with a running Dovecot's auth service, as Postfix does with
smtpd_sasl_type = dovecot:

    dovecot:/var/spool/postfix/private/auth     a UNIX socket (unix_listener)
    dovecot:tcp:127.0.0.1:12345                 TCP (inet_listener)

PLAIN and LOGIN are passed to Dovecot as PLAIN with service=smtp, secured
and the client's address; EHLO offers them while Dovecot lists PLAIN.
CRAM-MD5 and SCRAM-SHA-256 exchanges are relayed to Dovecot (it makes the
challenges and checks the answers) while its handshake lists them, unless
another backend (a passwd: file with CRAM or SCRAM secrets) serves them.
While Dovecot cannot be reached or does not answer within 30 seconds,
logins get 454 4.7.0 and mailgw reconnects by itself, with a back-off.
"""


@implementer(ICheckerFactory, IPlugin)
class DovecotCheckerFactory:
    """Makes L{mailgw.auth.dovecot.DovecotChecker}s on the global reactor."""

    authType = "dovecot"
    authHelp = _dovecotHelp
    argStringFormat = "PATH or tcp:HOST:PORT"
    credentialInterfaces = (IUsernamePassword, IRelayedCredentials)

    def generateChecker(self, argstring: str) -> Any:
        """
        @raise ValueError: no socket given, or a malformed C{tcp:} address.
        """
        from twisted.internet import reactor
        from twisted.internet.endpoints import (
            HostnameEndpoint,
            TCP4ClientEndpoint,
            TCP6ClientEndpoint,
            UNIXClientEndpoint,
        )

        from mailgw.auth.dovecot import DovecotChecker

        endpoint: Any
        if not argstring:
            raise ValueError("dovecot: needs Dovecot's auth socket: --auth dovecot:PATH")
        if argstring.startswith("tcp:"):
            host, _, port = argstring[len("tcp:") :].rpartition(":")
            host = host.strip("[]")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"dovecot:{argstring}: expected dovecot:tcp:HOST:PORT")
            kind = _ipVersion(host)
            if kind == 4:
                endpoint = TCP4ClientEndpoint(reactor, host, int(port), timeout=10)
            elif kind == 6:
                endpoint = TCP6ClientEndpoint(reactor, host, int(port), timeout=10)
            else:
                endpoint = HostnameEndpoint(reactor, host, int(port), timeout=10)
        else:
            endpoint = UNIXClientEndpoint(reactor, argstring, timeout=10)
        return DovecotChecker(endpoint, reactor)


def _ipVersion(host: str) -> int:
    import ipaddress

    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return 0


theDovecotCheckerFactory = DovecotCheckerFactory()
