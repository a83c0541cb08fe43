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

import enum
import functools
import ipaddress
import os
import re
import socket
import stat
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import idna
from twisted.cred import strcred
from twisted.internet.ssl import CertificateOptions

from mailgw import tls
from mailgw._configparse import (  # ConfigError, mergeOverrides, readConfigFile: public here
    ConfigError,
    Network,
    _boolean,
    _choice,
    _duration,
    _fraction,
    _hostname,
    _integer,
    _Invalid,
    _listeners,
    _networks,
    _nonEmpty,
    _size,
    _string,
    _stringList,
    _Table,
    mergeOverrides,  # noqa: F401
    readConfigFile,
)
from mailgw.apiconfig import ApiConfig, WebhooksConfig, apiSection, webhooksSection
from mailgw.breaker.config import BreakerConfig, readBreaker
from mailgw.dkim.config import DKIMConfig, dkimSection
from mailgw.envelope import Address
from mailgw.filter.settings import (
    EtrnConfig,
    FilterConfig,
    ReinjectConfig,
    loadEtrn,
    loadFilter,
    loadReinject,
)
from mailgw.milter.settings import MilterConfig, milterConfig
from mailgw.sharedconfig import sharedLimits


class TLSMode(enum.Enum):
    """How the relay secures a connection to an upstream."""

    STARTTLS = "starttls"  # STARTTLS required, certificate verified (RFC 3207)
    OPPORTUNISTIC = "opportunistic"  # STARTTLS when offered, else plain text
    IMPLICIT = "implicit"  # TLS from the first byte (RFC 8314 3.3)
    NONE = "none"  # plain text; loopback upstreams only


class TLSLevel(enum.Enum):
    """
    What a route demands of the upstream's TLS, as Postfix's
    smtp_tls_security_level (docs/relay.md): ``dane`` applies to MX routes.
    """

    NONE = "none"  # never STARTTLS
    MAY = "may"  # STARTTLS when offered, unverified; plain text when it fails
    ENCRYPT = "encrypt"  # TLS required, unverified
    VERIFY = "verify"  # TLS required, chain verified, the host's name checked
    SECURE = "secure"  # as verify, against the route's tls_match names (next hop)
    DANE = "dane"  # DANE (RFC 7672) where usable TLSA records exist, else may


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
    commandTimeout: float = 60
    sessionTimeout: float = 1800
    maxHeaderSize: int = 262144
    maxReceivedHeaders: int = 50
    receivedClientAddress: bool = True
    preAuthTimeout: float = 30
    maxJunkCommands: int = 20
    closeTimeout: float = 5
    acceptBareLF: bool = False
    binaryMime: bool = False
    #: Worker processes (docs/operations.md, "Workers"); 1: a single process.
    workers: int = 1


@attrs.frozen
class TLSConfig:
    certificate: str = ""
    key: str = ""
    minVersion: str = "TLSv1.2"
    ticketLifetime: int = tls.DEFAULT_TICKET_LIFETIME


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
class LimitsConfig:
    """
    Abuse resistance: connection limits, the authentication failure
    budgets and delays, and the per-user submission quotas (see
    L{mailgw.limits}). Counts are per window of the given seconds; a quota
    of 0 is no quota.
    """

    maxConnections: int = 1000
    maxConnectionsPerAddress: int = 20
    connectionRatePerAddress: int = 60
    exempt: tuple[Network, ...] = ()
    authFailuresPerAddress: int = 10
    authFailuresPerNetwork: int = 30
    authFailuresPerAccount: int = 20
    authFailureWindow: float = 3600
    authFreeFailures: int = 3
    authDelay: float = 1.0
    authDelayMax: float = 16.0
    authTrustPeriod: float = 604800
    authConcurrentPerAddress: int = 8
    authConcurrentPerAccount: int = 8
    authConcurrentTotal: int = 64
    messagesPerUser: int = 1000
    recipientsPerUser: int = 5000
    quotaWindow: float = 3600
    # Counts shared by every node (mailgw/sharedconfig.py, docs/cluster.md).
    backend: str = ""
    namespace: str = "mailgw"
    backendPasswordFile: str = ""
    backendSyncInterval: float = 0.05
    backendStaleness: float = 1.0
    backendTimeout: float = 2.0
    backendRetry: float = 5.0


@attrs.frozen
class PolicyConfig:
    """Who may send as whom (see docs/security.md)."""

    senderLoginMaps: str = ""
    checkHeaderFrom: str = "off"
    allowNullSender: bool = False
    #: Recipient domains every user may send to (empty: any); ``.d`` is d's subdomains.
    allowedRecipientDomains: tuple[str, ...] = ()
    #: Per login (lowercased): that user's recipient domains, instead of the above.
    recipientDomains: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict, hash=False)


