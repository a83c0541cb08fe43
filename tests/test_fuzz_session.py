"""
A connection-level fuzzer for the submission session (hypothesis stateful
testing), seeded from the dialog corpus in tests/dialogs/.

Each step sends client bytes: lines of the corpus, mutated or not,
pipelined several to a write and cut at random points; a whole message; a
STARTTLS with commands pipelined behind it; an over-long line; or lets time
pass, shuts the listener down or hangs up. The policy and the password
check answer at once or later, as the step decides. After every step the
model walks the bytes sent and the replies received and checks:

  - no exception escapes (nothing raised, nothing logged as an error);
  - one reply per command, in order, however the commands were pipelined
    (a reply to DATA opens the data, which one reply ends; the bytes after
    an accepted STARTTLS are dropped unanswered; nothing after a close);
  - nothing survives STARTTLS or RSET;
  - nothing is committed without a 250 (and no message writer is left open
    once the connection is gone).
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from twisted.cred.checkers import ICredentialsChecker, InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import IUsernamePassword
from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from mailgw.envelope import Session
from mailgw.replies import SMTPReply
from mailgw.server.connection import MAX_COMMAND_LINE
from tests.helpers import PASSWORD, USER, Harness

DIALOGS = Path(__file__).parent / "dialogs"


def _corpusLines() -> list[bytes]:
    """Every client line of the corpus that is a single command (``C:``)."""
    lines: set[bytes] = set()
    for path in DIALOGS.glob("*.txt"):
        for raw in path.read_text().splitlines():
            if raw.startswith("C: "):
                data = raw[3:].encode("utf-8").decode("unicode_escape").encode("latin-1")
                for line in data.split(b"\r\n"):
                    # STARTTLS and BDAT have rules of their own (a BDAT
                    # line is followed by its chunk's bytes).
                    if not line.upper().startswith((b"STARTTLS", b"BDAT")):
                        lines.add(line)
    return sorted(lines)


CORPUS = _corpusLines()
TOKEN = base64.b64encode(b"\0" + USER + b"\0" + PASSWORD)
EXTRA = [
    b"EHLO client.test",
    b"AUTH PLAIN " + TOKEN,
    b"MAIL FROM:<alice@example.com>",
    b"RCPT TO:<refuse@example.org>",
    b"RCPT TO:<boom@example.org>",
    b"RCPT TO:<bob@example.org>",
    b"DATA",
]
POOL = CORPUS + EXTRA * 8  # the commands that make progress come up often

_REPLY = re.compile(rb"^(\d{3})([ -])(.*)$")
_BDAT = re.compile(rb"^BDAT (\d{1,18})( LAST)?\r?$", re.IGNORECASE)


class Held:
    """Answers now or later: each answer is queued when ``later`` is set."""

    def __init__(self) -> None:
        self.later = False
        self.pending: list[tuple[Deferred[Any], Any]] = []

    def answer(self, value: Any) -> Any:
        if not self.later:
            if isinstance(value, Exception):
                raise value
            return value
        d: Deferred[Any] = Deferred()
        self.pending.append((d, value))
        return d

    def release(self) -> bool:
        pending, self.pending = self.pending, []
        for d, value in pending:
            if isinstance(value, Exception):
                d.errback(Failure(value))
            else:
                d.callback(value)
        return bool(pending)


class FuzzPolicy:
    """Refuses recipients named ``refuse``, fails on ``boom``; sometimes late."""

    def __init__(self, held: Held) -> None:
        self.held = held

    def checkSender(self, session: Session, sender: object) -> Any:
        return self.held.answer(None)

    def checkRecipient(self, session: Session, sender: object, recipient: Any) -> Any:
        if recipient.local == "refuse":
            return self.held.answer(SMTPReply(550, "5.7.1", "Refused by policy"))
        if recipient.local == "boom":
            return self.held.answer(RuntimeError("policy backend down"))
        return self.held.answer(None)

    def checkMessage(self, session: Session, envelope: object, headers: bytes) -> Any:
        if b"refuse" in headers:
            return self.held.answer(SMTPReply(550, "5.7.1", "Refused by policy"))
        return self.held.answer(None)


@implementer(ICredentialsChecker)
class FuzzChecker:
    """The test user's password, answered now or later."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, held: Held) -> None:
        self.held = held
        self.real = InMemoryUsernamePasswordDatabaseDontUse(**{USER.decode(): PASSWORD})

    def requestAvatarId(self, credentials: Any) -> Any:
        d = self.real.requestAvatarId(credentials)
        results: list[Any] = []
        d.addBoth(results.append)
        value = results[0]
        return self.held.answer(value.value if isinstance(value, Failure) else value)


