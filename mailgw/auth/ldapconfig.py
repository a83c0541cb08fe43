"""
The settings of the C{ldap:} backend (a small TOML file), and the escaping
its templates need: RFC 4514 for a value put into a DN, RFC 4515 for a
value put into a search filter.

    uri = "ldap://ldap.example.org"      # or "ldaps://ldap.example.org"
    start_tls = true                     # required with ldap://
    ca_file = "/etc/ssl/certs/ca-certificates.crt"
    # Either bind directly to a DN made from the login:
    bind_dn = "uid={user},ou=people,dc=example,dc=org"
    # or search for the user's entry, then bind to it:
    base = "ou=people,dc=example,dc=org"
    filter = "(&(objectClass=inetOrgPerson)(mail={user}))"
    service_dn = "cn=mailgw,ou=services,dc=example,dc=org"
    service_password_file = "/etc/mailgw/ldap.secret"
"""

from __future__ import annotations

import re
import tomllib
import urllib.parse
from typing import Any

import attrs

__all__ = [
    "LDAPSettings",
    "LDAPSettingsError",
    "escapeDNValue",
    "escapeFilterValue",
    "fillTemplate",
    "loadLDAPSettings",
]

PARAMETERS = ("user", "localpart", "domain")
_FIELD = re.compile(r"\{([^{}]*)\}")
_KEYS = {
    "uri", "start_tls", "ca_file", "bind_dn", "base", "filter", "service_dn", "service_password",
    "service_password_file", "login_attribute", "senders_base", "senders_filter",
    "senders_attributes", "pool_size", "timeout",
}  # fmt: skip


class LDAPSettingsError(ValueError):
    """The settings file cannot be used; the message names file, key and problem."""


def escapeDNValue(value: str) -> str:
    """
    ``value`` as an RFC 4514 attribute value: ``"+,;<>\\=`` and NUL
    escaped, and a leading ``#`` or space and a trailing space.
    """
    out = []
    for i, char in enumerate(value):
        if char == "\x00":
            out.append("\\00")
        elif (
            char in '"+,;<>\\='
            or (i == 0 and char in "# ")
            or (i == len(value) - 1 and char == " ")
        ):
            out.append("\\" + char)
        else:
            out.append(char)
    return "".join(out)


def escapeFilterValue(value: str) -> str:
    """``value`` for an RFC 4515 filter: ``*()\\`` and NUL as ``\\XX``."""
    return "".join(f"\\{ord(c):02x}" if c in "*()\\\x00" else c for c in value)


def parameters(login: str) -> dict[str, str]:
    """The values a template may use: the login, and its parts around the last ``@``."""
    local, at, domain = login.rpartition("@")
    if not at:
        return {"user": login, "localpart": login, "domain": ""}
    return {"user": login, "localpart": local, "domain": domain}


def fillTemplate(template: str, login: str, escape: Any) -> str:
    """``template`` with ``{user}``, ``{localpart}``, ``{domain}`` replaced by escaped values."""
    values = parameters(login)
    return _FIELD.sub(lambda m: escape(values[m.group(1)]), template)


def _checkTemplate(path: str, key: str, template: object, parse: Any = None) -> str:
    if not isinstance(template, str) or not template.strip():
        raise LDAPSettingsError(f"{path}: {key}: must be a non-empty string")
    names = _FIELD.findall(template)
    unknown = set(names) - set(PARAMETERS)
    if unknown:
        raise LDAPSettingsError(
            f"{path}: {key}: unknown field(s) {', '.join(sorted('{' + n + '}' for n in unknown))};"
            " known: {user}, {localpart}, {domain}"
        )
    if not names:
        raise LDAPSettingsError(f"{path}: {key}: write {{user}} where the login goes")
    return template


@attrs.frozen
class LDAPSettings:
    """The settings of one LDAP source (see the module docstring)."""

    host: str
    port: int
    ldaps: bool
    startTLS: bool
    caFile: str
    bindDN: str = ""
    base: str = ""
    filter: str = ""
    serviceDN: str = ""
    servicePassword: str = attrs.field(default="", repr=False)
    loginAttribute: str = ""
    sendersBase: str = ""
    sendersFilter: str = ""
    sendersAttributes: tuple[str, ...] = ()
    poolSize: int = 4
    timeout: float = 5.0
    source: str = "<ldap>"


def _string(data: dict[str, Any], path: str, key: str, default: str = "") -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise LDAPSettingsError(f"{path}: {key}: must be a string")
    return value


