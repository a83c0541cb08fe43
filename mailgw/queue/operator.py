"""
What an operator may ask of the running queue (L{IQueueControl}, reached
through the control socket by ``mailgw queue flush/hold/release/delete``),
over the queue runner's state: a part of L{mailgw.queue.runner.QueueRunner}.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailgw.config import normalizeDomain
from mailgw.envelope import QueuedMessage
from mailgw.interfaces import ISpool
from mailgw.queue.events import HELD, MessageEvents
from mailgw.queue.schedule import Schedule

_BY_OPERATOR = "by the operator"
_log = Logger(namespace="mailgw.queue.runner")


@attrs.frozen
class DomainFlush:
    """
    What L{OperatorControl.flushDomain} found: messages made due now,
    messages already being tried (due again once that attempt ends), and
    held messages (left alone).
    """

    started: int = 0
    inFlight: int = 0
    held: int = 0


def _domainKey(domain: str) -> str:
    try:
        return normalizeDomain(domain)
    except (UnicodeError, ValueError):  # idna.IDNAError is a UnicodeError
        return domain.rstrip(".").lower()


class OperatorControl:
    """
    L{IQueueControl} for the runner it is mixed into, which provides the
    state below and ``_pump`` (start what is due), ``_durable`` (the state
    the spool may hold) and ``_forget`` (drop a message from memory).
    """

    _messages: dict[str, QueuedMessage]
    _busy: set[str]
    _deleting: set[str]
    _flushed: set[str]
    _schedule: Schedule
    _clock: IReactorTime
    _spool: ISpool
    events: MessageEvents

    def _pump(self) -> None:
        raise NotImplementedError

    def _durable(self, message: QueuedMessage) -> QueuedMessage:
        raise NotImplementedError

    def _forget(self, queueId: str) -> None:
        raise NotImplementedError

    def _lookup(self, queueId: str) -> QueuedMessage:
        """
        The message ``queueId``. Every committed message is known (commit is
        scheduling, and the start loads the spool), so an id we do not know
        is no message of the queue.

        @raise KeyError: no such message.
        """
        message = self._messages.get(queueId)
        if message is None:
            raise KeyError(queueId)
        return message

    def messages(self) -> list[QueuedMessage]:
        """Every message of the queue, as it is now (L{IQueueView})."""
        return list(self._messages.values())

    def lookup(self, queueId: str) -> QueuedMessage:
        """The message ``queueId`` as it is now. @raise KeyError: none such."""
        return self._lookup(queueId)

    def flush(self, queueIds: Iterable[str] | None = None) -> Deferred[int]:
        """
        Make every message (or those listed) due now, held ones excepted.

        @return: a Deferred firing with how many are tried now (those in
            flight included), or failing with KeyError for an unknown id,
            in which case nothing was changed.
        """
        try:
            ids = list(self._messages) if queueIds is None else list(dict.fromkeys(queueIds))
            messages = [self._lookup(queueId) for queueId in ids]
        except Exception as e:
            return fail(e)
        now, count = self._clock.seconds(), 0
        for message in messages:
            if not message.held:
                count += 1
                self._dueNow(message.queueId, now)
        self._pump()
        return succeed(count)

    def flushDomain(self, domain: str, subdomains: bool = False) -> Deferred[DomainFlush]:
        """
        Make due now every message with a pending recipient at ``domain``
        (and, with ``subdomains``, at any domain under it), held ones
        excepted: ETRN (RFC 1985) and ``mailgw queue flush --domain``.

        @return: a Deferred firing with the L{DomainFlush} counts.
        """
        wanted = _domainKey(domain)
        now, started, inFlight, held = self._clock.seconds(), 0, 0, 0
        for message in list(self._messages.values()):
            domains = {_domainKey(r.address.domain) for r in message.pendingRecipients}
            if not any(d == wanted or (subdomains and d.endswith("." + wanted)) for d in domains):
                continue
            if message.held:
                held += 1
                continue
            if message.queueId in self._busy:
                inFlight += 1
            else:
                started += 1
            self._dueNow(message.queueId, now)
        self._pump()
        return succeed(DomainFlush(started, inFlight, held))

    def _dueNow(self, queueId: str, now: float) -> None:
        if queueId in self._busy:
            # In flight, or its results being recorded: once that is done,
            # it is due now rather than after its backoff.
            self._flushed.add(queueId)
        else:
            self._schedule.put(queueId, now)

    def hold(self, queueId: str, reason: str = _BY_OPERATOR) -> Deferred[None]:
        """
        Stop trying ``queueId`` (after the attempt in flight, if any) until
        released; fires once that is on disk. ``reason`` is for the log.
        """
        return self._setHeld(queueId, True, reason)

    def release(self, queueId: str) -> Deferred[None]:
        """Undo L{hold}, durably; the message is tried now."""
        return self._setHeld(queueId, False)

    def _setHeld(self, queueId: str, held: bool, reason: str = _BY_OPERATOR) -> Deferred[None]:
        try:
            message = self._lookup(queueId)
        except Exception as e:
            return fail(e)
        # A release ends a quarantine; a hold with a reason of its own (the
        # content filter's reply) is kept with the message, as a milter's is.
        holdReason = ""
        if held:
            holdReason = reason if reason != _BY_OPERATOR else message.holdReason
        self._messages[queueId] = attrs.evolve(message, held=held, holdReason=holdReason)
        _log.info(
            "Queue {queueId}: {what} {reason}",
            queueId=queueId,
            what="held" if held else "released",
            reason=reason,
        )
        d = maybeDeferred(self._spool.update, self._durable(self._messages[queueId]))
        if held and not message.held:
            self.events.emit(HELD, self._messages[queueId], (), reason="operator")
        if not held:
            self._dueNow(queueId, self._clock.seconds())
        self._pump()
        return d.addCallback(lambda _: None)

    def delete(self, queueId: str) -> Deferred[None]:
        """
        Remove ``queueId`` from the spool without a bounce.

        @return: a Deferred that fires once the message is gone, or fails
            with the spool's error. A message in flight is removed when its
            attempt ends (the results of that attempt are ignored); the
            Deferred then fires at once, so that an operator is not kept
            waiting for a slow upstream.
        """
        try:
            self._lookup(queueId)
        except Exception as e:
            return fail(e)
        if queueId in self._busy:
            _log.info("Queue {queueId}: to be deleted once its attempt ends", queueId=queueId)
            self._deleting.add(queueId)
            return succeed(None)
        return self._removeNow(queueId)

    def _removeNow(self, queueId: str) -> Deferred[None]:
        self._forget(queueId)

        def done(result: object) -> object:
            if isinstance(result, Failure):
                _log.error("Cannot delete {queueId}: {error}", queueId=queueId, error=result.value)
            else:
                _log.info("Queue {queueId}: deleted by the operator", queueId=queueId)
            return result

        return maybeDeferred(self._spool.remove, queueId).addBoth(done)

    def heldOf(self, account: str) -> list[str]:
        """The queue ids of ``account``'s held messages, oldest first."""
        messages = [m for m in self._messages.values() if m.held and m.session.user == account]
        return [m.queueId for m in sorted(messages, key=lambda m: (m.arrival, m.queueId))]

    def holdAtIntake(self, held: QueuedMessage, why: str) -> Deferred[None]:
        """
        ``held``, just committed, is recorded as held before it was ever
        scheduled (the breaker); fires once that is on disk. Should the
        update fail, the message stays held here (logged).
        """
        _log.info("Queue {queueId}: held at intake ({why})", queueId=held.queueId, why=why)

        def failed(failure: Failure) -> None:
            _log.error(
                "Queue {queueId}: cannot record it as held ({error}); it stays held until a "
                "restart",
                queueId=held.queueId,
                error=failure.value,
            )

        return maybeDeferred(self._spool.update, held).addCallbacks(lambda _: None, failed)
