"""
The C{ldap:} backend: a login is checked by binding to the directory as the
user (with C{ldap3}), either to a DN made from the login (C{bind_dn}) or to
the one entry a search finds (C{base} and C{filter}, searched bound as a
service account); and the directory as a source of the addresses each login
may send as (L{LDAPDirectory.senders}). Settings: L{mailgw.auth.ldapconfig}.

Every connection is TLS (ldaps:// or StartTLS) with the server's
certificate verified against the configured CA file and its name checked.
Requests run in a bounded pool of threads, each on a connection from a
bounded pool (one for user binds, one for searches: a connection a user
bound on is never used to search). An empty password is refused before
the directory sees it: to LDAP, a simple bind with a DN and no password is
an "unauthenticated bind" that many servers accept (RFC 4513 5.1.2).
"""

from __future__ import annotations

import ipaddress
import math
import ssl
import threading
from collections.abc import Callable
from typing import Any

import attrs
from cryptography import x509
from service_identity import VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailgw.auth.ldapconfig import (
    LDAPSettings,
    LDAPSettingsError,
    escapeDNValue,
    escapeFilterValue,
    fillTemplate,
    loadLDAPSettings,
)
from mailgw.auth.workers import IRetirable, Outages, SharedByKey, Workers

__all__ = [
    "LDAPChecker",
    "LDAPDirectory",
    "LDAPSettings",
    "LDAPSettingsError",
    "LDAPUnavailable",
    "loadLDAPSettings",
]

#: Bind results that mean "not this user with this password" (RFC 4511
#: 4.1.9): invalidCredentials, insufficientAccessRights, unwillingToPerform
#: (an account locked or disabled by the server's policy).
_REFUSED = {49, 50, 53}
_SUCCESS, _SIZE_LIMIT, _NO_SUCH_OBJECT = 0, 4, 32
MAX_SENDERS = 1000


class LDAPUnavailable(Exception):
    """
    The directory cannot answer now (unreachable, TLS or certificate
    failure, the service bind refused, a server error): transient, 454
    4.7.0. The message is for the log only.
    """


def _ldapErrors() -> tuple[type[BaseException], ...]:
    from ldap3.core.exceptions import LDAPException

    return (LDAPException, OSError, ssl.SSLError)


