"""
The configuration: a TOML file read into frozen values, checked strictly.

Every problem is a L{ConfigError} naming the file, the key and what is wrong;
unknown sections and keys are errors too, so that a typo cannot silently
leave a default in force. L{loadConfig} checks structure and values only;
L{Config.check} adds the start-up checks (listeners, certificate, key, an
auth backend) that need the files on disk. docs/configuration.md is the
reference for every key.
"""

from __future__ import annotations

import copy
import difflib
import enum
import ipaddress
import math
import os
import re
import socket
import stat
import tomllib
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import idna
from twisted.cred import strcred
from twisted.internet import endpoints
from twisted.internet.ssl import CertificateOptions

from mailgw import tls


class ConfigError(ValueError):
    """A configuration problem: permanent until the operator fixes it."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        super().__init__(source, key, problem)
        self.source, self.key, self.problem = source, key, problem

    def __str__(self) -> str:
        return f"{self.source}: {self.key}: {self.problem}"


class _Invalid(Exception):
    """A value converter's complaint; L{_Table} adds the source and key."""


class TLSMode(enum.Enum):
    """How the relay secures a connection to an upstream."""

    STARTTLS = "starttls"  # STARTTLS required, certificate verified (RFC 3207)
    OPPORTUNISTIC = "opportunistic"  # STARTTLS when offered, else plain text
    IMPLICIT = "implicit"  # TLS from the first byte (RFC 8314 3.3)
    NONE = "none"  # plain text; loopback upstreams only


@attrs.frozen
class ServerConfig:
    hostname: str = ""
    submission: tuple[str, ...] = ()
    submissions: tuple[str, ...] = ()
    maxMessageSize: int = 36700160
    maxRecipients: int = 100
    maxLineLength: int = 65536
    idleTimeout: float = 300
    maxErrors: int = 20
    legacyAuthLine: bool = False


@attrs.frozen
class TLSConfig:
    certificate: str = ""
    key: str = ""
    minVersion: str = "TLSv1.2"


@attrs.frozen
class AuthConfig:
    backends: tuple[str, ...] = ()


@attrs.frozen
class SpoolConfig:
    directory: str = "/var/spool/mailgw"


@attrs.frozen
class QueueConfig:
    retryMin: float = 300
    retryMax: float = 3600
    retryJitter: float = 0.1
    maxLifetime: float = 432000
    bounceLifetime: float = 432000
    delayWarning: float = 14400
    maxConcurrency: int = 20
    maxPerHost: int = 5


@attrs.frozen
class Smarthost:
    """One upstream: a host name or IP address and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def isLoopback(self) -> bool:
        if self.host.lower() in ("localhost", "localhost."):
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


@attrs.frozen
class Route:
    """
    Where and how to relay mail: to ``smarthosts`` in order, or (``mx``) to
    the recipient domain's MX hosts.
    """

    smarthosts: tuple[Smarthost, ...] = ()
    mx: bool = False
    tls: TLSMode = TLSMode.STARTTLS
    caFile: str = ""
    authUser: str = ""
    authPasswordFile: str = ""
    authMechanism: str = "PLAIN"
    connectTimeout: float = 30

    def authPassword(self) -> str | None:
        """
        The first line of ``authPasswordFile``, read now (so a changed
        password needs no restart), or None when the route has no AUTH.

        @raise OSError: the file cannot be read (transient for a delivery).
        @raise ValueError: the file is empty.
        """
        if not self.authPasswordFile:
            return None
        with open(self.authPasswordFile, encoding="utf-8") as f:
            password = f.readline().rstrip("\r\n")
        if not password:
            raise ValueError(f"{self.authPasswordFile}: the first line is empty")
        return password


def normalizeDomain(domain: str) -> str:
    """``domain`` lowercased, as an A-label (IDNA 2008 with UTS 46 mapping)."""
    return idna.encode(domain.rstrip("."), uts46=True).decode("ascii").lower()


@attrs.frozen
class RelayConfig:
    """The default route (None: no relay configured) and per-domain routes."""

    default: Route | None = None
    domains: Mapping[str, Route] = attrs.field(factory=dict, hash=False)

    def routeFor(self, domain: str) -> Route | None:
        """The route for recipient ``domain``: its own, else the default."""
        try:
            key = normalizeDomain(domain)
        except (idna.IDNAError, UnicodeError, ValueError):
            key = domain.lower()  # an address literal, or junk: no domain route
        return self.domains.get(key, self.default)


@attrs.frozen
class Config:
    server: ServerConfig = ServerConfig()
    tls: TLSConfig = TLSConfig()
    auth: AuthConfig = AuthConfig()
    spool: SpoolConfig = SpoolConfig()
    queue: QueueConfig = QueueConfig()
    relay: RelayConfig = RelayConfig()
    source: str = "<defaults>"

    def fqdn(self, getfqdn: Callable[[], str] = socket.getfqdn) -> str:
        """``server.hostname``, or the machine's FQDN when that is empty."""
        return self.server.hostname or getfqdn()

    def check(self, requireAuth: bool = True) -> CertificateOptions:
        """
        The start-up safety checks: at least one listener, a certificate and
        key that load and match, at least one known auth backend (unless
        ``requireAuth`` is false: an embedder that brings its own checkers),
        and readable CA files for the relay routes.

        @return: the server TLS context factory, for the listeners to share.
        @raise ConfigError: a check failed; refuse to start.
        """
        if not (self.server.submission or self.server.submissions):
            raise ConfigError(
                self.source, "server.submission", "no listener: set submission or submissions"
            )
        for key, value in (("tls.certificate", self.tls.certificate), ("tls.key", self.tls.key)):
            if not value:
                raise ConfigError(self.source, key, "must be set: listeners need TLS")
        try:
            contextFactory = tls.serverContextFactory(
                self.tls.certificate, self.tls.key, self.tls.minVersion
            )
        except tls.TLSConfigError as e:
            key = "tls.key" if e.path == self.tls.key else "tls.certificate"
            raise ConfigError(self.source, key, str(e)) from None
        if requireAuth and not self.auth.backends:
            raise ConfigError(self.source, "auth.backends", "no auth backend: nobody could log in")
        for backend in self.auth.backends:
            try:
                strcred.findCheckerFactory(backend.partition(":")[0])
            except strcred.InvalidAuthType:
                raise ConfigError(
                    self.source, "auth.backends", f"unknown backend type in {backend!r}"
                ) from None
        routes = [("relay", self.relay.default)] + [
            (f'relay.domains."{d}"', r) for d, r in self.relay.domains.items()
        ]
        for prefix, route in routes:
            if route is not None and route.caFile:
                try:
                    tls.loadCertificates(route.caFile)
                except tls.TLSConfigError as e:
                    raise ConfigError(self.source, f"{prefix}.ca_file", str(e)) from None
        return contextFactory


