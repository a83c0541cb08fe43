"""
The ``[dkim]`` section: which sender domains are signed, with which
selector, key file and algorithm, which header fields are signed and which
are oversigned. Read by L{mailgw.config}; the key files themselves are read
by L{mailgw.dkim.keys} (at start, on reload and by ``mailgw check-config``).

    [[dkim.domains]]
    domain = "example.org"
    selector = "mail2026"
    key_file = "/etc/mailgw/dkim/example.org.mail2026.key"
    algorithm = "rsa-sha256"            # or "ed25519-sha256" (RFC 8463)
    # headers = [...]                   # DEFAULT_HEADERS
    # oversign = ["from"]
    # canonicalization = "relaxed/relaxed"

One domain may have several entries (with different selectors): each adds
its own signature, e.g. an RSA and an Ed25519 one (RFC 8463 3).
"""

from __future__ import annotations

import re
from typing import Any

import attrs
import idna

from mailgw._configparse import _choice, _Invalid, _nonEmpty, _Table

ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
CANONICALIZATIONS = ("relaxed/relaxed", "relaxed/simple", "simple/relaxed", "simple/simple")

#: RFC 6376 5.4.1's list (as dkimpy's and OpenDKIM's defaults), plus
#: List-Unsubscribe-Post, which RFC 8058 3.1 requires to be signed.
DEFAULT_HEADERS = (
    "from",
    "sender",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "to",
    "cc",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "content-id",
    "content-description",
    "resent-date",
    "resent-from",
    "resent-sender",
    "resent-to",
    "resent-cc",
    "resent-message-id",
    "in-reply-to",
    "references",
    "list-id",
    "list-help",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "list-subscribe",
    "list-post",
    "list-owner",
    "list-archive",
)

#: Fields added or removed in transit (RFC 6376 5.4.1 "SHOULD NOT" sign):
#: signing them would break the signature on its way.
NEVER_SIGNED = (
    "return-path",
    "received",
    "comments",
    "keywords",
    "bcc",
    "resent-bcc",
    "dkim-signature",
)

_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+\Z")  # RFC 5322 3.6.8 ftext
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")


@attrs.frozen
class DomainSigning:
    """One signature to add to the mail of one sender domain."""

    domain: str  # lower case, A-labels
    selector: str
    keyFile: str
    algorithm: str = "rsa-sha256"
    headers: tuple[str, ...] = DEFAULT_HEADERS  # lower case
    oversign: tuple[str, ...] = ("from",)  # lower case
    canonicalization: str = "relaxed/relaxed"


@attrs.frozen
class DKIMConfig:
    """Every signature to add, in the order of the file; empty: no signing."""

    domains: tuple[DomainSigning, ...] = ()

    def forDomain(self, domain: str) -> tuple[DomainSigning, ...]:
        """The signatures for sender domain C{domain} (lower case, A-labels)."""
        return tuple(d for d in self.domains if d.domain == domain)


def signingDomain(name: str) -> str:
    """
    C{name} lower-cased, as A-labels (IDNA 2008 with UTS 46 mapping), as
    the d= tag and the From: domain are compared.

    @raise ValueError: not a domain name.
    """
    try:
        ascii = idna.encode(name.rstrip("."), uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError) as e:
        raise ValueError(f"not a valid domain name ({e})") from None
    if "." not in ascii:
        raise ValueError("not a valid domain name (one label only)")
    return ascii


def _domain(value: Any) -> str:
    try:
        return signingDomain(_nonEmpty(value))
    except ValueError as e:
        raise _Invalid(f"{e}, got {value!r}") from None


def _selector(value: Any) -> str:
    text = _nonEmpty(value)
    if len(text) > 63 or not all(_LABEL.match(label) for label in text.split(".")):
        raise _Invalid(f"must be a DNS name such as 'mail2026' (RFC 6376 3.1), got {value!r}")
    return text.lower()


def _fieldNames(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Invalid(f"must be a list of header field names, got {value!r}")
    names: list[str] = []
    for name in value:
        if not _FIELD_NAME.match(name):
            raise _Invalid(f"{name!r} is not a header field name")
        if name.lower() in NEVER_SIGNED:
            raise _Invalid(f"{name!r} changes in transit and must not be signed (RFC 6376 5.4.1)")
        if name.lower() not in names:
            names.append(name.lower())
    return tuple(names)


def _entry(t: _Table) -> DomainSigning:
    for name in ("domain", "selector", "key_file"):
        if name not in t.data:
            raise t.error(name, "must be set")
    entry = DomainSigning(
        domain=t.get("domain", _domain, ""),
        selector=t.get("selector", _selector, ""),
        keyFile=t.get("key_file", _nonEmpty, ""),
        algorithm=t.get("algorithm", _choice(*ALGORITHMS), "rsa-sha256"),
        headers=t.get("headers", _fieldNames, DEFAULT_HEADERS),
        oversign=t.get("oversign", _fieldNames, ("from",)),
        canonicalization=t.get("canonicalization", _choice(*CANONICALIZATIONS), "relaxed/relaxed"),
    )
    if "from" not in entry.headers:
        # RFC 6376 5.4: "The From header field MUST be signed".
        raise t.error("headers", "must include 'from' (RFC 6376 5.4)")
    return entry


def dkimSection(t: _Table) -> DKIMConfig:
    """The ``[dkim]`` table; L{mailgw.config} calls it (ConfigError on a bad value)."""
    t.used.add("domains")
    entries = t.data.get("domains", [])
    if not isinstance(entries, list):
        raise t.error("domains", "must be an array of tables: [[dkim.domains]]")
    domains: list[DomainSigning] = []
    for index, data in enumerate(entries):
        sub = _Table.of(t.source, f"{t.key('domains')}[{index}]", data)
        entry = _entry(sub)
        sub.finish()
        for other in domains:
            if (other.domain, other.selector) == (entry.domain, entry.selector):
                raise sub.error("selector", f"{entry.domain} has selector {entry.selector!r} twice")
        domains.append(entry)
    return DKIMConfig(tuple(domains))
