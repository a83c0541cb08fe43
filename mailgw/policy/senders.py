"""
Sender ownership: which envelope senders (and header From: addresses) an
authenticated user may use, like Postfix's C{smtpd_sender_login_maps} with
C{reject_sender_login_mismatch}.

A user may send as their own login when it is an address, and as whatever
the sender login map lists for that login (addresses, C{@domain}, C{*}).
Addresses are compared in a canonical form (L{canonicalAddress}) so that
quoting, backslash escapes, letter case, Unicode normalisation and U-label
versus A-label domains cannot make one address look like another.
"""

from __future__ import annotations

import email.policy
import ipaddress
import os
import re
import unicodedata
from collections.abc import Callable
from typing import Any

import attrs
import idna
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.address import AddressError, parseMailbox
from mailgw.config import normalizeDomain
from mailgw.envelope import Address, Envelope, Session
from mailgw.interfaces import ISubmissionPolicy
from mailgw.policy.accept import AcceptAll
from mailgw.replies import SMTPReply

# RFC 5322 3.2.3 dot-atom, with any non-ASCII character as atext (RFC 6532 3.2).
_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\u0080-\U0010ffff"
_DOT_ATOM = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*\Z")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_HEADER_NAME = re.compile(r"([^:\s]+)[ \t]*:(.*)\Z", re.DOTALL)
# Defects that do not change which addresses the field holds: obsolete syntax
# (RFC 5322 4.4: CFWS around dots, routes) and UTF-8 local parts (RFC 6532).
_HARMLESS_DEFECTS = {"ObsoleteHeaderDefect", "NonASCIILocalPartDefect"}
_STAT_INTERVAL = 1.0
#: A ``sender_login_maps`` value with one of these prefixes names a backend
#: settings file to read the map from (mailgw.auth.sendermap), not a map file.
SOURCE_PREFIXES = ("sql:", "ldap:")
_SOURCE_UNAVAILABLE = SMTPReply(451, "4.3.0", "Sender ownership cannot be checked now, try later")
_MAX_SHOWN = 200


def _unquoteLocal(local: str) -> str:
    """The content of a quoted local part, backslash escapes resolved."""
    if len(local) < 2 or not (local.startswith('"') and local.endswith('"')):
        return local
    out, escaped = [], False
    for char in local[1:-1]:
        if escaped or char != "\\":
            out.append(char)
            escaped = False
        else:
            escaped = True
    return "".join(out)


def _quote(content: str) -> str:
    """``content`` as a quoted string (RFC 5322 3.2.4)."""
    return '"' + content.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _canonicalLocal(content: str) -> str:
    """
    The canonical wire form of a local part whose unquoted content is
    ``content``: NFC (RFC 6532 3.1), lowercased, and quoted only when it is
    not a dot-atom (RFC 5321 4.1.2 prefers the unquoted form).
    """
    content = unicodedata.normalize("NFC", unicodedata.normalize("NFC", content).lower())
    if _DOT_ATOM.match(content):
        return content
    return _quote(content)


def _canonicalDomain(domain: str) -> tuple[str, bool]:
    """
    The canonical form of ``domain`` and whether it is an address literal.

    A domain IDNA cannot encode cannot be registered, so it keeps its form
    (ASCII letters lowercased) and can only ever equal itself.
    """
    if domain.startswith("["):
        inner = domain[1:-1]
        try:
            if inner[:5].lower() == "ipv6:":
                return f"[ipv6:{ipaddress.IPv6Address(inner[5:]).compressed}]", True
            return f"[{ipaddress.IPv4Address(inner)}]", True
        except ValueError:
            return domain.translate(_ASCII_LOWER), True
    try:
        return normalizeDomain(domain), False
    except (idna.IDNAError, UnicodeError, ValueError):
        return domain.translate(_ASCII_LOWER), False


def canonicalAddress(address: Address) -> str:
    """
    The form in which two addresses are compared: local part unquoted when
    its content is a dot-atom, backslash escapes resolved, Unicode NFC,
    lowercased; domain as a lowercase A-label (an address literal with its
    IP address in normal form). Never raises; idempotent.
    """
    local = _canonicalLocal(_unquoteLocal(address.local))
    return f"{local}@{_canonicalDomain(address.domain)[0]}"


