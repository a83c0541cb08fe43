"""
Generated traffic for the breaker tests: a realistic week of one user
(deterministic seed), and a takeover burst.

The user works weekdays from about 08:30 to 18:00 UTC from the office
network, reads and sends mail in the evening from home, from two mobile
networks on the way, and a little at the weekend; writes to about 80
contacts at 36 domains (a few far more often than others), now and then
to someone new; two old contacts have left their companies and bounce.
Each mail client session logs in, then sends what it has.

The takeover: a botnet with the account's password, from networks the
account never used, logs in from several of them within seconds, then
sends to many addresses at domains the account never wrote to.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import attrs

DAY, HOUR = 86400.0, 3600.0
#: Monday 2026-11-02 00:00 UTC.
MONDAY = 1793577600.0
USER = "alice@example.com"
OFFICE = ["203.0.113.10", "203.0.113.11"]
HOME = ["198.51.100.23"]
MOBILE = ["100.64.1.9", "100.64.7.44", "2001:db8:4:1a00::5"]
#: Two contacts who left: their addresses bounce (550 5.1.1).
GONE = ["gone0@d3.example", "gone1@d17.example"]


@attrs.frozen
class Login:
    when: float
    client: str


@attrs.frozen
class Message:
    when: float
    client: str
    recipients: tuple[str, ...]


Event = Login | Message


def contacts(rng: random.Random) -> tuple[list[str], list[float]]:
    """About 80 contacts at 36 domains, and how often each is written to."""
    domains = [f"d{i}.example" for i in range(36)]
    people = [f"p{i}@{domains[i % 36]}" for i in range(78)] + GONE
    weights = [1.0 / (1 + i % 25) for i in range(len(people))]
    rng.shuffle(weights)
    return people, weights


def _session(
    rng: random.Random, when: float, client: str, people: list[str], weights: list[float],
    messages: int, newContacts: list[int],
) -> Iterator[Event]:  # fmt: skip
    yield Login(when, client)
    for _ in range(messages):
        when += rng.uniform(20, 400)
        count = rng.choices([1, 2, 3, 5], [60, 25, 12, 3])[0]
        rcpts = set(rng.choices(people, weights, k=count))
        if rng.random() < 0.03:  # someone new, at a domain never written to
            newContacts[0] += 1
            rcpts.add(f"new{newContacts[0]}@n{newContacts[0]}.example")
        yield Message(when, client, tuple(sorted(rcpts)))


def week(seed: int = 20261129) -> list[Event]:
    """Seven days of the user's logins and messages, in time order."""
    rng = random.Random(seed)
    people, weights = contacts(rng)
    events: list[Event] = []
    newContacts = [0]
    for day in range(7):
        base = MONDAY + day * DAY
        weekday = day < 5
        if weekday:
            # On the way in: the phone, now and then.
            if rng.random() < 0.5:
                t = base + 7.5 * HOUR + rng.uniform(0, 1800)
                events += _session(rng, t, rng.choice(MOBILE), people, weights,
                                   rng.randint(0, 2), newContacts)  # fmt: skip
            # The working day: a session every hour or so.
            t = base + 8.5 * HOUR + rng.uniform(0, 900)
            while t < base + 18 * HOUR:
                busy = 1 + (t - base) // HOUR in (10, 11, 14, 15, 16)
                events += _session(rng, t, rng.choice(OFFICE), people, weights,
                                   rng.randint(1, 6 if busy else 3), newContacts)  # fmt: skip
                t += rng.uniform(1800, 5400)
        # The evening at home; a little at the weekend.
        for _ in range(rng.randint(0, 2) if weekday else rng.randint(0, 3)):
            t = base + rng.uniform(19, 22) * HOUR
            client = rng.choice(HOME if weekday else HOME + MOBILE)
            events += _session(rng, t, client, people, weights, rng.randint(0, 3), newContacts)
    return sorted(events, key=lambda e: e.when)


def takeover(
    start: float, seed: int = 666, networks: int = 40, minutes: int = 5, perSecond: int = 2
) -> list[Event]:
    """
    A botnet of ``networks`` networks: one new node logs in each second
    (the first five within two seconds), and each node then sends
    ``perSecond`` messages a second for the rest of the burst, each to 10
    recipients at domains the user never wrote to.
    """
    rng = random.Random(seed)
    nodes = [f"{rng.randint(11, 223)}.{rng.randint(0, 255)}.{i}.{rng.randint(1, 254)}"
             for i in range(networks)]  # fmt: skip
    events: list[Event] = []
    end = start + minutes * 60
    for i, node in enumerate(nodes):
        login = start + (i * 0.4 if i < 5 else i - 3.0)
        events.append(Login(login, node))
        t = login + 5.0
        while t < end:
            rcpts = tuple(
                f"{rng.choice(['info', 'sales', 'admin', 'contact'])}{rng.randint(0, 99999)}"
                f"@spam{rng.randint(0, 5000)}.example"
                for _ in range(10)
            )
            events.append(Message(t, node, rcpts))
            t += 1.0 / perSecond
    return sorted(events, key=lambda e: e.when)