def mutate(line: bytes, how: int, where: int, byte: int) -> bytes:
    if how == 0 or not line:
        return line
    i = where % (len(line) + 1)
    if how == 1:
        return line[:i]  # truncated
    if how == 2:
        return line[:i] + bytes([byte]) + line[i:]  # a byte inserted
    if how == 3:
        return line.lower()
    return line[:i] + line[i:].upper()


class SessionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.held = Held()
        self.stream = b""  # client bytes the model has not matched with replies yet
        self.inData = False
        self.gone = False  # closed by the server, or hung up
        self.queuedIds: set[str] = set()
        # Messages whose commit was running when the client hung up.
        self.committedUnanswered: set[str] = set()
        self.replies: list[bytes] = []
        self.errors: list[Any] = []
        globalLogPublisher.addObserver(self.observe)

    @initialize(
        implicitTLS=st.booleans(),
        start=st.sampled_from(["fresh", "ehlo", "login", "login", "login"]),
    )
    def connect(self, implicitTLS: bool, start: str) -> None:
        """A listener and a first connection: fresh, greeted, or logged in."""
        self.h = Harness(
            implicitTLS=implicitTLS,
            checkers=[FuzzChecker(self.held)],
            maxErrors=1000,
            maxJunkCommands=1000,
            maxRecipients=5,
            maxMessageSize=2000,
        )
        self.h.factory.policy = FuzzPolicy(self.held)
        self.h.spool.holdCommits = True
        if start == "ehlo":
            self.h.command(b"EHLO client.test")
        elif start == "login":
            self.h.login()

    def observe(self, event: Any) -> None:
        failure = event.get("log_failure")
        if failure is not None and not failure.check(RuntimeError):
            self.errors.append(failure)  # only the policy's injected RuntimeError is expected

    # -- the model ------------------------------------------------------

    def settle(self) -> None:
        """Answer everything held (checks and commits) until nothing is left."""
        while self.held.release() or self.h.spool.releaseCommits():
            pass

    def collect(self) -> None:
        for line in self.h.take().split(b"\r\n")[:-1]:
            match = _REPLY.match(line)
            assert match is not None, line
            if match.group(2) == b" ":
                self.replies.append(line)

    def nextReply(self, what: bytes) -> bytes:
        assert self.replies, f"no reply to {what[:60]!r}"
        reply = self.replies.pop(0)
        if reply.startswith((b"421 ", b"221 ")):
            self.gone = True
        queued = re.match(rb"^250 2\.0\.0 Ok: queued as (\S+)$", reply)
        if queued:
            self.queuedIds.add(queued.group(1).decode())
        return reply

    def walk(self, starttls: bool = False) -> None:
        """Match the bytes sent with the replies, one reply per command."""
        self.settle()
        self.collect()
        while not self.gone:
            if self.inData:
                if self.stream.startswith(b".\r\n"):
                    end = 3
                else:
                    found = self.stream.find(b"\r\n.\r\n")
                    if found == -1:
                        break
                    end = found + 5
                self.stream = self.stream[end:]
                self.inData = False
                self.nextReply(b"end of data")
                continue
            end = self.stream.find(b"\n")
            if end == -1:
                assert len(self.stream) <= MAX_COMMAND_LINE, "the model sends whole lines"
                break
            line, self.stream = self.stream[:end], self.stream[end + 1 :]
            chunk = _BDAT.match(line)
            if chunk is not None:
                # RFC 3030: the chunk's bytes follow the line, then its reply.
                size = int(chunk.group(1))
                if len(self.stream) < size:
                    self.stream = line + b"\n" + self.stream
                    break
                self.stream = self.stream[size:]
            reply = self.nextReply(line)
            if len(line.rstrip(b"\r")) > MAX_COMMAND_LINE:
                assert reply.startswith(b"500 5.5.6"), reply
            elif reply.startswith(b"354 "):
                self.inData = True
            elif reply.startswith(b"220 ") and starttls:
                self.stream = b""  # RFC 3207 4.2: sent in the clear, dropped
        if not self.gone and self.replies and self.replies[0].startswith(b"421 "):
            # A deadline or a shutdown: one 421, unasked, and the close.
            self.replies.pop(0)
            self.gone = True
            assert self.h.closing
        if self.gone:
            self.stream = b""
        assert not self.replies, f"replies nobody asked for: {self.replies}"

    def send(self, data: bytes, cuts: list[int]) -> None:
        points = sorted({c % (len(data) + 1) for c in cuts}) + [len(data)]
        start = 0
        for point in points:
            if point > start:
                self.h.send(data[start:point])
                start = point
        self.stream += data

    # -- rules ------------------------------------------------------------

    @precondition(lambda self: not self.gone)
    @rule(
        picks=st.lists(
            st.tuples(
                st.sampled_from(POOL),
                st.integers(0, 7),
                st.integers(0, 200),
                st.integers(0, 255),
            ),
            min_size=1,
            max_size=6,
        ),
        cuts=st.lists(st.integers(0, 10_000), max_size=4),
        later=st.booleans(),
    )
    def commands(
        self, picks: list[tuple[bytes, int, int, int]], cuts: list[int], later: bool
    ) -> None:
        self.held.later = later
        lines = [mutate(line, how, where, byte) for line, how, where, byte in picks]
        data = b"".join(line.replace(b"\n", b"") + b"\r\n" for line in lines)
        self.send(data, cuts)
        self.walk()

    @precondition(lambda self: not self.gone)
    @rule(
        body=st.lists(
            st.sampled_from([b"Subject: x", b"", b".", b"..", b".leading", b"refuse", b"x" * 120]),
            max_size=20,
        ),
        cuts=st.lists(st.integers(0, 10_000), max_size=4),
        later=st.booleans(),
    )
    def message(self, body: list[bytes], cuts: list[int], later: bool) -> None:
        """A transaction, pipelined: MAIL, RCPT, DATA, the data, its end."""
        self.held.later = later
        data = b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
        data += b"".join(line + b"\r\n" for line in body) + b".\r\n"
        self.send(data, cuts)
        self.walk()

    @precondition(
        lambda self: not self.gone and not self.inData and not self.h.protocol._auth.exchanging
    )
    @rule(
        body=st.lists(
            st.sampled_from([b"Subject: x", b"", b".", b"..", b"QUIT", b"refuse", b"x" * 120]),
            max_size=20,
        ),
        sizes=st.lists(st.integers(0, 60), max_size=3),
        cuts=st.lists(st.integers(0, 10_000), max_size=4),
        later=st.booleans(),
    )
    def chunked(self, body: list[bytes], sizes: list[int], cuts: list[int], later: bool) -> None:
        """A transaction in BDAT chunks (RFC 3030), pipelined: MAIL, RCPT, the chunks."""
        self.held.later = later
        message = b"".join(line + b"\r\n" for line in body)
        data = b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\n"
        for size in sizes:
            piece, message = message[:size], message[size:]
            data += b"BDAT %d\r\n" % len(piece) + piece
        data += b"BDAT %d LAST\r\n" % len(message) + message
        self.send(data, cuts)
        self.walk()

    @precondition(lambda self: not self.gone and not self.inData)
    @rule(behind=st.lists(st.sampled_from(POOL), max_size=3))
    def starttls(self, behind: list[bytes]) -> None:
        exchanging = self.h.protocol._auth.exchanging
        tlsBefore = self.h.transport.tlsStarted
        data = b"STARTTLS\r\n" + b"".join(line + b"\r\n" for line in behind)
        self.h.send(data)
        self.stream += data
        self.walk(starttls=not exchanging)
        if not tlsBefore and self.h.transport.tlsStarted and not self.gone:
            # RFC 3207 4.2: nothing learnt before TLS holds after it.
            p = self.h.protocol
            assert (p._helo, p._user, p._esmtp) == (None, None, False)
            assert not p._transaction.started and not p._transaction.recipients
            assert not p._auth.exchanging

    @precondition(lambda self: not self.gone and not self.inData)
    @rule()
    def rset(self) -> None:
        exchanging = self.h.protocol._auth.exchanging
        self.h.send(b"RSET\r\n")
        self.stream += b"RSET\r\n"
        self.walk()
        if not exchanging and not self.gone:
            transaction = self.h.protocol._transaction
            assert not transaction.started and not transaction.recipients

    @precondition(lambda self: not self.gone and not self.inData)
    @rule(size=st.integers(MAX_COMMAND_LINE + 1, 40_000), step=st.integers(1000, 20_000))
    def longLine(self, size: int, step: int) -> None:
        data = b"NOOP " + b"x" * size + b"\r\n"
        for i in range(0, len(data), step):
            self.h.send(data[i : i + step])
        self.stream += data
        self.walk()

    @precondition(lambda self: not self.gone)
    @rule(seconds=st.sampled_from([1.0, 10.0, 31.0, 61.0]))
    def wait(self, seconds: float) -> None:
        self.h.clock.advance(seconds)
        self.walk()

    @precondition(lambda self: not self.gone)
    @rule()
    def shutdown(self) -> None:
        self.h.factory.shutdown()
        self.walk()
        assert self.gone

    @precondition(lambda self: not self.gone)
    @rule(
        during=st.sampled_from(["nothing", "check", "commit"]),
        body=st.lists(st.sampled_from([b"Subject: x", b"", b"..", b"body"]), max_size=5),
    )
    def hangUp(self, during: str, body: list[bytes]) -> None:
        """The client leaves: idle, while its message is checked, or while it commits."""
        if during != "nothing":
            self.held.later = True
            self.h.send(
                b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
                + b"".join(line + b"\r\n" for line in body)
                + b".\r\n"
            )
            # Answer the checks (MAIL, RCPT, then the message) up to the point.
            for _ in range(3 if during == "commit" else 2):
                self.held.release()
        self.committedUnanswered |= {w.queueId for w, _ in self.h.spool.heldCommits}
        self.h.hangUp()
        self.gone = True
        self.settle()
        self.h.take()

    @precondition(lambda self: self.gone)
    @rule()
    def reconnect(self) -> None:
        """A new connection to the same listener and spool."""
        self.h.clock.advance(self.h.factory.settings.closeTimeout)
        assert self.h.closed, "the closed connection is still there"
        self.h.connect()
        self.stream, self.inData, self.gone = b"", False, False

    # -- invariants -----------------------------------------------------------

    @invariant()
    def nothingCommittedWithout250(self) -> None:
        committed = set(self.h.spool.committed)
        assert self.queuedIds <= committed, (committed, self.queuedIds)
        # Only a commit already running when the client hung up goes on unanswered.
        assert committed - self.queuedIds <= self.committedUnanswered, committed

    @invariant()
    def noWriterLeftOpen(self) -> None:
        """Every writer but the current transaction's is committed or aborted."""
        current = self.h.protocol._transaction._writer
        if self.h.closing:
            current = None
        for writer in self.h.spool.writers:
            if writer is not current:
                assert writer.state in ("committed", "aborted"), writer.state

    @invariant()
    def noErrorLogged(self) -> None:
        assert not self.errors, self.errors

    def teardown(self) -> None:
        globalLogPublisher.removeObserver(self.observe)
        self.h.clock.advance(3600)  # every deadline passes: the session closes
        self.h.clock.advance(self.h.factory.settings.closeTimeout)
        assert self.h.closed, "the connection outlived its close deadline"


class SessionFuzzTests(SynchronousTestCase):
    def test_session(self) -> None:
        """The machine, bounded to run in seconds."""
        run_state_machine_as_test(
            SessionMachine,
            settings=settings(
                max_examples=250,
                stateful_step_count=20,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
        # The policy's injected backend failures are logged, as they should be.
        self.flushLoggedErrors(RuntimeError)
