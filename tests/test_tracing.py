"""
The decision trace (mailgw.tracing) from lists of JSON log events, and the
reading of rotated log files by ``mailgw explain`` (mailgw.cli.explain).
"""

from __future__ import annotations

import gzip
import json
import os
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from mailgw import tracing
from mailgw.cli.errors import CommandError
from mailgw.cli.explain import clientText, logFiles, messageText, traceClient, traceMessage

Q1, Q2, BOUNCE = "0005F1A2B3C4D5E6F7A8", "0005F1A2B3C4D5E6F7A9", "0005F1A2B3C4D5E6F7AA"


def ev(text: str, time: str = "2026-11-29T10:00:00+00:00", **fields: Any) -> dict[str, Any]:
    return {"time": time, "level": "info", "namespace": "x", "text": text, **fields}


def session(sid: str, client: str, queueId: str, user: str = "alice") -> list[dict[str, Any]]:
    return [
        ev(f"auth failed user='{user}'", user=user, client=client, session=sid, mech="LOGIN"),
        ev(
            f"auth ok user='{user}'",
            user=user,
            client=client,
            session=sid,
            mech="PLAIN",
            backend="PasswdChecker",
        ),  # fmt: skip
        ev(
            f"queued {queueId} from=<{user}@example.org>",
            queueId=queueId,
            sender=f"{user}@example.org",
            recipients=["bob@example.com", "carol@example.net"],
            size=120,
            messageId="<m@x>",
            user=user,
            client=client,
            session=sid,
            listener="submission",
            tls="TLSv1.3/TLS_AES_128_GCM_SHA256",
            policy="SenderLoginPolicy",
            quota={
                "messages": 3,
                "messagesLimit": 100,
                "recipients": 6,
                "recipientsLimit": 0,
                "window": 3600,
            },  # fmt: skip
        ),
        ev(
            f"disconnect from client={client}",
            client=client,
            listener="submission",
            tls="TLSv1.3/TLS_AES_128_GCM_SHA256",
            outcome="quit",
            commands={"ehlo": 2, "mail": 1},
            session=sid,
        ),
    ]


def delivery(queueId: str, to: str, status: str, reply: str, relay: str) -> dict[str, Any]:
    return ev(
        f"{queueId}: to=<{to}>",
        queueId=queueId,
        to=to,
        relay=relay,
        tls="none",
        delay="0.10",
        dsn=reply.split()[1],
        status=status,
        reply=reply,
        route="smarthosts a:587,b:587",
    )


EVENTS = [
    *session("s1", "192.0.2.7", Q1),
    ev("unrelated", client="192.0.2.7"),
    *session("s2", "198.51.100.4", Q2, user="mallory"),
    delivery(Q1, "bob@example.com", "deferred", "451 4.3.0 busy", "a[192.0.2.1]:587"),
    delivery(Q1, "bob@example.com", "sent", "250 2.0.0 ok", "b[192.0.2.2]:587"),
    delivery(Q1, "carol@example.net", "bounced", "550 5.1.1 no such user", "a[192.0.2.1]:587"),
    delivery(Q2, "bob@example.com", "sent", "250 2.0.0 ok", "a[192.0.2.1]:587"),
    ev(f"Queue {Q1}: bounced: <carol@example.net>", queueId=Q1, outcome="bounced"),
    ev(f"Queue {Q1}: bounce queued as {BOUNCE}", queueId=Q1, kind="bounce", newId=BOUNCE),
    ev("breaker: rule recipients-per-hour evaluated 6 < 600", session="s1", account="alice"),
    ev("mailgw auth-throttle: ...", logLine="mailgw auth-throttle: client=192.0.2.7 network=x"),
]


class KindTests(SynchronousTestCase):
    def test_kinds(self) -> None:
        kinds = [tracing.kind(e) for e in session("s", "c", Q1)]
        self.assertEqual(kinds, [tracing.AUTH, tracing.AUTH, tracing.QUEUED, tracing.DISCONNECT])
        self.assertEqual(tracing.kind(EVENTS[9]), tracing.DELIVERY)
        self.assertEqual(tracing.kind(ev("queued but not really")), tracing.OTHER)
        self.assertEqual(tracing.kind({"text": 5}), tracing.OTHER)

    def test_eventClient(self) -> None:
        self.assertEqual(tracing.eventClient(EVENTS[-1]), "192.0.2.7")
        self.assertIsNone(tracing.eventClient(ev("x")))


