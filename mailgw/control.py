"""
The control socket: how ``mailgw queue flush|hold|release|delete`` reach the
running gateway.

A UNIX stream socket (by default ``<spool directory>/control.sock``, mode
0600 inside the 0700 spool directory, so only the gateway's user and root
can connect) carrying one JSON object per line each way::

    -> {"command": "hold", "ids": ["0005F1A2B3C4D5E6F7A8"]}
    <- {"ok": true, "count": 1}
    <- {"ok": false, "error": "unknown queue id 0005F1A2B3C4D5E6F7A8", "count": 0}

Commands: ``flush`` (no ids: every message), ``flush-domain`` (with a
``"domain"`` key: ``example.org``, or ``@example.org`` for subdomains too,
as ETRN), ``hold``, ``release``,
``delete`` (at least one id), ``ping`` and ``reload`` (as SIGHUP: the
configuration, certificate and files read again; ``ok`` false when the new
ones were refused, and the log says why), and the breaker's
``account-show``, ``account-reset`` and ``release-account`` (one account
name in ``ids``: L{mailgw.breaker.control}). A connection may send several
requests; they are answered one at a time, in order. docs/queue-cli.md is the
operator's description.

L{ControlService} serves it inside the gateway over an L{IQueueControl};
L{sendCommand} is the blocking client of the ``mailgw queue`` command.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from collections.abc import Callable, Iterable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin

from mailgw.breaker.control import ACCOUNT_COMMANDS, accountCommand
from mailgw.interfaces import IAccountBreaker, IQueueControl
from mailgw.queue.spool import isQueueId

#: The socket's name in the spool directory.
SOCKET_NAME = "control.sock"
#: The longest request (or answer) line, in bytes, delimiter excluded.
MAX_LINE_LENGTH = 64 * 1024
#: The most queue ids one request may name (a request of that many still fits
#: in a line); the client sends longer lists in batches.
MAX_IDS = 1000
#: Commands that act on each named message, and need at least one.
PER_MESSAGE_COMMANDS = ("hold", "release", "delete")
COMMANDS = ("flush", *PER_MESSAGE_COMMANDS, "ping", "reload", "flush-domain", *ACCOUNT_COMMANDS)

_log = Logger()


def defaultSocketPath(spoolDirectory: str) -> str:
    """The control socket of the gateway whose spool is ``spoolDirectory``."""
    return os.path.join(spoolDirectory, SOCKET_NAME)


class ControlError(Exception):
    """
    ``mailgw queue`` could not get an answer from the gateway (permission
    denied, timeout, connection closed, a malformed answer). The text names
    the socket and is meant for the operator.
    """


class ControlUnavailable(ControlError):
    """
    Nothing listens on the control socket (no socket file, or connection
    refused): the gateway is not running, or runs without a control socket.
    """


def _show(value: object) -> str:
    # Operator-supplied junk goes back into an error message: keep it short.
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _error(text: str, count: int | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {"ok": False, "error": text}
    if count is not None:
        answer["count"] = count
    return answer


def parseRequest(line: bytes) -> tuple[str, list[str]] | dict[str, Any]:
    """
    The ``(command, ids)`` of a request line, duplicates removed in order,
    or the error answer for a malformed request.
    """
    try:
        request = json.loads(line)
    except ValueError:  # UnicodeDecodeError included
        return _error("bad request: not a JSON object")
    if not isinstance(request, dict):
        return _error("bad request: not a JSON object")
    command = request.get("command")
    if command not in COMMANDS:
        return _error(f"unknown command {_show(command)}")
    ids = request.get("ids", [])
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        return _error("bad request: ids must be a list of queue ids")
    if len(ids) > MAX_IDS:
        return _error(f"too many ids: {len(ids)} (at most {MAX_IDS} per request)")
    if command in PER_MESSAGE_COMMANDS and not ids:
        return _error(f"{command} needs at least one queue id")
    if command == "flush-domain":
        domain = request.get("domain")
        if not isinstance(domain, str) or not domain.removeprefix("@") or len(domain) > 255:
            return _error("flush-domain needs a domain")
        return command, [domain]
    return command, list(dict.fromkeys(ids))


async def _perMessage(control: IQueueControl, command: str, ids: list[str]) -> dict[str, Any]:
    # One message after the other, in the order given: the log then tells
    # the same story as the command line.
    count, unknown = 0, []
    for queueId in ids:
        if not isQueueId(queueId):
            unknown.append(_show(queueId))
            continue
        try:
            if command == "flush":
                scheduled = await maybeDeferred(control.flush, [queueId])
                count += scheduled if isinstance(scheduled, int) else 1
            else:
                await maybeDeferred(getattr(control, command), queueId)
                count += 1
        except KeyError:
            unknown.append(queueId)
            continue
        except Exception as e:
            # Spool errors (disk full...) are transient: the operator may
            # try again. This socket reaches only the gateway's own user,
            # so the text of the error may go back.
            _log.failure("Control: {command} {queueId} failed", command=command, queueId=queueId)
            return _error(f"{command} {queueId} failed: {e}", count)
        _log.info("Control: {command} {queueId}", command=command, queueId=queueId)
    if unknown:
        plural = "s" if len(unknown) > 1 else ""
        return _error(f"unknown queue id{plural} {', '.join(unknown)}", count)
    return {"ok": True, "count": count}


async def _flushAll(control: IQueueControl) -> dict[str, Any]:
    try:
        scheduled = await maybeDeferred(control.flush, None)
    except Exception as e:
        _log.failure("Control: flush failed")
        return _error(f"flush failed: {e}", 0)
    _log.info("Control: flush of the whole queue ({count} scheduled)", count=scheduled)
    return {"ok": True, "count": int(scheduled) if isinstance(scheduled, int) else 0}


async def _flushDomain(control: IQueueControl, domain: str) -> dict[str, Any]:
    flushDomain = getattr(control, "flushDomain", None)
    if flushDomain is None:
        return _error("this gateway cannot flush by domain", 0)
    try:
        counts = await maybeDeferred(flushDomain, domain.removeprefix("@"), domain.startswith("@"))
    except Exception as e:
        _log.failure("Control: flush of {domain} failed", domain=domain)
        return _error(f"flush of {_show(domain)} failed: {e}", 0)
    count = counts.started + counts.inFlight
    _log.info("Control: flush of {domain} ({count} scheduled)", domain=domain, count=count)
    return {"ok": True, "count": count, "held": counts.held}


def handleRequest(
    control: IQueueControl,
    line: bytes,
    reload: Callable[[], Any] | None = None,
    breaker: IAccountBreaker | None = None,
) -> Deferred[dict[str, Any]]:
    """
    Carry out the request ``line`` on ``control``; ``reload`` reloads the
    gateway (True: applied, False: refused).

    @return: a Deferred firing with the answer (never failing): ``count`` is
        how many messages were acted on (for ``flush``, scheduled), also in
        an error answer after some were. Unknown ids do not stop the others.
    """
    parsed = parseRequest(line)
    if isinstance(parsed, dict):
        return succeed(parsed)
    command, ids = parsed
    if command == "ping":
        return succeed({"ok": True, "count": 0})
    if command == "reload":
        return _reload(reload)
    if command in ACCOUNT_COMMANDS:
        return accountCommand(breaker, control, command, ids)
    if command == "flush" and not ids:
        return Deferred.fromCoroutine(_flushAll(control))
    if command == "flush-domain":
        return Deferred.fromCoroutine(_flushDomain(control, ids[0]))
    return Deferred.fromCoroutine(_perMessage(control, command, ids))


def _reload(reload: Callable[[], Any] | None) -> Deferred[dict[str, Any]]:
    if reload is None:
        return succeed(_error("this gateway cannot reload over its control socket", 0))
    _log.info("Control: reload")

    def done(applied: Any) -> dict[str, Any]:
        if applied:
            return {"ok": True, "count": 0}
        return _error("reload refused: the running configuration stays in force (see the log)", 0)

    def failed(failure: Any) -> dict[str, Any]:
        _log.failure("Control: reload failed", failure)
        return _error("reload failed (see the log)", 0)

    return maybeDeferred(reload).addCallbacks(done, failed)


class ControlProtocol(LineReceiver, TimeoutMixin):
    """
    One connection to the control socket: requests are read one at a time
    (reading pauses while one is carried out), and an idle connection is
    closed after the factory's ``idleTimeout``.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE_LENGTH
    factory: ControlFactory
    transport: Any

    def callLater(self, period: float, func: Any) -> Any:
        # TimeoutMixin would use the global reactor.
        return self.factory.reactor.callLater(period, func)

    def connectionMade(self) -> None:
        self.factory.connections.add(self)
        self.setTimeout(self.factory.idleTimeout)

    def connectionLost(self, reason: Any = None) -> None:
        # A command still running answers nobody and resumes nothing.
        self.connected = False
        self.factory.connections.discard(self)
        self.setTimeout(None)

    def timeoutConnection(self) -> None:
        self.transport.loseConnection()

    def lineReceived(self, line: bytes) -> None:
        factory = self.factory
        d = handleRequest(factory.control, line.rstrip(b"\r"), factory.reload, factory.breaker)
        d.addErrback(self._failed)
        if d.called:
            d.addCallback(self._answer)
            self.resetTimeout()
            return
        self.setTimeout(None)
        self.pauseProducing()
        d.addCallback(self._answer)
        d.addCallback(lambda _: self._resume())

    def _failed(self, failure: Any) -> dict[str, Any]:
        _log.failure("Control request failed", failure)
        return _error("internal error (see the gateway's log)")

    def _answer(self, answer: dict[str, Any]) -> None:
        if self.connected:
            self.sendLine(json.dumps(answer).encode("ascii"))

    def _resume(self) -> None:
        if self.connected and not self.transport.disconnecting:
            self.setTimeout(self.factory.idleTimeout)
            self.resumeProducing()

    def lineLengthExceeded(self, line: bytes) -> None:
        self._answer(_error(f"request line too long (at most {MAX_LINE_LENGTH} bytes)"))
        self.transport.loseConnection()


