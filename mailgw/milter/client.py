"""
One connection to one milter: option negotiation, then one command at a
time, each answered (or not, where the milter asked for no reply) within
its deadline.

Whatever goes wrong (the milter refuses the connection, does not answer
in time, sends a bad packet, hangs up) fails the command's Deferred with
L{MilterUnavailable} and aborts the connection: the caller applies the
milter's ``default_action``; nothing waits for a dead milter.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from mailgw.milter import codec
from mailgw.milter.codec import MilterProtocolError, Response

#: Responses that end a command; the others (modifications, PROGRESS) come before one.
FINAL = frozenset(
    {
        codec.ACCEPT,
        codec.CONTINUE,
        codec.DISCARD,
        codec.REJECT,
        codec.TEMPFAIL,
        codec.REPLYCODE,
        codec.SKIP,
        codec.SHUTDOWN,
        codec.CONN_FAIL,
    }
)
#: The modification responses, allowed only before the reply to end of message.
MODIFICATIONS = frozenset(
    {
        codec.ADDHEADER,
        codec.INSHEADER,
        codec.CHGHEADER,
        codec.ADDRCPT,
        codec.DELRCPT,
        codec.REPLBODY,
        codec.QUARANTINE,
    }
)
#: Modification responses kept per command at most (a flood is an error).
MAX_MODIFICATIONS = 10000
#: Octets of modification responses kept per command at most, unless the
#: chain sets its own bound (the largest message plus room for headers).
MAX_COLLECTED = 64 * 1024 * 1024


class MilterUnavailable(Exception):
    """The milter cannot be used for this session (down, too slow, broken); the text is logged."""


@attrs.frozen
class Negotiated:
    """What option negotiation settled: the actions allowed and the steps changed."""

    actions: int
    steps: int

    def has(self, step: int) -> bool:
        return bool(self.steps & step)


class MilterClient(Protocol):
    """
    The protocol of one milter connection. ``ready`` fires with the
    L{Negotiated} options once the milter answered SMFIC_OPTNEG.
    """

    transport: Any  # an ITCPTransport or a UNIX one: both can abortConnection

    def __init__(self, clock: IReactorTime, commandTimeout: float) -> None:
        self.clock = clock
        self.commandTimeout = commandTimeout
        self.ready: Deferred[Negotiated] = Deferred()
        self._decoder = codec.Decoder()
        self._pending: Deferred[list[Response]] | None = None
        self._collected: list[Response] = []
        self._collectedSize = 0
        self.maxCollected = MAX_COLLECTED
        self._timer: IDelayedCall | None = None
        self._timeout = 0.0
        self._negotiating = True
        self._gone = False

    # -- the connection ---------------------------------------------------

    def connectionMade(self) -> None:
        self._arm(self.commandTimeout)  # first: a reply may come within write()
        self.transport.write(codec.optneg())

    def dataReceived(self, data: bytes) -> None:
        if self._gone:
            return
        try:
            responses = self._decoder.feed(data)
            for response in responses:
                self._received(response)
        except MilterProtocolError as e:
            self._fail(f"protocol error: {e}")

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        self._fail("connection lost")

    # -- commands ------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Send packets that get no reply (macros, NR_* steps, ABORT)."""
        if not self._gone:
            self.transport.write(data)

    def ask(self, data: bytes, timeout: float | None = None) -> Deferred[list[Response]]:
        """
        Send ``data`` (its last packet the command) and fire with the
        responses to it, the final one last; PROGRESS restarts the deadline
        and is not listed.
        """
        if self._gone:
            return fail(MilterUnavailable("not connected"))
        if self._pending is not None:
            return fail(MilterUnavailable("a command is already in flight"))
        d: Deferred[list[Response]] = Deferred()
        self._pending, self._collected, self._collectedSize = d, [], 0
        self._arm(self.commandTimeout if timeout is None else timeout)
        self.transport.write(data)
        return d

    def quit(self) -> None:
        """SMFIC_QUIT and close; nothing more is sent."""
        if not self._gone:
            self._gone = True
            self._disarm()
            self.transport.write(codec.packet(codec.QUIT))
            self.transport.loseConnection()
            self._failPending("closed")

    def abortConnection(self) -> None:
        """Drop the connection at once (a timeout, a protocol error, a shutdown)."""
        if not self._gone:
            self._fail("aborted")

    # -- responses -------------------------------------------------------------

    def _received(self, response: Response) -> None:
        if self._negotiating:
            self._negotiated(response)
            return
        if self._pending is None:
            raise MilterProtocolError(f"unexpected response {response.code!r}")
        if response.code == codec.PROGRESS:
            self._arm(self._timeout)
            return
        self._collected.append(response)
        self._collectedSize += len(response.data) + len(response.value) + len(response.text)
        if self._collectedSize > self.maxCollected:
            raise MilterProtocolError("too many octets of changes")
        if response.code in FINAL:
            d, self._pending, collected = self._pending, None, self._collected
            self._collected = []
            self._disarm()
            d.callback(collected)
        elif response.code not in MODIFICATIONS or len(self._collected) > MAX_MODIFICATIONS:
            raise MilterProtocolError(f"unexpected response {response.code!r}")

    def _negotiated(self, response: Response) -> None:
        if response.code != codec.OPTNEG:
            raise MilterProtocolError(f"option negotiation answered with {response.code!r}")
        if response.version < 2:
            raise MilterProtocolError(f"milter protocol version {response.version}")
        # Whatever the milter claims, it gets only what we offered.
        options = Negotiated(
            actions=response.actions & codec.OFFERED_ACTIONS,
            steps=response.steps & codec.OFFERED_STEPS,
        )
        self._negotiating = False
        self._disarm()
        self.ready.callback(options)

    # -- deadlines and failure ---------------------------------------------------

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timeout = seconds
        self._timer = self.clock.callLater(seconds, self._fail, "timed out")

    def _disarm(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _fail(self, why: str) -> None:
        self._disarm()
        wasGone, self._gone = self._gone, True
        if not wasGone and self.transport is not None:
            self.transport.abortConnection()
        if self._negotiating:
            self._negotiating = False
            self.ready.errback(MilterUnavailable(why))
        self._failPending(why)

    def _failPending(self, why: str) -> None:
        d, self._pending = self._pending, None
        if d is not None:
            d.errback(MilterUnavailable(why))


class _ClientFactory(Factory):
    def __init__(self, clock: IReactorTime, commandTimeout: float) -> None:
        self.clock, self.commandTimeout = clock, commandTimeout

    def buildProtocol(self, addr: Any) -> MilterClient:
        return MilterClient(self.clock, self.commandTimeout)


def connectMilter(
    endpoint: IStreamClientEndpoint,
    clock: IReactorTime,
    connectTimeout: float,
    commandTimeout: float,
) -> Deferred[tuple[MilterClient, Negotiated]]:
    """
    Connect and negotiate within ``connectTimeout`` (the connection) and
    ``commandTimeout`` (the negotiation).

    @return: a Deferred of the client and its options, or failing with
        L{MilterUnavailable}.
    """
    d: Deferred[Any] = endpoint.connect(_ClientFactory(clock, commandTimeout))
    d.addTimeout(connectTimeout, clock)

    def connected(client: MilterClient) -> Deferred[tuple[MilterClient, Negotiated]]:
        return client.ready.addCallback(lambda options: (client, options))

    def failed(failure: Failure) -> Failure:
        if failure.check(MilterUnavailable):
            return failure
        return Failure(MilterUnavailable(f"cannot connect: {failure.getErrorMessage()}"))

    return d.addCallback(connected).addErrback(failed)