@attrs.frozen
class Grant:
    """What one login may use: exact ``addresses`` and ``domains`` (both
    canonical), or ``anything``."""

    addresses: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset()
    anything: bool = False

    def merge(self, other: Grant) -> Grant:
        return Grant(
            self.addresses | other.addresses,
            self.domains | other.domains,
            self.anything or other.anything,
        )

    def allows(self, local: str, domain: str) -> bool:
        """May ``local`` (wire form) ``@`` ``domain`` be used?"""
        if self.anything:
            return True
        canonicalDomain, literal = _canonicalDomain(domain)
        if literal:
            return False  # only "*" covers an address literal
        canonical = f"{_canonicalLocal(_unquoteLocal(local))}@{canonicalDomain}"
        return canonicalDomain in self.domains or canonical in self.addresses


def _splitEntries(value: str) -> list[str]:
    """Split at commas and whitespace outside quoted strings."""
    items: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in value:
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif not quoted and (char == "," or char.isspace()):
            items.append("".join(current))
            current = []
            continue
        current.append(char)
    items.append("".join(current))
    return [item for item in items if item]


def _parseEntry(entry: str) -> Grant:
    """@raise ValueError: not C{*}, C{@domain} or an address."""
    if entry == "*":
        return Grant(anything=True)
    try:
        address = parseMailbox("x" + entry if entry[0] == "@" else entry, utf8=True)
        domain = normalizeDomain(address.domain)
    except (AddressError, idna.IDNAError, UnicodeError) as e:
        if entry.endswith("]"):
            raise ValueError(f"address literal in {entry!r}: only '*' allows those") from None
        raise ValueError(f"bad entry {entry!r}: not '*', '@domain' or an address") from e
    if entry[0] == "@":
        return Grant(domains=frozenset([domain]))
    return Grant(addresses=frozenset([canonicalAddress(address)]))