# Value converters: each returns the value or raises _Invalid(problem).


def _integer(minimum: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise _Invalid(f"must be an integer >= {minimum}, got {value!r}")
        return value

    return convert


_SIZE = re.compile(r"\s*(\d+)\s*([KMG]?)i?B?\s*", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def _size(minimum: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        octets = value
        if isinstance(value, str) and (m := _SIZE.fullmatch(value)):
            octets = int(m.group(1)) * _UNITS[m.group(2).upper()]
        if isinstance(octets, bool) or not isinstance(octets, int) or octets < minimum:
            raise _Invalid(
                f"must be a size in octets >= {minimum} (an integer, or a string "
                f"such as '64K' or '35M'), got {value!r}"
            )
        return octets

    return convert


def _duration(allowZero: bool = False) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or value < 0 or (value == 0 and not allowZero):
            bound = ">= 0" if allowZero else "> 0"
            raise _Invalid(f"must be a number of seconds {bound}, got {value!r}")
        return value

    return convert


def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise _Invalid(f"must be a number from 0 to 1, got {value!r}")
    return float(value)


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"must be true or false, got {value!r}")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, got {value!r}")
    return value


def _stringList(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _Invalid(f"must be a list of non-empty strings, got {value!r}")
    return tuple(value)


def _choice(*choices: str, fold: bool = False) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        for choice in choices:
            if value == choice or (fold and isinstance(value, str) and value.upper() == choice):
                return choice
        raise _Invalid(f"must be one of {', '.join(map(repr, choices))}, got {value!r}")

    return convert


def _hostname(value: Any) -> str:
    name = _string(value)
    labels = name.rstrip(".").split(".")
    valid = all(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", x) for x in labels)
    if name and (len(name) > 253 or not valid):
        raise _Invalid(f"must be a host name such as 'mail.example.org', got {value!r}")
    return name


def _listeners(value: Any) -> tuple[str, ...]:
    descriptions = _stringList(value)
    for description in descriptions:
        if description.split(":", 1)[0].lower() in ("ssl", "tls"):
            raise _Invalid(f"give a plain endpoint such as 'tcp:465', got {description!r}")
        if description.split(":", 1)[0].lower() == "systemd":
            continue  # parsing it looks up the inherited sockets, present only under systemd
        try:
            # Parsing builds an endpoint object without listening; a reactor
            # is only needed to listen, so none is given here.
            endpoints.serverFromString(None, description)
        except Exception as e:
            raise _Invalid(f"not a Twisted endpoint string: {description!r} ({e})") from None
    return descriptions


def _smarthost(text: str, defaultPort: int) -> Smarthost:
    bad = _Invalid(f"must be 'host:port' or '[ipv6]:port', got {text!r}")
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?|([^\s:\[\]]+)(?::(\d+))?", text)
    if m is None:
        raise bad
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    if m.group(1):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad from None
    else:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            _hostname(host)
    number = int(port) if port else defaultPort
    if not 1 <= number <= 65535:
        raise _Invalid(f"port must be from 1 to 65535, got {text!r}")
    return Smarthost(host, number)


@attrs.define
class _Table:
    """One TOML table being read: tracks which keys were used."""

    source: str
    prefix: str
    data: dict[str, Any]
    used: set[str] = attrs.field(factory=set)

    @classmethod
    def of(cls, source: str, prefix: str, value: Any) -> _Table:
        if not isinstance(value, dict):
            raise ConfigError(source, prefix, f"must be a table, got {value!r}")
        return cls(source, prefix, value)

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.source, self.key(name), problem)

    def get(self, name: str, convert: Callable[[Any], Any], default: Any) -> Any:
        self.used.add(name)
        if name not in self.data:
            return default
        try:
            return convert(self.data[name])
        except _Invalid as e:
            raise self.error(name, str(e)) from None

    def table(self, name: str) -> _Table:
        self.used.add(name)
        return _Table.of(self.source, self.key(name), self.data.get(name, {}))

    def finish(self) -> None:
        for name in self.data:
            if name not in self.used:
                near = difflib.get_close_matches(name, sorted(self.used), n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise self.error(name, f"unknown key{hint}")


def _server(t: _Table) -> ServerConfig:
    d = ServerConfig()
    return ServerConfig(
        hostname=t.get("hostname", _hostname, d.hostname),
        submission=t.get("submission", _listeners, d.submission),
        submissions=t.get("submissions", _listeners, d.submissions),
        maxMessageSize=t.get("max_message_size", _size(1), d.maxMessageSize),
        maxRecipients=t.get("max_recipients", _integer(1), d.maxRecipients),
        # RFC 5322 2.1.1: lines of up to 998 characters must be accepted.
        maxLineLength=t.get("max_line_length", _size(998), d.maxLineLength),
        idleTimeout=t.get("idle_timeout", _duration(), d.idleTimeout),
        maxErrors=t.get("max_errors", _integer(1), d.maxErrors),
        legacyAuthLine=t.get("legacy_auth_line", _boolean, d.legacyAuthLine),
    )


def _tls(t: _Table) -> TLSConfig:
    def version(value: Any) -> str:
        if value in ("TLSv1", "TLSv1.0", "TLSv1.1"):
            raise _Invalid(f"TLS 1.0 and 1.1 are not allowed (RFC 8996), got {value!r}")
        return _choice(*tls.MINIMUM_VERSIONS)(value)

    return TLSConfig(
        certificate=t.get("certificate", _string, ""),
        key=t.get("key", _string, ""),
        minVersion=t.get("min_version", version, "TLSv1.2"),
    )


def _queue(t: _Table) -> QueueConfig:
    d = QueueConfig()
    q = QueueConfig(
        retryMin=t.get("retry_min", _duration(), d.retryMin),
        retryMax=t.get("retry_max", _duration(), d.retryMax),
        retryJitter=t.get("retry_jitter", _fraction, d.retryJitter),
        maxLifetime=t.get("max_lifetime", _duration(), d.maxLifetime),
        bounceLifetime=t.get("bounce_lifetime", _duration(), d.bounceLifetime),
        delayWarning=t.get("delay_warning", _duration(allowZero=True), d.delayWarning),
        maxConcurrency=t.get("max_concurrency", _integer(1), d.maxConcurrency),
        maxPerHost=t.get("max_per_host", _integer(1), d.maxPerHost),
    )
    if q.retryMax < q.retryMin:
        raise t.error("retry_max", f"must be >= retry_min ({q.retryMin}), got {q.retryMax!r}")
    return q


def _checkPasswordFile(t: _Table, path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise t.error("auth_password_file", f"cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise t.error("auth_password_file", f"{path} is not a regular file")
    if mode & 0o077:
        raise t.error(
            "auth_password_file",
            f"{path} is open to group or others (mode {stat.S_IMODE(mode):04o}); "
            "make it readable by the mailgw user alone (chmod 600)",
        )


def _route(t: _Table) -> Route:
    mode = TLSMode(t.get("tls", _choice(*(m.value for m in TLSMode)), "starttls"))
    defaultPort = 465 if mode is TLSMode.IMPLICIT else 587

    def smarthosts(value: Any) -> tuple[Smarthost, ...]:
        return tuple(_smarthost(text, defaultPort) for text in _stringList(value))

    route = Route(
        smarthosts=t.get("smarthosts", smarthosts, ()),
        mx=t.get("mx", _boolean, False),
        tls=mode,
        caFile=t.get("ca_file", _string, ""),
        authUser=t.get("auth_user", _string, ""),
        authPasswordFile=t.get("auth_password_file", _string, ""),
        authMechanism=t.get("auth_mechanism", _choice("PLAIN", "LOGIN", fold=True), "PLAIN"),
        connectTimeout=t.get("connect_timeout", _duration(), 30),
    )
    if route.mx and route.smarthosts:
        raise t.error("mx", "mx = true and smarthosts are mutually exclusive")
    if route.mx and mode in (TLSMode.NONE, TLSMode.IMPLICIT):
        raise t.error("tls", f"{mode.value!r} cannot be used with mx = true")
    if mode is TLSMode.NONE and not all(h.isLoopback for h in route.smarthosts):
        raise t.error("tls", "'none' is only allowed when every smarthost is a loopback address")
    if bool(route.authUser) != bool(route.authPasswordFile):
        raise t.error("auth_user", "auth_user and auth_password_file must be set together")
    if route.authUser and mode is TLSMode.OPPORTUNISTIC:
        raise t.error(
            "tls", "'opportunistic' with auth_user could send the password in clear; use 'starttls'"
        )
    if route.authPasswordFile:
        _checkPasswordFile(t, route.authPasswordFile)
    return route


def _relay(t: _Table) -> RelayConfig:
    domainTable = t.table("domains")
    domains: dict[str, Route] = {}
    for name in domainTable.data:
        domainTable.used.add(name)
        try:
            domain = normalizeDomain(name)
        except (idna.IDNAError, UnicodeError, ValueError) as e:
            raise domainTable.error(f'"{name}"', f"not a valid domain name ({e})") from None
        if domain in domains:
            raise domainTable.error(f'"{name}"', f"the same domain as another entry ({domain})")
        sub = _Table.of(t.source, domainTable.key(f'"{name}"'), domainTable.data[name])
        for key, value in sub.data.items():
            if isinstance(value, dict):  # [relay.domains.example.org] nests tables
                raise sub.error(key, f'quote a domain with dots: [relay.domains."{name}.{key}"]')
        route = _route(sub)
        sub.finish()
        if not (route.smarthosts or route.mx):
            raise sub.error("smarthosts", "a domain route needs smarthosts or mx = true")
        domains[domain] = route
    default = _route(t)
    return RelayConfig(
        default=default if (default.smarthosts or default.mx) else None, domains=domains
    )


def configFromDict(data: Mapping[str, Any], source: str = "<config>") -> Config:
    """
    A L{Config} from parsed TOML ``data``; ``source`` names it in errors.

    @raise ConfigError: an unknown section or key, or a bad value.
    """
    top = _Table.of(source, "", dict(data))
    sections = {}
    for name, build in _SECTIONS.items():
        table = top.table(name)
        sections[name] = build(table)
        table.finish()
    top.finish()
    return Config(source=source, **sections)


def _nonEmpty(value: Any) -> str:
    if not _string(value):
        raise _Invalid("must not be empty")
    return value


_SECTIONS: dict[str, Callable[[_Table], Any]] = {
    "server": _server,
    "tls": _tls,
    "auth": lambda t: AuthConfig(backends=t.get("backends", _stringList, ())),
    "spool": lambda t: SpoolConfig(directory=t.get("directory", _nonEmpty, "/var/spool/mailgw")),
    "queue": _queue,
    "relay": _relay,
}


def readConfigFile(path: str) -> dict[str, Any]:
    """
    The parsed TOML of ``path``, for callers that merge in other options
    (see L{mergeOverrides}) before L{configFromDict}.

    @raise ConfigError: unreadable, not UTF-8, or a TOML syntax error (the
        key part of the error names the line).
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(path, "file", f"cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(path, f"line {line}", "not UTF-8 text") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message = str(e)
        m = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
        if m:
            where = f"line {m.group(1)}"
            message = f"TOML syntax error: {message[: m.start()]} (column {m.group(2)})"
        else:  # "(at end of document)"
            where = f"line {text.count(chr(10)) + 1}"
            message = f"TOML syntax error: {message}"
        raise ConfigError(path, where, message) from None


def loadConfig(path: str) -> Config:
    """
    The L{Config} in TOML file ``path``; only structure and values are
    checked here (see L{Config.check} for the start-up checks).

    @raise ConfigError: with ``path`` as its source.
    """
    return configFromDict(readConfigFile(path), source=path)


def mergeOverrides(data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """
    A deep copy of ``data`` with each dotted key of ``overrides`` (e.g.
    ``{"tls.certificate": "/x.pem", "relay.tls": "none"}``) set, replacing
    what the file said; the result goes to L{configFromDict}.
    """
    merged = copy.deepcopy(dict(data))
    for dotted, value in overrides.items():
        *path, last = dotted.split(".")
        table = merged
        for name in path:
            if not isinstance(table.get(name), dict):
                table[name] = {}
            table = table[name]
        table[last] = value
    return merged