@attrs.frozen
class ProxyConfig:
    """
    The PROXY protocol (v1 and v2): which peers may send the header, and how
    long they have to send it. No trusted peers: PROXY is never accepted.
    """

    trusted: tuple[Network, ...] = ()
    headerTimeout: float = 5


@attrs.frozen
class MetricsConfig:
    """The Prometheus and health endpoint (docs/metrics.md); "" is off."""

    listen: str = ""


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
    #: None: as ``tls`` says (verified unless NONE), for routes made in code.
    tlsLevel: TLSLevel | None = None
    tlsMatch: tuple[str, ...] = ()  # ``secure``: names the certificate may carry
    mtaSts: bool = False  # MX routes: honour MTA-STS policies (RFC 8461)

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


@functools.lru_cache(maxsize=4096)
def normalizeDomain(domain: str) -> str:
    """``domain`` lowercased, as an A-label (IDNA 2008 with UTS 46 mapping)."""
    return idna.encode(domain.rstrip("."), uts46=True).decode("ascii").lower()


@attrs.frozen
class RelayConfig:
    """
    The default route (None: no relay configured), per-domain routes (a key
    ``.example.org`` matches the subdomains of example.org) and per-sender
    routes (an address, or ``@domain``).
    """

    default: Route | None = None
    domains: Mapping[str, Route] = attrs.field(factory=dict, hash=False)
    senders: Mapping[str, Route] = attrs.field(factory=dict, hash=False)

    def routeFor(self, domain: str, sender: Address | None = None) -> Route | None:
        """
        The route for recipient ``domain`` of mail from ``sender``, first
        found of: the domain's own route, its parents' ``.parent`` routes
        (nearest first), the sender address's route, the sender domain's
        ``@domain`` route, the default.
        """
        try:
            key = normalizeDomain(domain)
        except (idna.IDNAError, UnicodeError, ValueError):
            key = domain.lower()  # an address literal, or junk: no domain route
        route = self.domains.get(key)
        if route is not None:
            return route
        labels = key.split(".")
        for start in range(1, len(labels)):
            route = self.domains.get("." + ".".join(labels[start:]))
            if route is not None:
                return route
        if sender is not None and self.senders:
            route = self.senders.get(senderKey(sender))
            if route is None:
                route = self.senders.get("@" + senderKey(sender).rpartition("@")[2])
            if route is not None:
                return route
        return self.default


def senderKey(sender: Address) -> str:
    """``sender`` as the keys of ``[relay.senders]`` spell it: lowercased,
    its domain an A-label."""
    try:
        domain = normalizeDomain(sender.domain)
    except (idna.IDNAError, UnicodeError, ValueError):
        domain = sender.domain.lower()
    return f"{sender.local.lower()}@{domain}"


