"""
In-memory fakes of mailgw's seams, for our own tests and for those of
applications that embed mailgw. Each implements its interface fully and is
checked with C{verifyObject}; each has knobs to inject failures and delays.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from zope.interface import implementer

from mailgw.envelope import (
    Address,
    BodyType,
    DeliveryResult,
    Envelope,
    QueuedMessage,
    Session,
)
from mailgw.interfaces import (
    IEditableWriter,
    IRelay,
    ISpool,
    IWebhookSender,
    SpoolError,
)


@implementer(IEditableWriter)
@attrs.define(eq=False)
class MemoryMessageWriter:
    """
    A message being written into a L{MemorySpool}; behaves like the real
    writer (L{mailgw.queue.spool.SpoolWriter}) as seen from outside.

    @ivar data: the bytes written so far.
    @ivar state: ``"open"``, ``"committing"`` (commit held, see
        L{MemorySpool.holdCommits}), ``"committed"``, ``"failed"`` or
        ``"aborted"``.
    """

    spool: MemorySpool
    queueId: str
    envelope: Envelope
    session: Session
    data: bytearray = attrs.field(factory=bytearray)
    state: str = "open"
    error: SpoolError | None = None
    abortRequested: bool = False
    message: QueuedMessage | None = None
    amendment: tuple[Any, Any, str | None] | None = None

    def amend(self, rewrite: Any, recipients: Any, holdReason: str | None) -> None:
        if self.state != "open":
            raise RuntimeError(f"amend of a {self.state} message")
        self.amendment = (rewrite, recipients, holdReason)

    def write(self, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        if self.state != "open":
            raise RuntimeError(f"write to a {self.state} message")
        error, self.spool._writeError = self.spool._writeError, None
        if error is not None:
            raise self._fail(error)
        self.data += data

    def commit(self) -> Deferred[str]:
        if self.error is not None:
            return fail(self.error)
        if self.state != "open":
            raise RuntimeError(f"commit of a {self.state} message")
        self.state = "committing"
        error, self.spool._commitError = self.spool._commitError, None
        if error is not None:
            return fail(self._fail(error))
        if self.spool.holdCommits:
            d: Deferred[str] = Deferred()
            self.spool.heldCommits.append((self, d))
            return d
        return succeed(self._finish())

    def abort(self) -> None:
        if self.state == "committing":
            self.abortRequested = True
        elif self.state in ("open", "failed"):
            self.state = "aborted"
            self.data.clear()
            self.spool.aborted.append(self.queueId)

    def _fail(self, error: SpoolError) -> SpoolError:
        self.state, self.error = "failed", error
        self.data.clear()
        return error

    def _finish(self) -> str:
        """Record the message as committed and return its id."""
        if self.abortRequested:
            self.state = "aborted"
            self.spool.aborted.append(self.queueId)
            raise SpoolError(f"{self.queueId} aborted during its commit")
        now = self.spool.clock.seconds()
        envelope, hold = self.envelope, None
        if self.amendment is not None:
            rewrite, recipients, hold = self.amendment
            if rewrite is not None:
                target = io.BytesIO()
                rewrite(io.BytesIO(bytes(self.data)), target)
                self.data = bytearray(target.getvalue())
            if recipients is not None:
                envelope = attrs.evolve(envelope, recipients=recipients)
        if envelope.body is BodyType.SEVENBIT and not self.data.isascii():
            envelope = attrs.evolve(envelope, body=BodyType.EIGHTBITMIME)
        message = QueuedMessage.arrived(self.queueId, envelope, self.session, now, len(self.data))
        if hold is not None:
            message = attrs.evolve(message, held=True, holdReason=hold)
        self.state = "committed"
        self.message = message
        self.spool.committed[self.queueId] = (message, bytes(self.data))
        return self.queueId


@implementer(ISpool)
@attrs.define(eq=False)
class MemorySpool:
    """
    L{ISpool} in memory. Queue ids are deterministic (``00000000000000000001``,
    ``...02``, ...) and of the same form as the real spool's.

    Knobs:
      - L{failNextBegin}, L{failNextWrite}, L{failNextCommit}: the next call
        of that kind fails with the given L{SpoolError} (default: a plain
        L{SpoolError}; pass a L{mailgw.queue.spool.SpoolFullError} for 452).
      - ``holdChanges``: while true, ``update`` and ``remove`` return unfired
        Deferreds, applied in call order by L{releaseChanges}.
      - ``holdCommits``: while true, ``commit`` returns an unfired Deferred
        and appends ``(writer, deferred)`` to ``heldCommits``; fire them with
        L{releaseCommits} or L{failHeldCommits}, so a test can see that
        nothing is replied before the commit.

    Records:
      - ``committed``: queue id -> (L{QueuedMessage}, message bytes), in
        commit order; L{update} replaces the QueuedMessage, L{remove} drops
        the entry.
      - ``writers``: every writer begun; ``aborted``: ids of aborted writers;
        ``removed``: ids passed to L{remove}.

    @ivar clock: gives arrival times; a fresh L{Clock} (time 0) by default.
    """

    clock: IReactorTime = attrs.field(factory=Clock)
    holdCommits: bool = False
    heldCommits: list[tuple[MemoryMessageWriter, Deferred[str]]] = attrs.field(factory=list)
    holdChanges: bool = False
    heldChanges: list[tuple[str, Any, Deferred[Any]]] = attrs.field(factory=list)
    committed: dict[str, tuple[QueuedMessage, bytes]] = attrs.field(factory=dict)
    writers: list[MemoryMessageWriter] = attrs.field(factory=list)
    aborted: list[str] = attrs.field(factory=list)
    removed: list[str] = attrs.field(factory=list)
    _counter: int = 0
    _beginError: SpoolError | None = None
    _writeError: SpoolError | None = None
    _commitError: SpoolError | None = None

    def failNextBegin(self, error: SpoolError | None = None) -> None:
        """Make the next L{begin} raise ``error``."""
        self._beginError = error or SpoolError("injected begin failure")

    def failNextWrite(self, error: SpoolError | None = None) -> None:
        """Make the next ``write`` of any writer raise ``error``."""
        self._writeError = error or SpoolError("injected write failure")

    def failNextCommit(self, error: SpoolError | None = None) -> None:
        """Make the next ``commit`` of any writer fail with ``error``."""
        self._commitError = error or SpoolError("injected commit failure")

    def releaseCommits(self) -> list[str]:
        """
        Complete every held commit, oldest first, and fire its Deferred
        (with the queue id, or a L{SpoolError} if the writer was aborted
        meanwhile).

        @return: the ids committed.
        """
        held, self.heldCommits = self.heldCommits, []
        done = []
        for writer, d in held:
            try:
                queueId = writer._finish()
            except SpoolError as e:
                d.errback(e)
            else:
                done.append(queueId)
                d.callback(queueId)
        return done

    def failHeldCommits(self, error: SpoolError | None = None) -> None:
        """Fail every held commit with ``error`` (default: L{SpoolError})."""
        held, self.heldCommits = self.heldCommits, []
        for writer, d in held:
            d.errback(writer._fail(error or SpoolError("injected commit failure")))

    def begin(self, envelope: Envelope, session: Session) -> MemoryMessageWriter:
        error, self._beginError = self._beginError, None
        if error is not None:
            raise error
        self._counter += 1
        writer = MemoryMessageWriter(self, f"{self._counter:020X}", envelope, session)
        self.writers.append(writer)
        return writer

    def pending(self) -> list[QueuedMessage]:
        return sorted((m for m, _ in self.committed.values()),
                      key=lambda m: (m.arrival, m.queueId))  # fmt: skip

    def load(self, queueId: str) -> QueuedMessage:
        return self.committed[queueId][0]

    def openMessage(self, queueId: str) -> BinaryIO:
        return io.BytesIO(self.committed[queueId][1])

    def update(self, message: QueuedMessage) -> Deferred[QueuedMessage]:
        """
        Fails with KeyError if ``message`` is not committed (when it is
        applied: a held update after a held remove fails, as on disk).
        """
        return self._change("update", message)

    def remove(self, queueId: str) -> Deferred[None]:
        """Idempotent, like the real spool's."""
        return self._change("remove", queueId)

    def _change(self, kind: str, argument: Any) -> Deferred[Any]:
        if self.holdChanges:
            d: Deferred[Any] = Deferred()
            self.heldChanges.append((kind, argument, d))
            return d
        try:
            return succeed(self._apply(kind, argument))
        except KeyError as e:
            return fail(e)

    def _apply(self, kind: str, argument: Any) -> Any:
        if kind == "remove":
            self.removed.append(argument)
            self.committed.pop(argument, None)
            return None
        entry = self.committed.get(argument.queueId)
        if entry is None:
            raise KeyError(argument.queueId)
        self.committed[argument.queueId] = (argument, entry[1])
        return argument

    def releaseChanges(self, count: int | None = None) -> None:
        """
        Apply the held updates and removes (the first ``count``, or all) in
        call order, firing their Deferreds, as the real spool's thread
        would: the knob ``holdChanges`` lets a test race them.
        """
        held = self.heldChanges if count is None else self.heldChanges[:count]
        self.heldChanges = self.heldChanges[len(held) :]
        for kind, argument, d in held:
            try:
                result = self._apply(kind, argument)
            except KeyError as e:
                d.errback(e)
            else:
                d.callback(result)


