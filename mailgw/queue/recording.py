"""
Recording what became of a message, a part of
L{mailgw.queue.runner.QueueRunner}: its state written before anything else
happens to it, the bounces and delay warnings it owes committed (and so
scheduled) before the state that says so, and the message removed once
every recipient is finished, or rescheduled.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, BinaryIO

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailgw.config import QueueConfig
from mailgw.dsnparams import Notify
from mailgw.envelope import Address, Envelope, QueuedMessage, RecipientStatus, Session
from mailgw.interfaces import IMessageWriter, ISpool
from mailgw.queue import dsn
from mailgw.queue.schedule import Schedule

#: Seconds before the runner tries again to record results, or to queue a
#: bounce, after the spool failed to.
RECORD_RETRY = 60.0

_log = Logger(namespace="mailgw.queue.runner")
_PENDING, _BOUNCED = RecipientStatus.PENDING, RecipientStatus.BOUNCED
# Builds a DSN from the message, its file and the time (dsn.buildBounce...).
_Build = Callable[[QueuedMessage, BinaryIO, float], tuple[Envelope, bytes]]


class _RetryLater(Exception):
    """The spool failed (logged): record again after L{RECORD_RETRY}."""


class _Vanished(Exception):
    """The message is no longer in the spool: forget it."""


class _Deleted(Exception):
    """The operator deleted the message meanwhile: stop; L{_unbusy} removes it."""


class Recording:
    """
    The recording half of the runner it is mixed into, which provides the
    state below, L{begin} (commit is scheduling), ``_forget`` and
    ``_unbusy``.
    """

    _messages: dict[str, QueuedMessage]
    _owed: dict[str, set[Address]]
    _relayedOwed: dict[str, set[Address]]
    _unsettled: set[str]
    _deleting: set[str]
    _flushed: set[str]
    _spool: ISpool
    _clock: IReactorTime
    _config: QueueConfig
    _reportingMTA: str
    _rng: random.Random
    _schedule: Schedule
    metrics: Any  # mailgw.metrics.Metrics, or None: metrics are off

    def begin(self, envelope: Envelope, session: Session) -> IMessageWriter:
        raise NotImplementedError

    def _forget(self, queueId: str) -> None:
        raise NotImplementedError

    def _unbusy(self, queueId: str) -> None:
        raise NotImplementedError

    def _startSettle(self, queueId: str) -> None:
        """Record, bounce, warn, remove or reschedule ``queueId`` (busy)."""
        self._unsettled.add(queueId)
        d = Deferred.fromCoroutine(self._settle(queueId))
        d.addErrback(self._settleFailed, queueId)
        d.addBoth(lambda _: self._unbusy(queueId))

    def _settleFailed(self, failure: Failure, queueId: str) -> None:
        if failure.check(_Deleted):
            return
        if failure.check(_Vanished):
            _log.warn("Queue {queueId} vanished from the spool; forgotten", queueId=queueId)
            self._forget(queueId)
            return
        if not failure.check(_RetryLater):
            _log.failure("Queue runner bug recording {queueId}", failure, queueId=queueId)
        if queueId in self._messages:
            self._schedule.put(queueId, self._clock.seconds() + RECORD_RETRY)

    async def _settle(self, queueId: str) -> None:
        message = self._messages[queueId]
        if not (message.finished and not self._owed.get(queueId)):
            await self._save(queueId)  # the results, before anything else
        # else every recipient is delivered and nothing is owed: removing the
        # message records that as durably as a write would, at half the cost.
        changed = False
        owed = set(self._owed.get(queueId, ()))
        message = self._messages[queueId]
        if owed and message.isBounce:
            _log.error(
                "Bounce {queueId} could not be delivered to {rcpts}; dropped (never a "
                "bounce for a bounce)",
                queueId=queueId,
                rcpts=sorted(map(str, owed)),
            )
            del self._owed[queueId]
            changed = True
        elif owed:
            mta = self._reportingMTA
            # RFC 3461 4.1: only those whose NOTIFY asks for failures.
            notify = dsn.wanted(message, owed, Notify.FAILURE)
            if owed - notify:
                _log.info(
                    "Queue {queueId}: no bounce for {rcpts}: NOTIFY does not ask for one",
                    queueId=queueId,
                    rcpts=sorted(map(str, owed - notify)),
                )
            if not notify or await self._inject(
                queueId,
                "bounce",
                lambda m, f, now: dsn.buildBounce(m, f, mta, now, recipients=notify),
            ):
                del self._owed[queueId]
                changed = True
        relayed = self._relayedOwed.get(queueId)
        if relayed and await self._inject(
            queueId,
            "success report",
            lambda m, f, now: dsn.buildRelayed(m, f, self._reportingMTA, now, recipients=relayed),
        ):
            del self._relayedOwed[queueId]
        warn = self._wantsWarning(self._messages[queueId])
        if warn:
            until = message.arrival + self._config.maxLifetime
            if await self._inject(
                queueId,
                "delay warning",
                lambda m, f, now: dsn.buildDelayWarning(
                    m, f, self._reportingMTA, now, willRetryUntil=until, recipients=warn
                ),
            ):
                self._messages[queueId] = attrs.evolve(self._messages[queueId], warned=True)
                changed = True
        if changed:
            await self._save(queueId)
        if queueId in self._owed or queueId in self._relayedOwed:
            raise _RetryLater()
        message = self._messages[queueId]
        if message.finished:
            try:
                await self._spool.remove(queueId)
            except Exception as e:
                _log.error("Cannot remove {queueId}: {error}", queueId=queueId, error=e)
                raise _RetryLater() from e
            # The relay logged each delivery; no line of its own for the removal.
            self._forget(queueId)
            return
        self._unsettled.discard(queueId)
        when = message.nextAttempt
        if queueId in self._flushed and not message.held:
            when = self._clock.seconds()
        self._flushed.discard(queueId)
        self._schedule.put(queueId, when)

    def _wantsWarning(self, message: QueuedMessage) -> set[Address]:
        """The recipients a delay warning is due for now (NOTIFY allowing), or none."""
        delay = self._config.delayWarning
        if (
            delay > 0
            and not message.isBounce
            and not message.warned
            and bool(message.pendingRecipients)
            and self._clock.seconds() - message.arrival >= delay
        ):
            pending = (r.address for r in message.pendingRecipients)
            return dsn.wanted(message, pending, Notify.DELAY)
        return set()

    def _durable(self, message: QueuedMessage) -> QueuedMessage:
        """What the spool may say of ``message``: no "bounced" before its bounce."""
        owed = self._owed.get(message.queueId)
        if not owed:
            return message
        states = tuple(
            attrs.evolve(s, status=_PENDING) if s.address in owed and s.status is _BOUNCED else s
            for s in message.recipients
        )
        return attrs.evolve(message, recipients=states)

    async def _save(self, queueId: str) -> None:
        try:
            await self._spool.update(self._durable(self._messages[queueId]))
        except KeyError as e:
            raise _Vanished() from e
        except Exception as e:
            _log.error("Cannot record the state of {queueId}: {error}", queueId=queueId, error=e)
            raise _RetryLater() from e
        self._checkWanted(queueId)

    def _checkWanted(self, queueId: str) -> None:
        if queueId in self._deleting:
            raise _Deleted()

    async def _inject(self, queueId: str, kind: str, build: _Build) -> bool:
        """
        Queue the DSN ``build`` makes. True once it is committed (or can
        never be built: logged), False after a transient failure (logged).
        """
        message, now = self._messages[queueId], self._clock.seconds()
        try:
            with self._spool.openMessage(queueId) as original:
                envelope, data = build(message, original, now)
        except KeyError as e:
            raise _Vanished() from e
        except ValueError as e:
            _log.error(
                "Cannot build a {kind} for {queueId}: {error}; none is sent",
                kind=kind,
                queueId=queueId,
                error=e,
            )
            return True
        except Exception as e:
            _log.error(
                "Cannot read {queueId} for a {kind}: {error}", kind=kind, queueId=queueId, error=e
            )
            return False
        session = Session(
            clientAddress="127.0.0.1", helo=self._reportingMTA, user=None, listener="bounce"
        )
        writer = None
        try:
            # Committing the DSN schedules it, whatever happens to its cause.
            writer = self.begin(envelope, session)
            writer.write(data)
            newId = await writer.commit()
            self._checkWanted(queueId)  # the DSN is sent all the same, as a crash would
        except _Deleted:
            raise
        except Exception as e:
            if writer is not None:
                writer.abort()
            _log.error(
                "Cannot queue a {kind} for {queueId}: {error}; will retry",
                kind=kind,
                queueId=queueId,
                error=e,
            )
            return False
        _log.info(
            "Queue {queueId}: {kind} queued as {newId}", queueId=queueId, kind=kind, newId=newId
        )
        if self.metrics is not None:
            self.metrics.bounce(kind)
        return True