def _uri(path: str, uri: object) -> tuple[str, int, bool]:
    if not isinstance(uri, str):
        raise LDAPSettingsError(f"{path}: uri: must be a string: ldap://HOST[:PORT] or ldaps://...")
    parsed = urllib.parse.urlsplit(uri)
    try:
        port = parsed.port
    except ValueError:
        raise LDAPSettingsError(f"{path}: uri: bad port in {uri!r}") from None
    if (
        parsed.scheme not in ("ldap", "ldaps")
        or not parsed.hostname
        or parsed.path not in ("", "/")
    ):
        raise LDAPSettingsError(f"{path}: uri: must be ldap://HOST[:PORT] or ldaps://HOST[:PORT]")
    ldaps = parsed.scheme == "ldaps"
    return parsed.hostname, port or (636 if ldaps else 389), ldaps


def parseLDAPSettings(data: dict[str, Any], path: str) -> LDAPSettings:
    """@raise LDAPSettingsError: a key is missing, unknown, of the wrong type, or unsafe."""
    unknown = set(data) - _KEYS
    if unknown:
        raise LDAPSettingsError(f"{path}: {sorted(unknown)[0]}: unknown key")
    host, port, ldaps = _uri(path, data.get("uri"))
    startTLS = data.get("start_tls", not ldaps)
    if type(startTLS) is not bool:
        raise LDAPSettingsError(f"{path}: start_tls: must be true or false")
    if ldaps and startTLS:
        raise LDAPSettingsError(f"{path}: start_tls: not with ldaps:// (TLS is already on)")
    if not ldaps and not startTLS:
        raise LDAPSettingsError(
            f"{path}: start_tls: must be true with ldap://: passwords would cross the network"
            " in clear (or use ldaps://)"
        )
    caFile = _string(data, path, "ca_file")
    if caFile:
        try:
            open(caFile, "rb").close()
        except OSError as e:
            raise LDAPSettingsError(
                f"{path}: ca_file: cannot read {caFile}: {e.strerror}"
            ) from None
    bindDN, base, filter_ = (_string(data, path, k) for k in ("bind_dn", "base", "filter"))
    if bool(bindDN) == bool(filter_):
        raise LDAPSettingsError(
            f"{path}: bind_dn: set either bind_dn (direct bind)"
            " or base and filter (search, then bind)"
        )
    if bindDN:
        _checkTemplate(path, "bind_dn", bindDN)
    else:
        _checkTemplate(path, "filter", filter_)
        if not base:
            raise LDAPSettingsError(f"{path}: base: must be set with filter")
    serviceDN = _string(data, path, "service_dn")
    servicePassword = _string(data, path, "service_password")
    passwordFile = _string(data, path, "service_password_file")
    if servicePassword and passwordFile:
        raise LDAPSettingsError(
            f"{path}: service_password: set it or service_password_file, not both"
        )
    if passwordFile:
        try:
            with open(passwordFile, encoding="utf-8") as f:
                servicePassword = f.readline().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            problem = getattr(e, "strerror", None) or "not UTF-8"
            raise LDAPSettingsError(f"{path}: service_password_file: {problem}") from None
    if serviceDN and not servicePassword:
        raise LDAPSettingsError(f"{path}: service_password: needed with service_dn")
    attributes = data.get("senders_attributes", [])
    if not isinstance(attributes, list) or not all(
        isinstance(a, str) and re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", a) for a in attributes
    ):
        raise LDAPSettingsError(f"{path}: senders_attributes: must be a list of attribute names")
    sendersFilter = _string(data, path, "senders_filter", filter_)
    if attributes:
        if not sendersFilter:
            raise LDAPSettingsError(f"{path}: senders_filter: must be set with senders_attributes")
        _checkTemplate(path, "senders_filter", sendersFilter)
    sendersBase = _string(data, path, "senders_base", base)
    if attributes and not sendersBase:
        raise LDAPSettingsError(f"{path}: senders_base: must be set with senders_attributes")
    loginAttribute = _string(data, path, "login_attribute")
    poolSize = data.get("pool_size", 4)
    if type(poolSize) is not int or not 1 <= poolSize <= 64:
        raise LDAPSettingsError(f"{path}: pool_size: must be an integer from 1 to 64")
    timeout = data.get("timeout", 5)
    if type(timeout) not in (int, float) or not 0 < timeout <= 300:
        raise LDAPSettingsError(f"{path}: timeout: must be a number of seconds, 0 < timeout <= 300")
    return LDAPSettings(
        host, port, ldaps, startTLS, caFile, bindDN, base, filter_, serviceDN, servicePassword,
        loginAttribute, sendersBase, sendersFilter, tuple(attributes), poolSize, float(timeout),
        path,
    )  # fmt: skip


def loadLDAPSettings(path: str) -> LDAPSettings:
    """
    Read the TOML settings file at ``path``.

    @raise LDAPSettingsError: it cannot be read or used (names the file and key).
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise LDAPSettingsError(f"{path}: cannot read: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise LDAPSettingsError(f"{path}: not TOML: {e}") from None
    return parseLDAPSettings(data, path)