# -- A scripted relay ---------------------------------------------------------

_REPLY = re.compile(r"([2-5]\d\d)(?:[ -]([2-5]\.\d{1,3}\.\d{1,3}))?(?:[ -](.*))?\Z", re.DOTALL)


@attrs.frozen
class ScriptedOutcome:
    """
    What a L{FakeRelay} answers for one recipient in one attempt; made by
    L{success}, L{transient} and L{permanent}.
    """

    success: bool
    permanent: bool = False
    code: int = 0
    enhanced: str = ""
    text: str = ""
    remote: str = "upstream.example"
    dsnPassed: bool = False  # the upstream took the DSN parameters (RFC 3461)

    def resultFor(self, recipient: Address) -> DeliveryResult:
        """This outcome as the L{DeliveryResult} of ``recipient``."""
        return DeliveryResult(recipient, self.success, self.permanent, self.code,
                              self.enhanced, self.text, self.remote, self.dsnPassed)  # fmt: skip


def _outcome(success: bool, permanent: bool, reply: str, remote: str) -> ScriptedOutcome:
    # "450 4.2.0 busy" -> code 450, enhanced 4.2.0, text "busy"; anything not
    # starting with a reply code is a failure without a reply (code 0).
    m = _REPLY.match(reply)
    if m is None:
        return ScriptedOutcome(success, permanent, 0, "", reply, remote)
    code, enhanced, text = int(m.group(1)), m.group(2) or "", (m.group(3) or "").strip()
    return ScriptedOutcome(success, permanent, code, enhanced, text, remote)