@attrs.define
class LDAPDirectory:
    """The directory of ``settings``, asked in threads of ``reactor``."""

    settings: LDAPSettings
    reactor: Any
    workers: Workers = attrs.field(init=False)
    _idle: dict[str, list[Any]] = attrs.field(
        init=False, factory=lambda: {"bind": [], "search": []}
    )
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)
    _outages: Outages = attrs.field(init=False)
    log = Logger()

    def __attrs_post_init__(self) -> None:
        self._outages = Outages(self.settings.source, "directory", LDAPUnavailable, self.log)
        self.workers = Workers(self.reactor, self.settings.poolSize, f"mailgw-ldap-{id(self):x}")
        self.workers.onClose(self._closeIdle)

    def close(self) -> None:
        """Stop the threads and close the idle connections."""
        self.workers.close()

    def _closeIdle(self) -> None:
        with self._lock:
            idle = [c for conns in self._idle.values() for c in conns]
            self._idle = {"bind": [], "search": []}
        for conn in idle:
            _unbind(conn)

    # Connections (all in pool threads).

    def _server(self) -> Any:
        import ldap3

        s = self.settings
        tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=s.caFile or None, sni=s.host)
        return ldap3.Server(
            s.host, s.port, use_ssl=s.ldaps, tls=tls, get_info=ldap3.NONE,
            connect_timeout=s.timeout,
        )  # fmt: skip

    def _open(self) -> Any:
        """A new connection with TLS on and the server's name checked. @raise LDAPUnavailable"""
        import ldap3

        conn = ldap3.Connection(
            self._server(), auto_bind=ldap3.AUTO_BIND_NONE, read_only=True,
            # ldap3 packs the receive timeout as whole seconds.
            receive_timeout=max(1, math.ceil(self.settings.timeout)),
            raise_exceptions=False, auto_referrals=False,
        )  # fmt: skip
        try:
            if not conn.open() and conn.closed:
                raise LDAPUnavailable("cannot connect")
            if self.settings.startTLS and not conn.start_tls():
                raise LDAPUnavailable(f"StartTLS refused: {conn.result}")
            self._checkPeer(conn)
        except BaseException:
            _unbind(conn)
            raise
        return conn

    def _checkPeer(self, conn: Any) -> None:
        """ldap3 checks names only in some paths: check the certificate's name here too."""
        sock = conn.socket
        der = sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
        if der is None:
            raise LDAPUnavailable("no TLS on the connection")
        certificate = x509.load_der_x509_certificate(der)
        host = self.settings.host
        try:
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                verify_certificate_hostname(certificate, host)
            else:
                verify_certificate_ip_address(certificate, str(address))
        except VerificationError:
            raise LDAPUnavailable(f"the server's certificate is not valid for {host}") from None

    def _take(self, kind: str) -> tuple[Any, bool]:
        with self._lock:
            if self._idle[kind]:
                return self._idle[kind].pop(), True
        conn = self._open()
        if kind == "search" and self.settings.serviceDN:
            conn.user, conn.password = self.settings.serviceDN, self.settings.servicePassword
            conn.authentication = "SIMPLE"
            if not conn.bind():
                _unbind(conn)
                raise LDAPUnavailable(f"service bind refused: {conn.result.get('description')}")
        return conn, False

    def _give(self, kind: str, conn: Any) -> None:
        with self._lock:
            if len(self._idle[kind]) < self.settings.poolSize:
                self._idle[kind].append(conn)
                return
        _unbind(conn)

    def _withConnection(self, kind: str, operation: Any) -> Any:
        """
        ``operation(conn)`` on a pooled connection; a reused one that fails
        (the server restarted) is replaced once. @raise LDAPUnavailable
        """
        errors = _ldapErrors()
        for attempt in (1, 2):
            reused = False
            try:
                conn, reused = self._take(kind)
                try:
                    result = operation(conn)
                except BaseException:
                    _unbind(conn)
                    raise
                self._give(kind, conn)
                return result
            except errors as e:
                if reused and attempt == 1:
                    continue
                raise LDAPUnavailable(f"{type(e).__name__}: {e}") from None
            except LDAPUnavailable:
                if reused and attempt == 1:
                    continue
                raise
        raise AssertionError("unreachable")

    def _bind(self, dn: str, password: bytes) -> bool:
        """Whether the directory accepts ``dn`` with ``password``. @raise LDAPUnavailable"""

        def bind(conn: Any) -> bool:
            conn.user, conn.password, conn.authentication = dn, password, "SIMPLE"
            if conn.bind():
                return True
            code = conn.result.get("result")
            if code in _REFUSED:
                return False
            raise LDAPUnavailable(f"bind failed: {conn.result.get('description')} ({code})")

        return bool(self._withConnection("bind", bind))

    def _search(
        self, base: str, filter: str, attributes: list[str], limit: int
    ) -> list[tuple[str, dict[str, Any]]]:
        """The entries found (at most ``limit``). @raise LDAPUnavailable"""
        import ldap3

        def search(conn: Any) -> list[tuple[str, dict[str, Any]]]:
            conn.search(
                base, filter, search_scope=ldap3.SUBTREE,
                attributes=attributes or ldap3.NO_ATTRIBUTES, size_limit=limit,
                time_limit=max(1, int(self.settings.timeout)),
            )  # fmt: skip
            code = conn.result.get("result")
            if code not in (_SUCCESS, _SIZE_LIMIT, _NO_SUCH_OBJECT):
                raise LDAPUnavailable(f"search failed: {conn.result.get('description')} ({code})")
            return [
                (r["dn"], dict(r.get("attributes") or {}))
                for r in conn.response or []
                if r.get("type") == "searchResEntry"
            ]

        return list(self._withConnection("search", search))

    # The requests (run in pool threads).

    def _check(self, login: str, password: bytes) -> str | None:
        """The login as the directory names it, or None. @raise LDAPUnavailable"""
        s = self.settings
        if s.bindDN:
            return (
                login
                if self._bind(fillTemplate(s.bindDN, login, escapeDNValue), password)
                else None
            )
        filter = fillTemplate(s.filter, login, escapeFilterValue)
        attributes = [s.loginAttribute] if s.loginAttribute else []
        entries = self._search(s.base, filter, attributes, 2)
        if len(entries) != 1:
            if entries:
                self.log.error(
                    "{source}: the filter finds several entries for {login!r}: refused",
                    source=s.source,
                    login=login,
                )
            return None
        dn, found = entries[0]
        if not self._bind(dn, password):
            return None
        value = found.get(s.loginAttribute) if s.loginAttribute else None
        if isinstance(value, list):
            value = value[0] if value else None
        return value if isinstance(value, str) and value else login

    def _senders(self, login: str) -> list[str]:
        s = self.settings
        filter = fillTemplate(s.sendersFilter, login, escapeFilterValue)
        entries = self._search(s.sendersBase, filter, list(s.sendersAttributes), MAX_SENDERS)
        values: list[str] = []
        for _, found in entries:
            for attribute in s.sendersAttributes:
                value = found.get(attribute, [])
                values.extend(str(v) for v in (value if isinstance(value, list) else [value]))
        return values[:MAX_SENDERS]

    # On the reactor thread.

    def _run(self, f: Any, *args: Any) -> defer.Deferred[Any]:
        return self._outages.watch(self.workers.run(f, *args))

    def check(self, login: str, password: bytes) -> defer.Deferred[str | None]:
        """
        Whether ``password`` is ``login``'s: the login as the directory
        names it, or None. @raise LDAPUnavailable: (in the Deferred).
        """
        return self._run(self._check, login, password)

    def senders(self, login: str) -> defer.Deferred[list[str]]:
        """The values of the C{senders_attributes} of the entries C{senders_filter} finds."""
        return self._run(self._senders, login)