@attrs.frozen
class Config:
    server: ServerConfig = ServerConfig()
    tls: TLSConfig = TLSConfig()
    auth: AuthConfig = AuthConfig()
    spool: SpoolConfig = SpoolConfig()
    queue: QueueConfig = QueueConfig()
    relay: RelayConfig = RelayConfig()
    limits: LimitsConfig = LimitsConfig()
    policy: PolicyConfig = PolicyConfig()
    proxy: ProxyConfig = ProxyConfig()
    metrics: MetricsConfig = MetricsConfig()
    api: ApiConfig = ApiConfig()
    webhooks: WebhooksConfig = WebhooksConfig()
    filter: FilterConfig = FilterConfig()
    reinject: ReinjectConfig = ReinjectConfig()
    etrn: EtrnConfig = EtrnConfig()
    dkim: DKIMConfig = DKIMConfig()
    milter: MilterConfig = MilterConfig()
    breaker: BreakerConfig = BreakerConfig()
    source: str = "<defaults>"

    def fqdn(self, getfqdn: Callable[[], str] = socket.getfqdn) -> str:
        """``server.hostname``, or the machine's FQDN when that is empty."""
        return self.server.hostname or getfqdn()

    def check(self, requireAuth: bool = True) -> CertificateOptions:
        """
        The start-up safety checks: at least one listener, a certificate and
        key that load and match, at least one known auth backend (unless
        ``requireAuth`` is false: an embedder that brings its own checkers),
        readable CA files for the relay routes, and a readable
        ``policy.sender_login_maps`` file when one is set.

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
                self.tls.certificate, self.tls.key, self.tls.minVersion, self.tls.ticketLifetime
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
        routes = (
            [("relay", self.relay.default)]
            + [(f'relay.domains."{d}"', r) for d, r in self.relay.domains.items()]
            + [(f'relay.senders."{d}"', r) for d, r in self.relay.senders.items()]
        )
        for prefix, route in routes:
            if route is not None and route.caFile:
                try:
                    tls.loadCertificates(route.caFile)
                except tls.TLSConfigError as e:
                    raise ConfigError(self.source, f"{prefix}.ca_file", str(e)) from None
        # "sql:FILE" / "ldap:FILE" name a backend's settings: checked when the policy is made.
        if self.policy.senderLoginMaps and not self.policy.senderLoginMaps.startswith(
            ("sql:", "ldap:")
        ):
            try:
                with open(self.policy.senderLoginMaps, "rb"):
                    pass
            except OSError as e:
                raise ConfigError(
                    self.source, "policy.sender_login_maps", f"cannot read: {e.strerror or e}"
                ) from None
        return contextFactory


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


def _endpoint(value: Any) -> str:
    """One listener endpoint string, or "" for none."""
    if not isinstance(value, str):
        raise _Invalid(f"expected an endpoint string, got {value!r}")
    return _listeners([value])[0] if value else ""


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
        commandTimeout=t.get("command_timeout", _duration(), d.commandTimeout),
        sessionTimeout=t.get("session_timeout", _duration(), d.sessionTimeout),
        # A header section must hold at least a few 998-octet lines (RFC 5322 2.1.1).
        maxHeaderSize=t.get("max_header_size", _size(4096), d.maxHeaderSize),
        maxReceivedHeaders=t.get("max_received_headers", _integer(1), d.maxReceivedHeaders),
        receivedClientAddress=t.get("received_client_address", _boolean, d.receivedClientAddress),
        preAuthTimeout=t.get("pre_auth_timeout", _duration(), d.preAuthTimeout),
        maxJunkCommands=t.get("max_junk_commands", _integer(0), d.maxJunkCommands),
        closeTimeout=t.get("close_timeout", _duration(), d.closeTimeout),
        acceptBareLF=t.get("accept_bare_lf", _boolean, d.acceptBareLF),
        binaryMime=t.get("binary_mime", _boolean, d.binaryMime),
        workers=t.get("workers", _workers, d.workers),
    )


#: The most worker processes ``[server] workers`` may ask for.
MAX_WORKERS = 1024


def _workers(value: Any) -> int:
    """A number of workers, or "auto": the cores this process may run on."""
    if value == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    if isinstance(value, str) and value.isdigit():
        value = int(value)  # --workers N
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise _Invalid(
            f'expected a number of workers from 1 to {MAX_WORKERS} or "auto", got {value!r}'
        )
    return value


def _tls(t: _Table) -> TLSConfig:
    def version(value: Any) -> str:
        if value in ("TLSv1", "TLSv1.0", "TLSv1.1"):
            raise _Invalid(f"TLS 1.0 and 1.1 are not allowed (RFC 8996), got {value!r}")
        return _choice(*tls.MINIMUM_VERSIONS)(value)

    return TLSConfig(
        certificate=t.get("certificate", _string, ""),
        key=t.get("key", _string, ""),
        minVersion=t.get("min_version", version, "TLSv1.2"),
        ticketLifetime=t.get("ticket_lifetime", _integer(0), tls.DEFAULT_TICKET_LIFETIME),
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


def _limits(t: _Table) -> LimitsConfig:
    d = LimitsConfig()
    limits = LimitsConfig(
        maxConnections=t.get("max_connections", _integer(1), d.maxConnections),
        maxConnectionsPerAddress=t.get(
            "max_connections_per_address", _integer(1), d.maxConnectionsPerAddress
        ),
        connectionRatePerAddress=t.get(
            "connection_rate_per_address", _integer(1), d.connectionRatePerAddress
        ),
        exempt=t.get("exempt", _networks, d.exempt),
        authFailuresPerAddress=t.get(
            "auth_failures_per_address", _integer(1), d.authFailuresPerAddress
        ),
        authFailuresPerNetwork=t.get(
            "auth_failures_per_network", _integer(1), d.authFailuresPerNetwork
        ),
        authFailuresPerAccount=t.get(
            "auth_failures_per_account", _integer(1), d.authFailuresPerAccount
        ),
        authFailureWindow=t.get("auth_failure_window", _duration(), d.authFailureWindow),
        authFreeFailures=t.get("auth_free_failures", _integer(0), d.authFreeFailures),
        authDelay=t.get("auth_delay", _duration(allowZero=True), d.authDelay),
        authDelayMax=t.get("auth_delay_max", _duration(allowZero=True), d.authDelayMax),
        authTrustPeriod=t.get("auth_trust_period", _duration(allowZero=True), d.authTrustPeriod),
        authConcurrentPerAddress=t.get(
            "auth_concurrent_per_address", _integer(1), d.authConcurrentPerAddress
        ),
        authConcurrentPerAccount=t.get(
            "auth_concurrent_per_account", _integer(1), d.authConcurrentPerAccount
        ),
        authConcurrentTotal=t.get("auth_concurrent_total", _integer(1), d.authConcurrentTotal),
        messagesPerUser=t.get("messages_per_user", _integer(0), d.messagesPerUser),
        recipientsPerUser=t.get("recipients_per_user", _integer(0), d.recipientsPerUser),
        quotaWindow=t.get("quota_window", _duration(), d.quotaWindow),
        **sharedLimits(t),
    )
    if limits.authDelayMax < limits.authDelay:
        raise t.error(
            "auth_delay_max",
            f"must be >= auth_delay ({limits.authDelay}), got {limits.authDelayMax!r}",
        )
    return limits


def _policy(t: _Table) -> PolicyConfig:
    d = PolicyConfig()
    return PolicyConfig(
        senderLoginMaps=t.get("sender_login_maps", _string, d.senderLoginMaps),
        checkHeaderFrom=t.get("check_header_from", _choice("off", "reject"), d.checkHeaderFrom),
        allowNullSender=t.get("allow_null_sender", _boolean, d.allowNullSender),
        allowedRecipientDomains=t.get("allowed_recipient_domains", _matchNames, ()),
        recipientDomains=_recipientDomains(t.table("recipient_domains")),
    )


def _recipientDomains(t: _Table) -> dict[str, tuple[str, ...]]:
    users: dict[str, tuple[str, ...]] = {}
    for user in t.data:
        if user.lower() in users:
            raise t.error(f'"{user}"', "the same user as another entry")
        users[user.lower()] = t.get(user, _matchNames, ())
    return users


def _proxy(t: _Table) -> ProxyConfig:
    d = ProxyConfig()
    return ProxyConfig(
        trusted=t.get("trusted", _networks, d.trusted),
        headerTimeout=t.get("header_timeout", _duration(), d.headerTimeout),
    )


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

    mx = t.get("mx", _boolean, False)
    level = t.get("tls_level", _choice("", *(v.value for v in TLSLevel)), None)
    route = Route(
        smarthosts=t.get("smarthosts", smarthosts, ()),
        mx=mx,
        tls=mode,
        caFile=t.get("ca_file", _string, ""),
        authUser=t.get("auth_user", _string, ""),
        authPasswordFile=t.get("auth_password_file", _string, ""),
        authMechanism=t.get("auth_mechanism", _choice("PLAIN", "LOGIN", fold=True), "PLAIN"),
        connectTimeout=t.get("connect_timeout", _duration(), 30),
        tlsLevel=TLSLevel(level) if level else _defaultLevel(t, mx, level),
        tlsMatch=t.get("tls_match", _matchNames, ()),
        mtaSts=t.get("mta_sts", _boolean, mx),
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
    _checkLevel(t, route, level or "")
    if route.authPasswordFile:
        _checkPasswordFile(t, route.authPasswordFile)
    return route


def _defaultLevel(t: _Table, mx: bool, level: str | None) -> TLSLevel | None:
    """MX delivery is opportunistic unless told otherwise (docs/relay.md);
    a route that writes ``tls`` but no ``tls_level`` keeps ``tls``'s meaning."""
    return TLSLevel.MAY if mx and "tls" not in t.data else None