def success(
    reply: str = "250 2.0.0 Ok", remote: str = "upstream.example", dsnPassed: bool = False
) -> ScriptedOutcome:
    """The upstream took the recipient (and its DSN requests, with ``dsnPassed``)."""
    return attrs.evolve(_outcome(True, False, reply, remote), dsnPassed=dsnPassed)


def transient(
    reply: str = "451 4.3.0 try again later", remote: str = "upstream.example"
) -> ScriptedOutcome:
    """
    A failure that retrying may fix: a 4xx ``reply``, or text without a
    code (``transient("connection refused", remote="")``).
    """
    return _outcome(False, False, reply, remote)


def permanent(
    reply: str = "550 5.1.1 no such user", remote: str = "upstream.example"
) -> ScriptedOutcome:
    """A failure retrying cannot fix: the recipient bounces."""
    return _outcome(False, True, reply, remote)


@attrs.define(eq=False)
class RelayCall:
    """
    One call of L{FakeRelay.deliver} (``many`` false, one message) or
    L{FakeRelay.deliverMany}, with the results the script gave at call time.
    """

    messages: tuple[QueuedMessage, ...]
    many: bool
    deferred: Deferred[Any]
    results: dict[str, list[DeliveryResult]]
    failure: BaseException | None = None
    report: Callable[[str, list[DeliveryResult]], object] | None = None
    reported: list[str] = attrs.field(factory=list)

    @property
    def fired(self) -> bool:
        return self.deferred.called

    @property
    def queueIds(self) -> list[str]:
        return [m.queueId for m in self.messages]

    def reportOne(self, queueId: str) -> None:
        """
        Report ``queueId``'s results now (a ``deliverMany`` with ``report``),
        as a relay does when that message's routes are done while others
        are still in flight.
        """
        if self.report is not None and queueId not in self.reported:
            self.reported.append(queueId)
            self.report(queueId, self.results[queueId])

    def fire(self) -> None:
        """
        Report every message not reported yet (unless the call is to fail),
        then fire the Deferred with the results, or fail it if asked to.
        """
        if self.failure is not None:
            self.deferred.errback(self.failure)
        elif self.many:
            for message in self.messages:
                self.reportOne(message.queueId)
            self.deferred.callback(self.results)
        else:
            self.deferred.callback(self.results[self.messages[0].queueId])

    def fail(self, error: BaseException | None = None) -> None:
        """Fail the Deferred (which a real relay never does)."""
        self.deferred.errback(error or RuntimeError("injected relay failure"))