class MessageTraceTests(SynchronousTestCase):
    def test_trace(self) -> None:
        trace = tracing.messageTrace(EVENTS, Q1)
        assert trace is not None
        received = trace["received"]
        self.assertEqual(received["listener"], "submission")
        self.assertEqual(received["tls"], "TLSv1.3/TLS_AES_128_GCM_SHA256")
        self.assertEqual(received["policy"], "SenderLoginPolicy")
        self.assertEqual(received["quota"]["messages"], 3)
        # The login in force: the good one, not the failed attempt before it.
        self.assertEqual(
            (received["login"]["ok"], received["login"]["mech"], received["login"]["backend"]),
            (True, "PLAIN", "PasswdChecker"),
        )
        self.assertEqual(
            [(a["to"], a["status"], a["reply"], a["relay"]) for a in trace["attempts"]],
            [
                ("bob@example.com", "deferred", "451 4.3.0 busy", "a[192.0.2.1]:587"),
                ("bob@example.com", "sent", "250 2.0.0 ok", "b[192.0.2.2]:587"),
                ("carol@example.net", "bounced", "550 5.1.1 no such user", "a[192.0.2.1]:587"),
            ],
        )
        self.assertEqual(trace["attempts"][0]["route"], "smarthosts a:587,b:587")
        texts = [e["text"] for e in trace["events"]]
        self.assertEqual(texts, [f"Queue {Q1}: bounced: <carol@example.net>",
                                 f"Queue {Q1}: bounce queued as {BOUNCE}"])  # fmt: skip
        s = trace["session"]
        self.assertEqual((s["session"], s["client"], s["outcome"]), ("s1", "192.0.2.7", "quit"))
        self.assertEqual([a["ok"] for a in s["logins"]], [False, True])
        # The breaker's event carries the session: it is part of the trace.
        self.assertEqual([e["text"][:8] for e in s["events"]], ["breaker:"])
        # Nothing of the other session or message.
        self.assertNotIn("mallory", json.dumps(trace))
        self.assertNotIn(Q2, json.dumps(trace))

    def test_text(self) -> None:
        trace = tracing.messageTrace(EVENTS, Q1)
        assert trace is not None
        text = messageText(trace)
        for words in [
            f"Message {Q1}",
            "listener    submission (client 192.0.2.7)",
            "TLS         TLSv1.3/TLS_AES_128_GCM_SHA256",
            "login       alice with PLAIN, backend PasswdChecker",
            "sender      <alice@example.org> allowed by SenderLoginPolicy",
            "limits      quota messages 3/100 per 3600 s",
            "AUTH FAILED: alice with LOGIN",
            "<carol@example.net> bounced: route smarthosts a:587,b:587, relay a[192.0.2.1]:587",
            "reply: 550 5.1.1 no such user",
            "breaker: rule recipients-per-hour",
        ]:
            self.assertIn(words, text)

    def test_bounceByItsOwnId(self) -> None:
        trace = tracing.messageTrace(EVENTS, BOUNCE)
        assert trace is not None
        self.assertIsNone(trace["received"])
        self.assertEqual([e["text"] for e in trace["events"]],
                         [f"Queue {Q1}: bounce queued as {BOUNCE}"])  # fmt: skip
        self.assertIn("not in the log", messageText(trace))

    def test_withoutSession(self) -> None:
        """Lines of a gateway before session ids: the message's own lines still tell."""
        old = [{k: v for k, v in e.items() if k != "session"} for e in EVENTS]
        trace = tracing.messageTrace(old, Q1)
        assert trace is not None
        self.assertIsNone(trace["session"])
        self.assertEqual(trace["received"]["policy"], "SenderLoginPolicy")
        self.assertEqual(len(trace["attempts"]), 3)

    def test_unknown(self) -> None:
        self.assertIsNone(tracing.messageTrace(EVENTS, "0000000000000000FFFF"))


class ClientTraceTests(SynchronousTestCase):
    def test_sessions(self) -> None:
        second = session("s3", "192.0.2.7", "0005F1A2B3C4D5E6F7AB")
        trace = tracing.clientTrace(EVENTS + second, "192.0.2.7")
        self.assertEqual([s["session"] for s in trace["sessions"]], ["s1", "s3"])
        first = trace["sessions"][0]
        self.assertEqual(first["queued"], [Q1])
        self.assertEqual([m["queueId"] for m in first["messages"]], [Q1])
        # Outside any session: the unrelated line and the throttle's line of this client.
        self.assertEqual([e["text"] for e in trace["events"]],
                         ["unrelated", "mailgw auth-throttle: ..."])  # fmt: skip
        text = clientText(trace)
        self.assertIn("Client 192.0.2.7: 2 session(s)", text)
        self.assertIn("Session s1 from", text)
        self.assertIn(f"Message {Q1}", text)
        self.assertNotIn("mallory", text)


class LogFileTests(SynchronousTestCase):
    def write(self, path: str, events: list[dict[str, Any]], mtime: float) -> None:
        data = "".join(json.dumps(e) + "\n" for e in events)
        if path.endswith(".gz"):
            with gzip.open(path, "wt") as f:
                f.write(data)
        else:
            with open(path, "w") as f:
                f.write("not json\n{broken\n" + data)
        os.utime(path, (mtime, mtime))

    def test_rotatedFilesOldestFirst(self) -> None:
        base = self.mktemp()
        os.mkdir(base)
        log = os.path.join(base, "mailgw.log")
        # Session lines rotated away twice (one compressed), deliveries in the current file.
        self.write(log + ".2.gz", EVENTS[:3], 1000)
        self.write(log + ".1", EVENTS[3:7], 2000)
        self.write(log, EVENTS[7:], 3000)
        self.write(os.path.join(base, "mailgw.log.bak~"), [], 500)  # not a rotated file
        self.assertEqual(logFiles(log), [log + ".2.gz", log + ".1", log])
        trace = traceMessage(logFiles(log), Q1)
        assert trace is not None
        self.assertEqual(trace["received"]["sender"], "alice@example.org")
        self.assertEqual(len(trace["attempts"]), 3)
        self.assertEqual(trace["session"]["outcome"], "quit")
        client = traceClient(logFiles(log), "198.51.100.4")
        self.assertEqual([s["session"] for s in client["sessions"]], ["s2"])
        self.assertEqual(client["sessions"][0]["messages"][0]["attempts"][0]["status"], "sent")

    def test_missing(self) -> None:
        with self.assertRaises(CommandError):
            logFiles(self.mktemp())
