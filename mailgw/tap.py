"""
``twistd mailgw``: command-line options and the service they build.

Options given on the command line override the configuration file
(``--config``); repeatable options (``--submission``, ``--auth``, ...)
replace the file's list when given at all.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

from twisted.application.service import IService, Service
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.strcred import AuthOptionMixin
from twisted.logger import Logger
from twisted.python import usage

from mailgw import demo, fdlimit, logs, ownership
from mailgw.config import Config, ConfigError, configFromDict, mergeOverrides, readConfigFile


class Options(usage.Options, AuthOptionMixin):
    """
    The options of ``twistd mailgw``. From L{AuthOptionMixin} only
    ``--help-auth`` (the backends installed) and ``--help-auth-type TYPE``
    (one backend's help) are used: ``--auth`` keeps the strcred string for
    the configuration, which builds the checker.
    """

    # What the SASL layer hands checkers (PLAIN, LOGIN; CRAM-MD5).
    supportedInterfaces = (IUsernamePassword, IUsernameHashedPassword)
    synopsis = "[options]"
    longdesc = (
        "Run the mailgw submission gateway. Listeners are Twisted endpoint strings, for "
        "example tcp:587 or tcp:port=2587:interface=127.0.0.1; --submissions listeners "
        "are plain endpoints that mailgw wraps in TLS. --demo runs a self-contained "
        "gateway on 127.0.0.1 (ports 2587 and 2465) with a generated certificate and a "
        "demo user, all kept in the demo directory."
    )

    optFlags = [
        ["demo", None, "Run on the demo defaults (see --demo-dir)."],
    ]
    optParameters = [
        ["config", "c", None, "TOML configuration file."],
        ["certificate", None, None, "PEM file with the server certificate and its chain."],
        ["key", None, None, "PEM file with the server's private key."],
        ["spool", None, None, "Spool directory."],
        ["hostname", None, None, "Host name for the greeting and Received: header."],
        ["relay-tls", None, None, "TLS to the relay: starttls, opportunistic, implicit, none."],
        ["relay-ca", None, None, "PEM file of CA certificates to verify the relay with."],
        ["relay-auth", None, None, "USER:PASSWORDFILE to log in to the relay with."],
        ["demo-dir", None, "demo", "Directory the demo keeps its files in."],
        ["log-format", None, "text", "Log format: text or json (one JSON object per line)."],
        ["metrics", None, None, "Endpoint for /metrics and /healthz, e.g. tcp:9466:interface=::1."],
        ["workers", None, None, "Worker processes, a number or auto (one per usable core)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["submission"] = []
        self["submissions"] = []
        self["auth"] = []
        self["relay"] = []

    def opt_submission(self, endpoint: str) -> None:
        """STARTTLS submission listener, an endpoint string (repeatable)."""
        self["submission"].append(endpoint)

    def opt_submissions(self, endpoint: str) -> None:
        """Implicit-TLS submission listener, a plain endpoint string (repeatable)."""
        self["submissions"].append(endpoint)

    def opt_auth(self, backend: str) -> None:
        """Auth backend, a strcred string such as passwd:/etc/mailgw/passwd (repeatable)."""
        self["auth"].append(backend)

    def opt_relay(self, hostport: str) -> None:
        """Smarthost HOST:PORT for the default route, tried in order (repeatable)."""
        self["relay"].append(hostport)

    def postOptions(self) -> None:
        if self["log-format"] not in logs.FORMATS:
            raise usage.UsageError("--log-format takes text or json")

    def overrides(self) -> dict[str, Any]:
        """The options given, as dotted configuration keys."""
        values: dict[str, Any] = {}
        for option, key in [
            ("submission", "server.submission"),
            ("submissions", "server.submissions"),
            ("auth", "auth.backends"),
            ("relay", "relay.smarthosts"),
        ]:
            if self[option]:
                values[key] = list(self[option])
        for option, key in [
            ("certificate", "tls.certificate"),
            ("key", "tls.key"),
            ("spool", "spool.directory"),
            ("hostname", "server.hostname"),
            ("relay-tls", "relay.tls"),
            ("relay-ca", "relay.ca_file"),
            ("metrics", "metrics.listen"),
            ("workers", "server.workers"),
        ]:
            if self[option] is not None:
                values[key] = self[option]
        if self["relay-auth"] is not None:
            user, colon, passwordFile = self["relay-auth"].rpartition(":")
            if not colon or not user or not passwordFile:
                raise usage.UsageError("--relay-auth takes USER:PASSWORDFILE")
            values["relay.auth_user"] = user
            values["relay.auth_password_file"] = passwordFile
        return values


def buildConfig(options: Options) -> tuple[Config, str | None]:
    """
    The configuration the options describe: the file (read now), then the
    demo's defaults, then the options themselves; and the demo password.

    @raise ConfigError: the file or an option is wrong.
    """
    data: dict[str, Any] = {}
    source = "command line"
    if options["config"]:
        source = options["config"]
        data = readConfigFile(source)
    overrides = options.overrides()
    password = None
    if options["demo"]:
        demoOverrides, password = demo.prepareDemo(options["demo-dir"])
        overrides = {**demoOverrides, **overrides}
    return configFromDict(mergeOverrides(data, overrides), source=source), password


class ReloadOnHangup(Service):
    """
    SIGHUP reloads the gateway (``systemctl reload``, ``kill -HUP``): the
    configuration file is read again with the same command-line options on
    top, then L{GatewayService.reload} applies it, or refuses it with one
    log line and keeps the running one. Installed by ``twistd mailgw`` only:
    an embedding application decides for itself what its signals do.
    """

    log = Logger()

    def __init__(self, gateway: Any, options: Options, reactor: Any) -> None:
        self.gateway, self.options, self.reactor = gateway, options, reactor
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._signalled)

    def stopService(self) -> Any:
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None
        return super().stopService()

    def _signalled(self, signum: int, frame: Any) -> None:
        # In a signal handler: do the work in the reactor's next turn.
        self.reactor.callFromThread(self.reload)

    def reload(self) -> bool:
        self.log.info("SIGHUP: reloading")
        try:
            config, _ = buildConfig(self.options)
        except ConfigError as e:
            self.log.error(
                "Reload refused, the running configuration stays in force: {error}", error=e
            )
            return False
        return bool(self.gateway.reload(config))


def _raiseFileLimit(config: Config) -> None:
    """Every connection needs a descriptor: take all the process may have."""
    before, now = fdlimit.raiseSoftLimit()
    if now != before:
        _log.info(
            "file descriptors: soft limit raised from {before} to {now}", before=before, now=now
        )
    problem = fdlimit.fitProblem(config)
    if problem:
        _log.warn("{problem}", problem=problem)


_log = Logger()


def _giveSpool(options: Options, config: Config) -> None:
    """Under ``twistd -u/-g``: the spool tree to the user twistd becomes."""
    parent: Any = getattr(options, "parent", None)
    if parent is None:
        return
    try:
        ownership.giveSpool(config.spool.directory, parent.get("uid"), parent.get("gid"))
    except (OSError, KeyError) as e:
        raise ConfigError(
            config.source, "spool.directory", f"cannot give the spool to the service user: {e}"
        ) from None


def _loggingRoot(options: Options, reactor: Any) -> logs.LoggingRoot:
    """
    The service tree's root, with the log observer for twistd's --logfile
    in the format of --log-format; twistd's own when --logger or --syslog
    is given.
    """
    parent: Any = getattr(options, "parent", None)
    if parent is None or parent.get("logger") or parent.get("syslog"):
        return logs.LoggingRoot(reactor)
    logfile = parent.get("logfile")
    out: Any
    if logfile == "-" or (parent.get("nodaemon") and not logfile):
        out = sys.stdout
    else:
        out = logs.ReopeningFile(logfile or "twistd.log")
    return logs.LoggingRoot(reactor, logs.makeObserver(options["log-format"], out), out)


def makeService(options: Options) -> IService:
    """Build the gateway, or exit with a one-line error naming what is wrong."""
    from twisted.internet import reactor

    from mailgw.service import GatewayService

    try:
        config, password = buildConfig(options)
        _raiseFileLimit(config)
        service: Any
        if config.server.workers > 1:
            from mailgw.workers.supervisor import makeSupervisor  # docs/operations.md

            service = makeSupervisor(options, config, reactor)
        else:
            service = GatewayService(config, reactor, exitOnListenFailure=True)
        _giveSpool(options, config)
        root = _loggingRoot(options, reactor)
        service.logFile = root.logFile
        service.setServiceParent(root)
        hangup = ReloadOnHangup(service, options, reactor)
        hangup.setServiceParent(root)
        service.reloader = hangup.reload  # `mailgw reload` does what SIGHUP does
        if password is not None:
            demo.banner(config, password)
        return root
    except ConfigError as e:
        sys.stderr.write(f"mailgw: {e}\n")
        raise SystemExit(1) from None