@implementer(IRelay)
@attrs.define(eq=False)
class FakeRelay:
    """
    L{IRelay} (with ``deliverMany``) answering from a script.

    ``script`` maps a recipient address (``"bob@example.org"``) to the
    outcomes of its next attempts, used up one per attempt; once a list is
    empty, or for an address not in it, ``default`` (L{success}) answers::

        relay.script["bob@example.org"] = [transient("450 4.2.0 busy"), success()]

    Records every call in ``calls`` (L{RelayCall}) and every recipient tried
    in ``attempts`` as ``(queueId, "address")``. While ``holdResults`` is
    true, calls return unfired Deferreds: fire them with
    L{RelayCall.fire}, L{RelayCall.fail} or L{releaseAll}.
    L{failNextCall} makes the next call's Deferred fail.
    """

    script: dict[str, list[ScriptedOutcome]] = attrs.field(factory=dict)
    default: ScriptedOutcome = attrs.field(factory=success)
    holdResults: bool = False
    calls: list[RelayCall] = attrs.field(factory=list)
    attempts: list[tuple[str, str]] = attrs.field(factory=list)
    _failNext: BaseException | None = None

    def failNextCall(self, error: BaseException | None = None) -> None:
        """Make the next call's Deferred fail with ``error``."""
        self._failNext = error or RuntimeError("injected relay failure")

    @property
    def heldCalls(self) -> list[RelayCall]:
        """The calls whose Deferreds have not fired yet, oldest first."""
        return [c for c in self.calls if not c.fired]

    def releaseAll(self) -> None:
        """Fire every held call, oldest first."""
        for call in self.heldCalls:
            call.fire()

    def deliver(self, message: QueuedMessage) -> Deferred[list[DeliveryResult]]:
        return self._call((message,), many=False)

    def deliverMany(
        self,
        messages: Sequence[QueuedMessage],
        report: Callable[[str, list[DeliveryResult]], object] | None = None,
    ) -> Deferred[dict[str, list[DeliveryResult]]]:
        """
        As the real relay's: ``report(queueId, results)`` is called once per
        message (at L{RelayCall.reportOne} or L{RelayCall.fire}).
        """
        return self._call(tuple(messages), many=True, report=report)

    def _next(self, address: Address) -> ScriptedOutcome:
        outcomes = self.script.get(str(address))
        return outcomes.pop(0) if outcomes else self.default

    def _call(
        self,
        messages: tuple[QueuedMessage, ...],
        many: bool,
        report: Callable[[str, list[DeliveryResult]], object] | None = None,
    ) -> Deferred[Any]:
        results = {}
        for message in messages:
            results[message.queueId] = [
                self._next(r.address).resultFor(r.address) for r in message.pendingRecipients
            ]
            self.attempts.extend((message.queueId, str(r.address))
                                 for r in message.pendingRecipients)  # fmt: skip
        failure, self._failNext = self._failNext, None
        call = RelayCall(messages, many, Deferred(), results, failure, report)
        self.calls.append(call)
        if not self.holdResults:
            call.fire()
        return call.deferred


@implementer(IWebhookSender)
@attrs.define
class RecordingWebhooks:
    """An L{IWebhookSender} that records each event as ``(event, payload)``."""

    events: list[tuple[str, dict[str, Any]]] = attrs.field(factory=list)

    def send(self, event: str, payload: dict[str, Any]) -> None:
        self.events.append((event, payload))

    def named(self, event: str) -> list[dict[str, Any]]:
        """The payloads of every ``event`` sent."""
        return [payload for name, payload in self.events if name == event]