def parseSenderMap(text: bytes, source: str) -> dict[str, Grant]:
    """
    Parse a sender login map (``login: entry, entry ...`` a line).

    @raise ValueError: a line is malformed; the message names ``source`` and
        the line number.
    """
    grants: dict[str, Grant] = {}
    for number, raw in enumerate(text.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ValueError(f"{source}:{number}: not UTF-8") from None
        if not line or line.startswith("#"):
            continue
        login, colon, value = line.partition(":")
        login = login.strip()
        if not colon or not login or any(c.isspace() for c in login):
            raise ValueError(f"{source}:{number}: expected 'login: address, ...'")
        grant = grants.get(login, Grant())
        for entry in _splitEntries(value):
            try:
                grant = grant.merge(_parseEntry(entry))
            except ValueError as e:
                raise ValueError(f"{source}:{number}: {e}") from None
        grants[login] = grant
    return grants


def _shown(text: str) -> str:
    """``text`` safe for a reply line: ASCII, no controls, bounded."""
    text = "".join(c if c.isprintable() else "?" for c in text)
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "..."


def headerFromAddresses(headers: bytes) -> list[tuple[str, str]] | str:
    """
    The addresses of every ``From:`` field of the header section
    ``headers``, as (local part content, domain) pairs.

    @return: the list (empty without a From: field), or why the fields
        cannot be trusted: the parser had to guess, or decoded or reassembled
        an address (comments, folding or an encoded word inside it, which
        RFC 2047 5 forbids), so a mail reader may show another address than
        the one checked; or a field has no address, an address no domain.
        Never raises.
    """
    text = headers.decode("utf-8", "replace")
    fields: list[list[str]] = []
    for line in re.split(r"\r\n|\r|\n", text):
        if not line:
            break  # end of the header section (RFC 5322 2.1)
        if line[0] in " \t":
            if fields:
                fields[-1].append(line)  # unfolding (RFC 5322 2.2.3)
            continue
        fields.append([line])
    found: list[tuple[str, str]] = []
    for field in fields:
        match = _HEADER_NAME.match("".join(field))
        # RFC 5322 4.5.2 (obs-optional) allows blanks before the colon.
        if match is None or match.group(1).casefold() != "from":
            continue
        value = match.group(2).strip()
        try:
            header: Any = email.policy.default.header_factory("From", value)
            addresses = [(a.username, a.domain) for a in header.addresses]
            if {type(d).__name__ for d in header.defects} - _HARMLESS_DEFECTS:
                raise ValueError("the parser had to guess")
        except Exception:  # whatever the parser makes of junk, it is refused
            return "Header From: cannot be parsed"
        if not addresses:
            return "Header From: holds no address"
        for local, domain in addresses:
            if not domain:
                return f"Header From: address <{_shown(local)}> has no domain"
            if "=?" in local or "=?" in domain:
                return "Header From: has an encoded word in an address"
            # The parser decodes encoded words and drops comments and
            # folding inside an addr-spec; a reader may not. Check only
            # addresses that stand in the field exactly as checked.
            if f"{local}@{domain}" not in value and f"{_quote(local)}@{domain}" not in value:
                return "Header From: write each address plainly, as local@domain"
        found.extend(addresses)
    return found


def _optionalPath(mapPath: str | None) -> str | None:
    return mapPath or None  # the configuration's empty string means "no map"


@implementer(ISubmissionPolicy)
@attrs.define
class SenderLoginPolicy(AcceptAll):
    """
    Lets each authenticated user use only the senders they own.

    Refusals are permanent (5xx): the user must change the sender, or the
    operator the map. A map file that becomes unreadable or broken after
    start keeps the last good map in force (and the error is logged), so an
    editing mistake neither stops mail nor opens it up.

    C{SenderLoginPolicy(mapPath, *, checkHeaderFrom=False,
    allowNullSender=False, clock=None)}: ``mapPath`` None or empty means no
    map (each user may send only as their own login); with a ``clock`` the
    file is checked for changes at most once a second, without one at every
    check. Raises ValueError when the map cannot be read or parsed at
    start (the message names the file and line).

    A ``mapPath`` of C{sql:FILE} or C{ldap:FILE} reads the map from the
    database or directory of that backend settings file instead
    (L{mailgw.auth.sendermap}; ``clock`` must then be the reactor); a
    ``source`` (anything with ``grant(login) -> Deferred[Grant]``) is asked
    besides the file. A source that cannot answer makes the check fail
    with C{451 4.3.0}.
    """

    _mapPath: str | None = attrs.field(converter=_optionalPath)
    _checkHeaderFrom: bool = attrs.field(default=False, kw_only=True)
    _allowNullSender: bool = attrs.field(default=False, kw_only=True)
    _clock: IReactorTime | None = attrs.field(default=None, kw_only=True)
    _source: Any = attrs.field(default=None, kw_only=True)
    _grants: dict[str, Grant] | None = attrs.field(default=None, init=False)
    _signature: tuple[int, int, int] | None = attrs.field(default=None, init=False)
    _nextStat: float = attrs.field(default=0.0, init=False)
    _lastProblem: str | None = attrs.field(default=None, init=False)
    _failedSignature: tuple[int, int, int] | None = attrs.field(default=None, init=False)
    log = Logger()

    def __attrs_post_init__(self) -> None:
        if self._mapPath is not None and self._mapPath.startswith(SOURCE_PREFIXES):
            from mailgw.auth.sendermap import openSenderSource

            self._source = openSenderSource(self._mapPath, self._clock)
            self._mapPath = None
        if self._mapPath is not None:
            self._read(self._mapPath)
            if self._clock is not None:
                self._nextStat = self._clock.seconds() + _STAT_INTERVAL

    def _read(self, path: str) -> None:
        """Load the map (fstat: the signature of what was read). @raise ValueError"""
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except OSError as e:
            raise ValueError(f"{path}: cannot read sender login map: {e.strerror}") from None
        self._grants = parseSenderMap(data, path)
        self._signature = (st.st_mtime_ns, st.st_size, st.st_ino)

    def _refresh(self) -> None:
        """Re-read the map if the file changed; on failure keep the last good one."""
        path = self._mapPath
        if path is None:
            return
        if self._clock is not None:
            if self._clock.seconds() < self._nextStat:
                return
            self._nextStat = self._clock.seconds() + _STAT_INTERVAL
        try:
            st = os.stat(path)
        except OSError as e:
            self._problem(f"{path}: {e.strerror}")
            return
        signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        if signature == self._signature:
            self._lastProblem = None
            return
        if signature == self._failedSignature:
            return  # still the broken version: do not parse it again
        try:
            self._read(path)
        except ValueError as e:
            self._failedSignature = signature
            self._problem(str(e))
            return
        self._failedSignature = self._lastProblem = None
        self.log.info("sender login map reloaded from {path}", path=path)

    def _problem(self, problem: str) -> None:
        if problem != self._lastProblem:  # once per problem, not once a second
            self.log.error(
                "sender login map not reloaded, last good map kept: {problem}", problem=problem
            )
            self._lastProblem = problem

    def grantFor(self, login: str) -> Grant:
        """Everything ``login`` may use as a sender, map re-read if changed."""
        self._refresh()
        grant = Grant()
        try:
            own = parseMailbox(login, utf8=True)
        except AddressError:
            pass  # not an address: the map alone decides
        else:
            if not own.domain.startswith("["):
                grant = Grant(addresses=frozenset([canonicalAddress(own)]))
        # Logins are looked up exactly: the auth backend decides their case.
        return grant.merge((self._grants or {}).get(login, Grant()))

    def _withSource(self, login: str, check: Callable[[Grant], SMTPReply | None]) -> Any:
        """``check(grant)``, the source's grant merged in when there is a source."""
        grant = self.grantFor(login)
        if self._source is None:
            return check(grant)

        def unavailable(failure: Failure) -> SMTPReply:
            self.log.error(
                "sender login map source cannot answer for {user!r}: {problem}",
                user=login,
                problem=failure.getErrorMessage(),
            )
            return _SOURCE_UNAVAILABLE

        d = defer.maybeDeferred(self._source.grant, login)
        return d.addCallbacks(lambda found: check(grant.merge(found)), unavailable)

    def _refuse(
        self, session: Session, what: str, sender: str, reason: str, reply: SMTPReply
    ) -> SMTPReply:
        self.log.info(
            "{what} refused ({reason}): user={user!r} sender={sender!r} client={client}",
            what=what,
            reason=reason,
            user=session.user,
            sender=sender,
            client=session.clientAddress,
            session=session.sessionId,
        )
        return reply

    def checkSender(
        self, session: Session, sender: Address | None
    ) -> Any:  # SMTPReply | None, or a Deferred of either when there is a source
        login = session.user
        if login is None:
            return None  # the server requires AUTH before MAIL itself
        if sender is None:
            if self._allowNullSender:
                return None
            text = f"Sender <> not allowed for user <{_shown(login)}>"
            reply = SMTPReply(553, "5.7.1", text)
            return self._refuse(session, "MAIL FROM", "<>", "null sender not allowed", reply)

        def check(grant: Grant) -> SMTPReply | None:
            if grant.allows(sender.local, sender.domain):
                return None
            text = f"Sender address <{_shown(str(sender))}> not owned by user <{_shown(login)}>"
            reply = SMTPReply(553, "5.7.1", text)
            return self._refuse(session, "MAIL FROM", f"<{sender}>", "not owned", reply)

        return self._withSource(login, check)

    def checkMessage(
        self, session: Session, envelope: Envelope, headers: bytes
    ) -> Any:  # SMTPReply | None, or a Deferred of either when there is a source
        login = session.user
        if not self._checkHeaderFrom or login is None:
            return None
        found = headerFromAddresses(headers)
        if isinstance(found, str):
            reason = found.removeprefix("Header From: ")
            return self._refuse(session, "header From", "", reason, SMTPReply(550, "5.7.1", found))
        if not found:
            return None  # RFC 6409 8.1 lets an MSA add From:; we leave that to the client
        return self._withSource(login, lambda grant: self._checkFrom(session, login, found, grant))

    def _checkFrom(
        self, session: Session, login: str, found: list[tuple[str, str]], grant: Grant
    ) -> SMTPReply | None:
        for local, domain in found:
            # The email package hands back the unquoted content: quote it
            # so that it reads as a wire-form local part again.
            quoted = _quote(local)
            if not grant.allows(quoted, domain):
                shown = f"{local}@{domain}" if _DOT_ATOM.match(local) else f"{quoted}@{domain}"
                text = f"Header From: address <{_shown(shown)}> not owned by user <{_shown(login)}>"
                reply = SMTPReply(550, "5.7.1", text)
                return self._refuse(session, "header From", f"<{shown}>", "not owned", reply)
        return None