def _matchNames(value: Any) -> tuple[str, ...]:
    names = []
    for name in _stringList(value):
        sub = name.startswith(".")
        try:
            names.append(("." if sub else "") + normalizeDomain(name[1:] if sub else name))
        except (idna.IDNAError, UnicodeError, ValueError) as e:
            raise _Invalid(f"{name!r} is not a domain name ({e})") from None
    return tuple(names)


def _checkLevel(t: _Table, route: Route, level: str) -> None:
    """tls_level beside the other route keys (docs/relay.md)."""
    if route.tlsMatch and route.tlsLevel is not TLSLevel.SECURE:
        raise t.error("tls_match", "only used with tls_level = 'secure'")
    if route.mtaSts and not route.mx:
        raise t.error("mta_sts", "MTA-STS applies to mx = true routes only")
    if not level:
        return
    if route.tls not in (TLSMode.STARTTLS, TLSMode.IMPLICIT):
        raise t.error("tls", "with tls_level set, tls may only be 'starttls' or 'implicit'")
    if route.tlsLevel is TLSLevel.DANE and not route.mx:
        raise t.error("tls_level", "'dane' applies to mx = true routes only")
    if route.tls is TLSMode.IMPLICIT and route.tlsLevel in (TLSLevel.NONE, TLSLevel.MAY):
        raise t.error("tls_level", f"{level!r} cannot be used with tls = 'implicit'")
    if route.tlsLevel is TLSLevel.NONE and not all(h.isLoopback for h in route.smarthosts):
        raise t.error("tls_level", "'none' is only allowed for mx = true or loopback smarthosts")
    if route.authUser and route.tlsLevel in (TLSLevel.NONE, TLSLevel.MAY, TLSLevel.DANE):
        raise t.error("tls_level", f"{level!r} with auth_user could send the password in clear")


