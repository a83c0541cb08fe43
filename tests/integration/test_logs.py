"""
Logs an operator's tools read: the JSON log format serialises every field,
and the fail2ban filter in etc/fail2ban/ matches the AUTH throttle's lines as
the running gateway writes them (text and JSON), with the client's real
address even when the login tries to forge another.
"""

from __future__ import annotations

import configparser
import datetime
import io
import ipaddress
import json
import re
import shutil
import smtplib
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, globalLogPublisher, textFileLogObserver
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from mailgw.logs import JSONLinesObserver, ReopeningFile
from tests.integration.support import ROOT, GatewayTestCase, clientContext, run

FILTER = ROOT / "etc" / "fail2ban" / "mailgw.conf"
FORGED = 'x" client=198.51.100.66 network=198.51.100.0/24 failures=99 action=disconnect'


def failregexes() -> list[str]:
    parser = configparser.RawConfigParser()
    parser.read(FILTER)
    return [line.strip() for line in parser["Definition"]["failregex"].splitlines() if line]


def emulate(regex: str) -> re.Pattern[str]:
    """fail2ban's <ADDR> tag as a plain regex group (for machines without fail2ban)."""
    return re.compile(regex.replace("<ADDR>", r"(?P<addr>[0-9A-Fa-f.:]+)"))


def stripDate(line: str) -> str:
    """What fail2ban matches against once it has cut the leading time stamp."""
    return re.sub(r"^\S+", "", line, count=1)


class JSONObserverTests(SynchronousTestCase):
    def test_everyFieldSerialises(self) -> None:
        out = io.StringIO()
        observer = JSONLinesObserver(out)

        class Opaque:
            def __str__(self) -> str:
                return "opaque!"

        try:
            raise ZeroDivisionError("boom")
        except ZeroDivisionError:
            failure = Failure()
        observer(
            {
                "log_format": "hello {who} {data!r}",
                "log_level": LogLevel.warn,
                "log_namespace": "test",
                "log_time": 1764446400.5,
                "log_failure": failure,
                "who": Opaque(),
                "data": b"\xff\x00bytes",
                "address": ipaddress.ip_address("192.0.2.1"),
                "nested": {1: [Opaque(), {"x": float("nan")}], "set": {1}},
                "when": datetime.datetime(2026, 1, 1),
            }
        )
        [line] = out.getvalue().splitlines()
        record = json.loads(line)
        self.assertEqual(record["level"], "warn")
        self.assertEqual(record["time"], "2025-11-29T20:00:00.500000+00:00")
        self.assertEqual(record["text"], "hello opaque! b'\\xff\\x00bytes'")
        self.assertEqual(record["who"], "opaque!")
        self.assertEqual(record["data"], "\\xff\x00bytes")
        self.assertEqual(record["address"], "192.0.2.1")
        self.assertEqual(record["nested"], {"1": ["opaque!", {"x": "nan"}], "set": [1]})
        self.assertIn("ZeroDivisionError", record["traceback"])

    def test_reopen(self) -> None:
        """After a rename (logrotate) and reopen, lines go to a new file by the old name."""
        path = Path(self.mktemp())
        out = ReopeningFile(str(path))
        out.write("one\n")
        out.flush()
        path.rename(str(path) + ".1")
        out.write("two\n")
        out.reopen()
        out.write("three\n")
        out.flush()
        out.close()
        self.assertEqual(Path(str(path) + ".1").read_text(), "one\ntwo\n")
        self.assertEqual(path.read_text(), "three\n")


class Fail2banTests(GatewayTestCase):
    """Real throttle lines from failed logins over real TLS."""

    extraConfig = {"limits": {"auth_free_failures": 0, "auth_delay": 0.01, "auth_delay_max": 0.01}}

    def setUp(self) -> Any:
        self.text, self.json = io.StringIO(), io.StringIO()
        for observer in (textFileLogObserver(self.text), JSONLinesObserver(self.json)):
            globalLogPublisher.addObserver(observer)
            self.addCleanup(globalLogPublisher.removeObserver, observer)
        return super().setUp()

    def failLogins(self) -> None:
        with smtplib.SMTP("localhost", self.submissionPort, timeout=30) as smtp:
            smtp.starttls(context=clientContext(self.files["cert"]))
            for login in ("nobody@example.com", FORGED, "nobody@example.com"):
                try:
                    smtp.login(login, "wrong password")
                except smtplib.SMTPAuthenticationError:
                    pass

    @inlineCallbacks
    def test_filterMatchesRealLines(self) -> Any:
        yield deferToThread(self.failLogins)
        textLines = [line for line in self.text.getvalue().splitlines() if line]
        jsonLines = [line for line in self.json.getvalue().splitlines() if line]
        for line in jsonLines:
            json.loads(line)  # every event serialised
        throttled = [line for line in textLines if "auth-throttle" in line]
        self.assertGreaterEqual(len(throttled), 3, self.text.getvalue())

        regexes = [emulate(r) for r in failregexes()]
        for lines, strip in ((textLines, stripDate), (jsonLines, lambda line: line)):
            addresses = []
            for line in lines:
                for regex in regexes:
                    match = regex.search(strip(line))
                    if match:
                        addresses.append(match.group("addr"))
                        break
            # Every throttle line, and nothing else, with the real address.
            self.assertEqual(addresses, ["127.0.0.1"] * len(throttled))

        fail2banRegex = shutil.which("fail2ban-regex")
        if fail2banRegex is None:
            raise SkipTest("fail2ban is not installed: checked with an emulation of its tags only")
        for name, lines in (("text.log", textLines), ("json.log", jsonLines)):
            log = Path(self.mktemp())
            log.write_text("\n".join(lines) + "\n")
            result = yield run(
                fail2banRegex, "--raw", "-o", "ip", str(log), str(FILTER), timeout=120
            )
            self.assertEqual(result.returncode, 0, result.stderr)
            # One address per matched line: the connection's, never the forged one.
            self.assertEqual(result.stdout.split(), ["127.0.0.1"] * len(throttled), name)
