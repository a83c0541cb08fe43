"""
The queue runner: hands spooled messages to the relay when they are due,
records what became of each recipient, retries with backoff, and sends the
bounces and delay warnings the sender is owed (docs/queue.md).

Its promise: every accepted message reaches the upstream or its sender gets
a bounce saying why; nothing is dropped silently, across upstream outages,
restarts and crashes. The spool is the truth: results are written with
L{ISpool.update} before anything else happens to the message, a bounce is
committed before the state that says "bounced", and a message leaves the
spool only once every recipient is finished. A crash can make mail go out
twice (at least once), never be lost.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from mailgw.config import QueueConfig
from mailgw.envelope import (
    Address,
    Envelope,
    QueuedMessage,
    Session,
)
from mailgw.interfaces import IMessageWriter, IQueue, IQueueControl, IQueueView, IRelay, ISpool
from mailgw.queue.events import MessageEvents
from mailgw.queue.intake import SchedulingWriter, reportAs, takesReport
from mailgw.queue.operator import OperatorControl
from mailgw.queue.outcome import applyResults, backoff, logOutcome
from mailgw.queue.recording import RECORD_RETRY, Recording
from mailgw.queue.schedule import Schedule

__all__ = ["RECORD_RETRY", "STOP_TIMEOUT", "QueueRunner", "backoff"]

#: L{QueueRunner.stopService} waits at most this long for deliveries in flight.
STOP_TIMEOUT = 30.0

_log = Logger()
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


@implementer(IQueue, IQueueControl, IQueueView)
class QueueRunner(Recording, OperatorControl, Service):
    """
    The queue: owns the spool's contents and their schedule. Messages
    enter through L{begin}, whose commit schedules them; the runner hands
    them to ``relay`` when due, records each message's outcome as the relay
    reports it, retries with backoff, and sends the bounces and delay
    warnings the sender is owed. See the module docstring and docs/queue.md.

    @param clock: schedules attempts and timestamps results.
    @param config: retry timings, lifetimes and the delay warning.
    @param reportingMTA: our host name, in bounces and warnings.
    @param rng: the jitter of the backoff (seed it in tests).
    @param batchSize: at most this many messages per relay call.
    @param maxInFlight: at most this many messages handed to the relay and
        not yet reported at once (a slow upstream holds only its own
        messages: the others are reported, recorded and replaced).
    """

    def __init__(
        self,
        spool: ISpool,
        relay: IRelay,
        clock: IReactorTime,
        config: QueueConfig,
        reportingMTA: str,
        *,
        rng: random.Random | None = None,
        batchSize: int = 50,
        maxInFlight: int = 200,
    ) -> None:
        if batchSize < 1 or maxInFlight < 1:
            raise ValueError("batchSize and maxInFlight must be at least 1")
        reportingMTA = reportingMTA.removesuffix(".")  # a fully qualified "name."
        if not _HOSTNAME.fullmatch(reportingMTA):
            # Refuse now rather than fail to build every bounce later.
            raise ValueError(f"reportingMTA must be a host name, got {reportingMTA!r}")
        self._spool, self._relay, self._clock = spool, relay, clock
        self._config, self._reportingMTA = config, reportingMTA
        self._rng = rng or random.Random()
        self._batchSize, self._maxInFlight = batchSize, maxInFlight
        self._messages: dict[str, QueuedMessage] = {}  # every message known, newest state
        self._schedule = Schedule(self._eligible)
        self._busy: set[str] = set()  # in a relay call, or being recorded
        self._unsettled: set[str] = set()  # learnt more than the spool knows yet
        self._owed: dict[str, set[Address]] = {}  # bounced, but no bounce committed yet
        self._relayedOwed: dict[str, set[Address]] = {}  # owed a "relayed" report (NOTIFY)
        self._deleting: set[str] = set()  # deleted while busy
        self._flushed: set[str] = set()  # flushed or released while busy
        self._sent = 0  # messages handed to the relay, not reported yet
        self._calls = 0  # relay calls in flight
        self._timer: IDelayedCall | None = None
        self._pumping = self._pumpAgain = False
        self._idleWaiters: list[Deferred[None]] = []
        #: L{mailgw.metrics.Metrics}, or None: metrics are off.
        self.metrics: Any = None
        #: Who follows the messages' outcomes (the webhooks): L{MessageEvents}.
        self.events = MessageEvents()
        #: The breaker's hooks (docs/breaker.md), or None: ``screen(message)``
        #: for each message committed through L{begin}, before it is
        #: scheduled: why to hold it, or None; ``bounced(message, count)``
        #: when recipients of a message were refused for good.
        self.screen: Callable[[QueuedMessage], str | None] | None = None
        self.bounced: Callable[[QueuedMessage, int], None] | None = None

    def queueGauges(self) -> tuple[int, float | None]:
        """Messages queued, and the arrival time of the oldest (None: empty)."""
        messages = self._messages.values()
        return len(messages), min((m.arrival for m in messages), default=None)

    # -- intake (IQueue) ------------------------------------------------------

    def begin(self, envelope: Envelope, session: Session) -> IMessageWriter:
        """
        Start a message; its commit schedules it (at once) before it fires.

        @raise SpoolError: transient local failure.
        """
        return SchedulingWriter(self._spool.begin(envelope, session), self._accept)

    def _accept(self, message: QueuedMessage) -> Deferred[None] | None:
        if message.queueId in self._messages:
            return None
        why = None
        if self.screen is not None:
            try:
                why = self.screen(message)
            except Exception:
                _log.failure("Screening {queueId} failed", queueId=message.queueId)
        if why is not None:
            held = attrs.evolve(message, held=True)
            self._add(held)
            return self.holdAtIntake(held, why)  # the commit fires once that is on disk
        self._add(message)
        self._pump()
        return None

    # -- service --------------------------------------------------------------

    def startService(self) -> None:
        """
        Schedule every message of the spool, also those from before a
        restart, at its next attempt (held ones are kept but not tried).

        @raise SpoolError: the spool cannot be listed; the service does not start.
        """
        for message in self._spool.pending():
            if message.queueId not in self._messages:
                self._add(message)
        Service.startService(self)
        self._pump()

    def stopService(self) -> Deferred[None]:
        """
        Stop starting attempts; fire once the attempts in flight are
        recorded, or after L{STOP_TIMEOUT} seconds (their recipients are
        then tried again after the restart).
        """
        Service.stopService(self)
        self._cancelTimer()
        if self._unsettled - self._busy:
            _log.warn(
                "Stopping with {n} messages whose state could not be recorded",
                n=len(self._unsettled - self._busy),
            )
        if self._idle():
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idleWaiters.append(d)
        return d.addTimeout(STOP_TIMEOUT, self._clock, onTimeoutCancel=self._stopTimedOut)

    def _stopTimedOut(self, result: object, timeout: float) -> None:
        _log.warn(
            "Stopped with {n} messages still in flight; they will be tried again", n=len(self._busy)
        )

    def _idle(self) -> bool:
        return not self._busy and not self._calls

    def _checkIdle(self) -> None:
        if self._idle():
            waiters, self._idleWaiters = self._idleWaiters, []
            for d in waiters:
                if not d.called:
                    d.callback(None)

    # -- scheduling -----------------------------------------------------------

    def _add(self, message: QueuedMessage) -> None:
        self._messages[message.queueId] = message
        if message.finished:
            # A crash between the last update and the remove: finish the job.
            self._unsettled.add(message.queueId)
        self._schedule.put(message.queueId, message.nextAttempt)

    def _eligible(self, queueId: str) -> bool:
        message = self._messages.get(queueId)
        if message is None or queueId in self._busy:
            return False
        return not message.held or queueId in self._unsettled

    def _pump(self) -> None:
        """Start what is due; re-entrant calls (synchronous results) loop here."""
        if self._pumping:
            self._pumpAgain = True
            return
        self._pumping = self._pumpAgain = True
        try:
            while self._pumpAgain and self.running:
                self._pumpAgain = False
                self._dispatch()
        finally:
            self._pumping = False
        self._armTimer()

    def _dispatch(self) -> None:
        now = self._clock.seconds()
        while self._sent < self._maxInFlight:
            room = min(self._batchSize, self._maxInFlight - self._sent)
            if room < self._batchSize and self._calls:
                # Calls in flight will make room for a whole batch: messages
                # to one route share connections only within one call.
                return
            batch: list[str] = []
            while len(batch) < room and (queueId := self._schedule.pop(now)) is not None:
                self._busy.add(queueId)
                if queueId in self._unsettled:
                    self._startSettle(queueId)
                else:
                    batch.append(queueId)
            if not batch:
                return
            self._send(batch)

    def _armTimer(self) -> None:
        when = self._schedule.next()
        full = self._maxInFlight - self._sent < self._batchSize and self._calls
        if not self.running or when is None or full:
            # Nothing to do, or the next report will look again.
            self._cancelTimer()
            return
        if self._timer is not None and self._timer.getTime() == when:
            return
        self._cancelTimer()
        delay = max(0.0, when - self._clock.seconds())
        self._timer = self._clock.callLater(delay, self._wake)

    def _cancelTimer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _wake(self) -> None:
        self._timer = None
        self._pump()

    # -- delivery -------------------------------------------------------------

    def _send(self, batch: list[str]) -> None:
        """
        One relay call for ``batch``; each message is recorded as soon as
        the relay reports it, not when the slowest route of the call ends.
        """
        messages = [self._messages[queueId] for queueId in batch]
        unreported = {m.queueId: m for m in messages}
        self._sent += len(messages)
        self._calls += 1

        def report(queueId: str, outcome: object) -> None:
            message = unreported.pop(queueId, None)
            if message is None:
                return  # not ours, or reported already
            self._sent -= 1
            self._arrived(message, outcome)

        def reportRest(outcome: object) -> None:
            for queueId in list(unreported):
                report(queueId, outcome.get(queueId) if isinstance(outcome, dict) else outcome)

        deliverMany = getattr(self._relay, "deliverMany", None)
        if callable(deliverMany):
            if takesReport(deliverMany):
                d: Deferred[Any] = maybeDeferred(deliverMany, messages, report=report)
            else:  # a relay that reports only at the end of the call
                d = maybeDeferred(deliverMany, messages)
            d.addBoth(reportRest)
        else:
            each = [
                maybeDeferred(self._relay.deliver, m).addBoth(reportAs, report, m.queueId)
                for m in messages
            ]
            d = DeferredList(each, consumeErrors=True)
        d.addErrback(lambda f: _log.failure("Queue runner bug after a delivery", f))
        d.addBoth(self._callEnded)

    def _callEnded(self, _: object) -> None:
        self._calls -= 1
        self._checkIdle()
        self._pump()

    def _arrived(self, sent: QueuedMessage, outcome: object) -> None:
        """Results for ``sent`` (a list, a Failure or None): record them."""
        queueId = sent.queueId
        if queueId in self._deleting:
            self._unbusy(queueId)  # deleted meanwhile: the results do not matter
            return
        now = self._clock.seconds()
        try:
            result = applyResults(self._messages[queueId], outcome, now, self._config, self._rng)
        except Exception:
            _log.failure("Queue runner bug recording results for {queueId}", queueId=queueId)
            if queueId in self._messages:
                self._schedule.put(queueId, now + RECORD_RETRY)
            self._unbusy(queueId)
            return
        if result.bounced:
            self._owed.setdefault(queueId, set()).update(result.bounced)
            refused = len(result.bounced) - len(result.expired)
            if refused and self.bounced is not None:
                try:
                    self.bounced(result.message, refused)
                except Exception:
                    _log.failure("Reporting the bounces of {queueId} failed", queueId=queueId)
        if result.relayed:
            self._relayedOwed.setdefault(queueId, set()).update(result.relayed)
        self._messages[queueId] = result.message
        logOutcome(result, now)
        self.events.attempted(result, now)
        self._startSettle(queueId)

    def _unbusy(self, queueId: str) -> None:
        self._busy.discard(queueId)
        if queueId in self._deleting:
            self._deleting.discard(queueId)
            self._removeNow(queueId).addErrback(lambda _: None)  # logged
        self._checkIdle()
        self._pump()

    def _forget(self, queueId: str) -> None:
        self._messages.pop(queueId, None)
        self._owed.pop(queueId, None)
        self._relayedOwed.pop(queueId, None)
        self._schedule.discard(queueId)
        self._unsettled.discard(queueId)
        self._flushed.discard(queueId)
