"""
A real ``redis-server`` for a test: on 127.0.0.1 and a UNIX socket in a
temporary directory, with its own configuration file (no persistence),
stopped by its pid at the end of the test; it can be stopped and started
again on the same port mid-test.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from twisted.trial.unittest import SkipTest, TestCase

from tests.integration.support import freePort, shortDirectory, stopProcess


def redisServerPath() -> str:
    path = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if path is None:
        raise SkipTest("redis-server is not installed (Debian package redis-server)")
    return path


class RedisServer:
    """A ``redis-server`` of the test ``testCase``; ``password``: its requirepass."""

    def __init__(self, testCase: TestCase, password: str = "") -> None:
        self.program = redisServerPath()
        self.directory = shortDirectory(testCase)
        self.port = freePort()
        self.socket = str(self.directory / "redis.sock")
        self.password = password
        self.config = self.directory / "redis.conf"
        lines = [
            "bind 127.0.0.1",
            f"port {self.port}",
            f"dir {self.directory}",
            'save ""',
            "appendonly no",
            "daemonize no",
            f"unixsocket {self.socket}",
            "unixsocketperm 700",
            f"logfile {self.directory / 'redis.log'}",
        ]
        if password:
            lines.append(f"requirepass {password}")
        self.config.write_text("\n".join(lines) + "\n")
        self.process: subprocess.Popen[bytes] | None = None
        testCase.addCleanup(self.stop)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it and wait (bounded) until it answers PING."""
        self.process = subprocess.Popen(
            [self.program, str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (self.directory / "redis.log").read_text(errors="replace")
                raise AssertionError(f"redis-server exited with {self.process.returncode}:\n{log}")
            if self._pong():
                return
            time.sleep(0.05)
        raise AssertionError("redis-server does not answer after 20 s")

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                if self.password:
                    s.sendall(f"AUTH {self.password}\r\n".encode())
                    s.recv(100)
                s.sendall(b"PING\r\n")
                return s.recv(100).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            stopProcess(self.process)
            self.process = None
