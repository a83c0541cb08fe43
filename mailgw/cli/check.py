"""
``mailgw check-config``: run every start-up check of ``twistd mailgw``
without starting, so an operator (or systemd's ExecStartPre) learns of a
mistake before the gateway is restarted. Every problem is reported, not
only the first: errors (start-up would fail) and warnings (it would start,
but something is wrong or soon will be).

Run it as the service's user: the spool and listener checks test what that
user can do.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from mailgw.cli.errors import CommandError

DEFAULT_CONFIG = "/etc/mailgw/mailgw.toml"


def addCheckConfigParser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "check-config",
        help="check a configuration file as twistd mailgw would at start-up",
        description="Load the configuration, its certificate and key, auth backends, "
        "sender map and relay CA files, as twistd mailgw does at start-up; check that "
        "the spool is writable and the listeners can bind; print every problem "
        "(file, key, problem) or 'ok'. Exit 1 when start-up would fail.",
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"default {DEFAULT_CONFIG}")
    parser.add_argument(
        "--no-listen",
        action="store_true",
        help="do not try to bind the listeners (e.g. while the gateway runs)",
    )
    parser.set_defaults(func=checkConfig)


class Report:
    """The problems found: errors stop start-up, warnings do not."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def error(self, key: str, problem: str) -> None:
        self.errors.append(f"{self.source}: {key}: {problem}")

    def warn(self, key: str, problem: str) -> None:
        self.warnings.append(f"{self.source}: {key}: {problem}")

    def run(self, check: Callable[[], Any]) -> Any:
        """Run ``check``; a ConfigError it raises becomes an error."""
        from mailgw.config import ConfigError

        try:
            return check()
        except ConfigError as e:
            self.errors.append(str(e))
            return None


# -- listeners ---------------------------------------------------------------


def _splitEndpoint(description: str) -> list[str]:
    """Twisted's endpoint syntax: fields split on ':' unless escaped with '\\'."""
    fields, current, escaped = [], "", False
    for char in description:
        if escaped:
            current, escaped = current + char, False
        elif char == "\\":
            escaped = True
        elif char == ":":
            fields.append(current)
            current = ""
        else:
            current += char
    return [*fields, current]


def tcpAddress(description: str) -> tuple[int, str, int] | None:
    """(family, interface, port) of a ``tcp:``/``tcp6:`` endpoint, else None."""
    fields = _splitEndpoint(description)
    kind = fields[0].lower()
    if kind not in ("tcp", "tcp6"):
        return None
    family = socket.AF_INET6 if kind == "tcp6" else socket.AF_INET
    interface = "::" if family == socket.AF_INET6 else ""
    port = None
    for field in fields[1:]:
        name, equals, value = field.partition("=")
        if not equals:
            port = port if port is not None else name
        elif name == "port":
            port = value
        elif name == "interface":
            interface = value
    if port is None or not port.isdigit():
        return None
    return (family, interface, int(port))


def _listeners(config: Any) -> Iterator[tuple[str, str]]:
    for key in ("submission", "submissions"):
        for description in getattr(config.server, key):
            yield f"server.{key}", description
    for description in config.reinject.listen:
        yield "reinject.listen", description