class ControlFactory(Factory):
    """Makes L{ControlProtocol}s serving ``control``."""

    noisy = False

    def __init__(
        self,
        control: IQueueControl,
        reactor: Any,
        idleTimeout: float = 60.0,
        reload: Callable[[], Any] | None = None,
        breaker: IAccountBreaker | None = None,
    ) -> None:
        self.control = control
        self.reload = reload
        self.breaker = breaker
        self.reactor = reactor
        self.idleTimeout = idleTimeout
        self.connections: set[ControlProtocol] = set()

    def buildProtocol(self, addr: Any) -> ControlProtocol:  # type: ignore[override]
        protocol = ControlProtocol()
        protocol.factory = self
        return protocol


def removeStaleSocket(path: str) -> None:
    """
    Remove a socket file left at ``path`` by a process that died; leave
    ``path`` alone if it does not exist.

    @raise CannotListenError: ``path`` is not a socket, or something still
        listens there (another gateway: permanent until it stops).
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise CannotListenError(None, path, e) from None
    if not stat.S_ISSOCK(mode):
        raise CannotListenError(None, path, "exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        _log.info("Removing stale control socket {path}", path=path)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    except OSError as e:
        raise CannotListenError(None, path, f"cannot tell whether it is in use: {e}") from None
    finally:
        probe.close()
    raise CannotListenError(None, path, "another process listens on it")


class ControlService(Service):
    """
    Serves the control socket at ``path`` over ``control`` while running.

    Starting it replaces a stale socket file, listens with mode 0600 and
    raises L{CannotListenError} when it cannot (another process listens
    there, or the directory is missing: permanent until fixed). Stopping it
    closes the open connections and removes the socket file.

    The socket is created before its mode is set to 0600: keep it in a
    directory only the gateway's user can enter (the spool's is 0700).
    """

    def __init__(
        self,
        path: str,
        control: IQueueControl,
        reactor: Any,
        idleTimeout: float = 60.0,
        reload: Callable[[], Any] | None = None,
        breaker: IAccountBreaker | None = None,
    ) -> None:
        self.path = path
        self.reactor = reactor
        self.factory = ControlFactory(control, reactor, idleTimeout, reload, breaker)
        self.port: Any = None

    def startService(self) -> None:
        removeStaleSocket(self.path)
        self.port = self.reactor.listenUNIX(self.path, self.factory, mode=0o600)
        _log.info("Control socket listening on {path}", path=self.path)
        super().startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        port, self.port = self.port, None
        for connection in list(self.factory.connections):
            connection.transport.loseConnection()
        if port is None:
            return succeed(None)
        # The port removes its socket file once it has stopped listening.
        return maybeDeferred(port.stopListening)


# The client side, for the `mailgw queue` command: plain blocking sockets.


def _readAnswer(sock: socket.socket, path: str, deadline: float) -> bytes:
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError()
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        if not chunk:
            raise ControlError(f"{path}: the gateway closed the connection without answering")
        data += chunk
        if len(data) > MAX_LINE_LENGTH + 1 and b"\n" not in data:
            raise ControlError(f"{path}: the gateway's answer is too long")
    return data.partition(b"\n")[0]


def sendCommand(
    path: str,
    command: str,
    ids: Iterable[str] = (),
    timeout: float = 10.0,
    domain: str | None = None,
) -> dict[str, Any]:
    """
    Send one request to the control socket at ``path`` and wait for the
    answer, at most ``timeout`` seconds in all. Blocking: for the command
    line, or a thread.

    @return: the answer: ``{"ok": True, "count": n}`` or ``{"ok": False,
        "error": text}`` (and maybe ``count``).
    @raise ControlUnavailable: nothing listens at ``path``.
    @raise ControlError: any other failure to get an answer (permission
        denied, timeout, a closed connection, a malformed answer).
    """
    fields: dict[str, Any] = {"command": command, "ids": list(ids)}
    if domain is not None:
        fields["domain"] = domain
    request = json.dumps(fields).encode("ascii")
    if len(request) > MAX_LINE_LENGTH:
        raise ControlError(f"request too long: send at most {MAX_IDS} ids at a time")
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlUnavailable(
                f"nothing listens on {path} (is the gateway running?)"
            ) from None
        except PermissionError:
            raise ControlError(
                f"{path}: permission denied (run this as the gateway's user or root)"
            ) from None
        sock.sendall(request + b"\n")
        line = _readAnswer(sock, path, deadline)
    except TimeoutError:
        raise ControlError(f"{path}: no answer from the gateway within {timeout:g} s") from None
    except ControlError:
        raise
    except OSError as e:
        raise ControlError(f"{path}: {e.strerror or e}") from None
    finally:
        sock.close()
    try:
        answer = json.loads(line)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
        raise ControlError(f"{path}: not an answer from a mailgw gateway")
    return answer