def _routeTables(t: _Table, name: str, what: str) -> dict[str, Route]:
    """``[relay.NAME."KEY"]`` tables: each one route, its key as written."""
    table = t.table(name)
    routes: dict[str, Route] = {}
    for key in table.data:
        table.used.add(key)
        sub = _Table.of(t.source, table.key(f'"{key}"'), table.data[key])
        for inner, value in sub.data.items():
            if isinstance(value, dict):  # [relay.domains.example.org] nests tables
                raise sub.error(
                    inner, f'quote a {what} with dots: [{table.prefix}."{key}.{inner}"]'
                )
        route = _route(sub)
        sub.finish()
        routes[key] = route
    return routes


def _relay(t: _Table) -> RelayConfig:
    domainTable = t.table("domains")
    domains: dict[str, Route] = {}
    for name, route in _routeTables(t, "domains", "domain").items():
        sub = name.startswith(".")
        try:
            domain = ("." if sub else "") + normalizeDomain(name[1:] if sub else name)
        except (idna.IDNAError, UnicodeError, ValueError) as e:
            raise domainTable.error(f'"{name}"', f"not a valid domain name ({e})") from None
        if domain in domains:
            raise domainTable.error(f'"{name}"', f"the same domain as another entry ({domain})")
        if not (route.smarthosts or route.mx):
            raise domainTable.error(
                f'"{name}".smarthosts', "a domain route needs smarthosts or mx = true"
            )
        domains[domain] = route
    senderTable = t.table("senders")
    senders: dict[str, Route] = {}
    for name, route in _routeTables(t, "senders", "sender").items():
        local, at, domain = name.rpartition("@")
        try:
            if not at or not domain:
                raise ValueError("not an address or @domain")
            key = senderKey(Address(local, domain)) if local else "@" + normalizeDomain(domain)
        except (idna.IDNAError, UnicodeError, ValueError) as e:
            raise senderTable.error(f'"{name}"', f"not an address or @domain ({e})") from None
        if key in senders:
            raise senderTable.error(f'"{name}"', f"the same sender as another entry ({key})")
        if not route.smarthosts:
            raise senderTable.error(f'"{name}".smarthosts', "a sender route needs smarthosts")
        senders[key] = route
    default = _route(t)
    return RelayConfig(
        default=default if (default.smarthosts or default.mx) else None,
        domains=domains,
        senders=senders,
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
    config = Config(source=source, **sections)
    if config.api.tokenFile and not config.metrics.listen:
        raise ConfigError(source, "api.token_file", "the API is served on [metrics] listen: set it")
    if config.server.binaryMime and config.filter.protocol:
        raise ConfigError(
            source,
            "server.binary_mime",
            "cannot be on with [filter] content_filter: the filter takes messages with DATA",
        )
    return config


_SECTIONS: dict[str, Callable[[_Table], Any]] = {
    "server": _server,
    "tls": _tls,
    "auth": lambda t: AuthConfig(backends=t.get("backends", _stringList, ())),
    "spool": lambda t: SpoolConfig(directory=t.get("directory", _nonEmpty, "/var/spool/mailgw")),
    "queue": _queue,
    "relay": _relay,
    "limits": _limits,
    "policy": _policy,
    "proxy": _proxy,
    "metrics": lambda t: MetricsConfig(listen=t.get("listen", _endpoint, "")),
    "api": apiSection,
    "webhooks": webhooksSection,
    "filter": loadFilter,
    "reinject": loadReinject,
    "etrn": loadEtrn,
    "dkim": dkimSection,
    "milter": milterConfig,
    "breaker": readBreaker,
}


def loadConfig(path: str) -> Config:
    """
    The L{Config} in TOML file ``path``; only structure and values are
    checked here (see L{Config.check} for the start-up checks).

    @raise ConfigError: with ``path`` as its source.
    """
    return configFromDict(readConfigFile(path), source=path)