_directories = SharedByKey()


def sharedDirectory(settings: LDAPSettings, reactor: Any) -> LDAPDirectory:
    """
    The open L{LDAPDirectory} of ``settings`` on ``reactor``, made on first
    use: checkers made again by a reload, and the sender map of the same
    file, share its threads and connections.
    """
    return _directories.get(settings, reactor, lambda: LDAPDirectory(settings, reactor))  # type: ignore[no-any-return]


def makeLDAPChecker(settings: LDAPSettings, reactor: Any) -> LDAPChecker:
    """
    The C{ldap:} checker over the shared L{LDAPDirectory} of ``settings``,
    held until the checker is retired (a reload replaced it): then the
    directory's pool closes once no checker holds it and its binds under
    way are done.
    """
    directory = _directories.acquire(settings, reactor, lambda: LDAPDirectory(settings, reactor))
    return LDAPChecker(directory, lambda: _directories.release(settings, reactor, directory))


def _unbind(conn: Any) -> None:
    try:
        conn.unbind()
    except Exception:
        pass


@implementer(ICredentialsChecker, IRetirable)
@attrs.define
class LDAPChecker:
    """
    Checks plain passwords (PLAIN, LOGIN) by binding to ``directory``.

    Wrong password, unknown user, empty password and a user name that is
    not UTF-8 fail with L{UnauthorizedLogin} (535); a directory that
    cannot answer with L{LDAPUnavailable} (454).
    """

    credentialInterfaces = (IUsernamePassword,)

    directory: LDAPDirectory
    release: Callable[[], None] | None = None

    def retire(self) -> None:
        release, self.release = self.release, None
        if release is not None:
            release()

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[bytes | tuple[()]]:
        if not IUsernamePassword.providedBy(credentials):
            return defer.fail(UnhandledCredentials(f"cannot check {type(credentials).__name__}"))
        password: bytes = credentials.password
        raw: bytes | str = credentials.username
        try:
            login = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError:
            return defer.fail(UnauthorizedLogin())
        if not password:
            return defer.fail(UnauthorizedLogin())  # never an unauthenticated bind
        # Blanks around a login are insignificant to LDAP matching rules
        # (RFC 4518 2.6.1): " alice" would bind as alice under another name.
        if not login or login != login.strip() or not login.isprintable():
            return defer.fail(UnauthorizedLogin())

        def answered(name: str | None) -> bytes | tuple[()]:
            if name is None:
                raise UnauthorizedLogin()
            return name.encode("utf-8")

        return self.directory.check(login, password).addCallback(answered)