def checkListeners(config: Any, report: Report, bind: bool) -> None:
    seen: dict[int, str] = {}
    for key, description in _listeners(config):
        address = tcpAddress(description)
        if address is None:
            continue
        family, interface, port = address
        if port != 0 and port in seen:
            report.error(key, f"{description} uses port {port}, as {seen[port]} does")
            continue
        seen[port] = description
        if not bind or port == 0:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted binds
            try:
                s.bind((interface, port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    why = "the port is already in use (is the gateway running?)"
                elif e.errno == errno.EACCES:
                    why = "permission denied (a port below 1024 needs CAP_NET_BIND_SERVICE)"
                elif e.errno == errno.EADDRNOTAVAIL:
                    why = f"{interface} is not an address of this machine"
                else:
                    why = e.strerror or str(e)
                report.error(key, f"cannot listen on {description}: {why}")
            except (socket.gaierror, UnicodeError, ValueError) as e:
                report.error(key, f"cannot listen on {description}: {e}")


# -- files ---------------------------------------------------------------------


def checkSpool(config: Any, report: Report) -> None:
    """The spool directory, or the directory it would be created in, is writable."""
    directory = os.path.abspath(config.spool.directory)
    existing = directory
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        report.error("spool.directory", f"{existing} is not a directory")
        return
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".mailgw-check-"):
            pass
    except OSError as e:
        what = directory if existing == directory else f"{existing} (to create {directory})"
        report.error(
            "spool.directory", f"cannot write in {what}: {e.strerror or e} (as uid {os.getuid()})"
        )


def checkKeyMode(config: Any, report: Report) -> None:
    """The private key is for the service's eyes only."""
    try:
        mode = os.stat(config.tls.key).st_mode
    except OSError:
        return  # the TLS check reports it
    if mode & stat.S_IROTH:
        report.error("tls.key", f"{config.tls.key} is readable by everyone: chmod o-rwx")
    elif mode & stat.S_IRGRP:
        report.warn("tls.key", f"{config.tls.key} is readable by its group: is that intended?")


# -- the command -----------------------------------------------------------------


def collect(path: str, bind: bool = True) -> tuple[Report, Any]:
    """Every check on the configuration file ``path``: the report, and the Config."""
    from mailgw import fdlimit
    from mailgw.api import checkSecrets
    from mailgw.certcheck import configuredCertificateReport
    from mailgw.config import loadConfig
    from mailgw.dkim.keys import keyProblems
    from mailgw.limits.backend import makeSharedCounters
    from mailgw.service import makeCheckers, makePolicy

    report = Report(path)
    config = report.run(lambda: loadConfig(path))
    if config is None:
        return report, None
    if not (config.server.submission or config.server.submissions):
        report.error("server.submission", "no listener: set submission or submissions")
    # config.check() stops at its first problem: run it, then the checks it
    # would have reached, each on its own.
    contextFactory = report.run(lambda: _checkTLS(config))
    if contextFactory is not None:
        certificate = configuredCertificateReport(config, contextFactory)
        for problem in certificate.errors:
            report.error("tls.certificate", problem)
        for problem in certificate.warnings:
            report.warn("tls.certificate", problem)
    checkKeyMode(config, report)
    if not config.auth.backends:
        report.error("auth.backends", "no auth backend: nobody could log in")
    report.run(lambda: makeCheckers(config))
    report.run(lambda: makePolicy(config, clock=None))
    report.run(lambda: _checkRelayCAs(config))
    report.run(lambda: checkSecrets(config))
    report.run(lambda: makeSharedCounters(config.limits, config.source, reactor=None))
    report.errors.extend(str(e) for e in keyProblems(config.dkim, config.source)[1])
    checkSpool(config, report)
    checkListeners(config, report, bind)
    if config.filter.protocol and not config.reinject.listen:
        report.warn(
            "filter.content_filter",
            "no [reinject] listen: what the filter accepts has no listener to come back to",
        )
    descriptors = fdlimit.fitProblem(config)
    if descriptors:
        report.warn("limits.max_connections", descriptors)
    return report, config


def _checkTLS(config: Any) -> Any:
    from mailgw import tls
    from mailgw.config import ConfigError

    for key, value in (("tls.certificate", config.tls.certificate), ("tls.key", config.tls.key)):
        if not value:
            raise ConfigError(config.source, key, "must be set: listeners need TLS")
    try:
        return tls.serverContextFactory(
            config.tls.certificate, config.tls.key, config.tls.minVersion
        )
    except tls.TLSConfigError as e:
        key = "tls.key" if e.path == config.tls.key else "tls.certificate"
        raise ConfigError(config.source, key, str(e)) from None


def _checkRelayCAs(config: Any) -> None:
    from mailgw import tls
    from mailgw.config import ConfigError

    routes = (
        [("relay", config.relay.default)]
        + [(f'relay.domains."{d}"', r) for d, r in config.relay.domains.items()]
        + [(f'relay.senders."{d}"', r) for d, r in config.relay.senders.items()]
    )
    for prefix, route in routes:
        if route is not None and route.caFile:
            try:
                tls.loadCertificates(route.caFile)
            except tls.TLSConfigError as e:
                raise ConfigError(config.source, f"{prefix}.ca_file", str(e)) from None


def checkConfig(args: argparse.Namespace) -> int:
    report, config = collect(args.config, bind=not args.no_listen)
    for warning in report.warnings:
        sys.stderr.write(f"mailgw: warning: {warning}\n")
    if report.errors:
        for error in report.errors[:-1]:
            sys.stderr.write(f"mailgw: {error}\n")
        # main() prints the last one and exits 1.
        raise CommandError(report.errors[-1])
    listeners = len(config.server.submission) + len(config.server.submissions)
    relay = "no relay route" if config.relay.default is None else "a default relay route"
    sys.stdout.write(
        f"{args.config}: ok ({listeners} listener(s), {len(config.auth.backends)} auth "
        f"backend(s), {relay}, {len(config.relay.domains)} domain route(s)"
        + (f", {len(report.warnings)} warning(s)" if report.warnings else "")
        + ")\n"
    )
    return 0
