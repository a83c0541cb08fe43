"""
Every seam of mailgw as a zope interface, and the errors those seams raise.

Failures on these seams are either transient (the caller replies 4xx or
retries later) or permanent (5xx, or a bounce); each method says which
exceptions mean which.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class SpoolError(Exception):
    """
    A transient local failure of the spool: the message is not queued and
    the client should try again (451 4.3.0). The text is for the log only.
    """


class SpoolFullError(SpoolError):
    """The disk or the quota is full (ENOSPC, EDQUOT): transient, 452 4.3.1."""


class ISubmitter(Interface):
    """
    The avatar of an authenticated client: who may now submit mail.
    """

    login = Attribute("str: the authentication identity, as the backend knows it")


class IMessageWriter(Interface):
    """
    One message being written into the spool.

    ``write`` and ``commit`` raise or fail with L{SpoolFullError} when the
    disk is full (452 4.3.1) and L{SpoolError} for any other local failure
    (451 4.3.0); both are transient. After a failure nothing of the message
    is left behind.
    """

    queueId = Attribute("str: the queue id the message will have once committed")
    message = Attribute(
        "the L{mailgw.envelope.QueuedMessage} as committed (body type upgraded to "
        "8BITMIME when the bytes are not ASCII); None until the commit fired"
    )

    def write(data: bytes) -> None:
        """
        Append message bytes (CRLF line endings, dot-stuffing removed).
        """

    def commit():  # type: ignore[no-untyped-def]
        """
        Make the message durable.

        @return: a Deferred that fires with the queue id only once the
            message and its envelope are fsync'd, renamed into the queue and
            the directory fsync'd; only then may the server reply 250. A
            writer begun from an L{IQueue} has also handed the message to
            the scheduler before the Deferred fires: nothing committed can
            be left unscheduled, whatever becomes of the client.
        """

    def abort() -> None:
        """
        Drop the message; nothing of it stays on disk. Idempotent, and safe
        after a failed write or commit.
        """


class ISpool(Interface):
    """
    Durable storage of accepted messages and of each recipient's state.
    """

    def begin(envelope, session):  # type: ignore[no-untyped-def]
        """
        Start a message for L{mailgw.envelope.Envelope} ``envelope``
        received over L{mailgw.envelope.Session} ``session``.

        @return: an L{IMessageWriter}.
        @raise SpoolError: transient local failure.
        """

    def pending():  # type: ignore[no-untyped-def]
        """
        @return: a list of every committed L{mailgw.envelope.QueuedMessage},
            held ones included, oldest first.
        """

    def load(queueId):  # type: ignore[no-untyped-def]
        """
        @return: the L{mailgw.envelope.QueuedMessage} ``queueId`` as stored
            (read from the storage, never from a cache: what another
            process or a restart would see).
        @raise KeyError: no such message.
        """

    def openMessage(queueId):  # type: ignore[no-untyped-def]
        """
        @return: a binary file object positioned at the start of the
            message bytes (trace header included), for reading.
        @raise KeyError: no such message.
        """

    def update(message):  # type: ignore[no-untyped-def]
        """
        Durably replace the stored state (recipients, next attempt, held,
        warned) of ``message.queueId`` with that of ``message``. Changes to
        one message are applied in call order: an update called after a
        L{remove} fails with KeyError and leaves nothing behind.

        @return: a Deferred that fires with ``message`` once the new state is
            on disk (written, fsync'd, renamed, directory fsync'd); it fails
            with KeyError when the message is not (or no longer) stored.
        """

    def remove(queueId):  # type: ignore[no-untyped-def]
        """
        Remove a message and its state from the spool.

        @return: a Deferred that fires when it is gone from disk.
        """


class IQueue(Interface):
    """
    Where accepted messages go: the one object that owns the spool and the
    scheduler (L{mailgw.queue.runner.QueueRunner}). Committing a message is
    scheduling it.
    """

    def begin(envelope, session):  # type: ignore[no-untyped-def]
        """
        As L{ISpool.begin}; the writer's commit also schedules the message
        (at once) before its Deferred fires.

        @return: an L{IMessageWriter}.
        @raise SpoolError: transient local failure.
        """


class IRelay(Interface):
    """
    Hands queued messages to upstream MTAs.

    A relay may also offer ``deliverMany(messages, report=None)``: one try
    for several messages sharing connections, calling ``report(queueId,
    results)`` once per message as soon as that message's recipients all
    have a result, so that outcomes are recorded as they happen.
    """

    def deliver(message):  # type: ignore[no-untyped-def]
        """
        Try once to deliver L{mailgw.envelope.QueuedMessage} ``message`` to
        its pending recipients.

        @return: a Deferred that fires with a list of
            L{mailgw.envelope.DeliveryResult}, one per pending recipient;
            it does not fail: network, TLS and timeout problems are
            transient results, and a message the upstream can never take
            (8-bit or UTF-8 to an upstream without support) is permanent.
        """


class ISecureResolver(Interface):
    """
    DNS lookups that say whether the answer was DNSSEC-validated: the AD bit
    of a validating resolver the gateway trusts (docs/relay.md, DANE).
    """

    def lookupSecure(name, type):  # type: ignore[no-untyped-def]
        """
        Look up records of ``type`` (a twisted.names type number) at
        ``name`` (str, A-labels). @return: a Deferred firing with a
        L{mailgw.relay.dnssec.SecureAnswer}, or failing as twisted.names
        lookups do (DNSNameError for NXDOMAIN, DNSServerError, timeouts).
        """


class ISubmissionPolicy(Interface):
    """
    Decides what an authenticated client may send.

    Each check returns ``None`` (accept), an L{mailgw.replies.SMTPReply}
    (refuse with that reply), or a Deferred of either.
    """

    def checkSender(session, sender):  # type: ignore[no-untyped-def]
        """
        May ``session.user`` use reverse-path ``sender`` (an
        L{mailgw.envelope.Address} or ``None`` for ``<>``)?
        """

    def checkRecipient(session, sender, recipient):  # type: ignore[no-untyped-def]
        """
        May this transaction add ``recipient``?
        """

    def checkMessage(session, envelope, headers):  # type: ignore[no-untyped-def]
        """
        May this message be queued? Called after the end of data, before
        the commit. ``headers`` is the message's header section as received
        (bytes, CRLF line endings, up to the server's header size limit; our
        own Received: header not included).
        """


class IQueueControl(Interface):
    """
    What an operator may ask of the running queue (``mailgw queue ...``
    through the control socket). Each method returns a Deferred; an unknown
    queue id fails it with KeyError.
    """

    def flush(queueIds=None):  # type: ignore[no-untyped-def]
        """
        Try now every pending message (``None``) or those listed, held ones
        excepted. @return: Deferred firing with the number scheduled.
        """

    def hold(queueId):  # type: ignore[no-untyped-def]
        """Stop trying ``queueId`` until released (state kept on disk)."""

    def release(queueId):  # type: ignore[no-untyped-def]
        """Undo L{hold}; the message is tried now."""

    def delete(queueId):  # type: ignore[no-untyped-def]
        """Remove ``queueId`` from the queue without a bounce."""


class IQueueView(Interface):
    """What the queue holds now, for the API (read-only, in memory)."""

    def messages():  # type: ignore[no-untyped-def]
        """Every message of the queue (L{mailgw.envelope.QueuedMessage}), newest state."""

    def lookup(queueId):  # type: ignore[no-untyped-def]
        """The message ``queueId``. @raise KeyError: no such message."""


class IWebhookSender(Interface):
    """
    Outgoing webhooks (docs/api.md): events about messages and accounts
    POSTed as JSON to the configured receivers.
    """

    def send(event, payload):  # type: ignore[no-untyped-def]
        """
        Queue ``event`` (a name such as ``message.delivered``) with
        ``payload`` (a JSON-able dict) for every receiver, and return at once.
        Never raises and never blocks: a delivery that fails is retried a
        bounded number of times, then dropped and logged; when the backlog
        is full the oldest event is dropped.
        """


class IMessageSigner(Interface):
    """
    Adds signature header fields (DKIM) to a message as the relay reads it
    for a final upstream: after every change to its header (milters in the
    session, a content filter before its reinjection), never on the copy
    a content filter gets.
    """

    def open(opener, queueId):  # type: ignore[no-untyped-def]
        """
        Blocking: the relay calls it in a thread, never on the reactor thread.

        @param opener: opens a queued message's bytes (L{ISpool.openMessage}).
        @return: a binary file whose C{read(n)} gives C{n} octets until the
            end, then b"", and whose C{close()} closes the message: the
            header fields this signer adds (none when the message is not
            to be signed), then C{opener(queueId)}'s bytes, unchanged.
        @raise KeyError: as C{opener}; any other exception is transient for
            the delivery, as a failure of C{opener} is.
        """


class ISharedCounters(Interface):
    """
    The engine that keeps counts shared by every process of a site (the
    workers of one machine, the nodes of a cluster): leaky buckets, each
    named by a table and a key. The limiters never call it: they read and
    change counts synchronously through L{mailgw.limits.shared.SyncedCounters},
    which sends the changes in batches in the background and refreshes the
    levels it was asked for (see there for the staleness this allows).

    A bucket of table C{spec} (a L{mailgw.limits.shared.TableSpec}: its
    C{name}, C{budget} and C{window}) leaks linearly at C{spec.budget /
    spec.window} per second, never below 0. A bucket nobody changed is at
    0; the engine may forget a bucket once it has leaked to 0 (an expiry of
    at least C{level * window / budget} seconds after its last change).
    The engine reads time from its own clock: every process of a site must
    see the same one (one engine, or clocks kept in step).
    """

    def apply(changes):  # type: ignore[no-untyped-def]
        """
        Apply a batch of changes and read the resulting levels.

        @param changes: a sequence of L{mailgw.limits.shared.CounterChange}
            (C{spec}, C{key}: a C{str}, C{amount}: a C{float}). For each, in
            order and atomically with respect to every other process
            changing the same bucket: leak the bucket to now, add C{amount}
            (negative: a refund), clamp at 0, store the level with the
            time, and note the level. An C{amount} of 0 only reads (it need
            not store anything). The same bucket may appear more than once.
            An empty batch still reaches the engine: it is the probe of
            whether the engine is up.
        @return: a Deferred that fires with a list of C{float}, the level
            of each change's bucket just after that change, in the order of
            C{changes}; or fails (any exception) when the engine could not
            be reached or did not answer. After a failure any part of the
            batch may or may not have been applied: the caller sends the
            amounts again (at least once; counting twice is the safe side).
            Never blocks the calling (reactor) thread and never raises.
        """

    def close():  # type: ignore[no-untyped-def]
        """
        Release the connection(s) and threads; a Deferred that fires when
        done. No C{apply} is made after it.
        """
