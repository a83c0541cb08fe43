"""
Tests for L{mailgw.relay.slots}: per-host and global limits, and the
reserve that a host's further connections leave to hosts with none.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mailgw.relay.slots import ConnectionSlots


class ConnectionSlotsTests(SynchronousTestCase):
    def test_perHostLimit(self) -> None:
        slots = ConnectionSlots(limit=10, perHost=2, reserve=0)
        granted = [slots.acquire("a") for _ in range(3)]
        self.assertEqual([d.called for d in granted], [True, True, False])
        self.assertEqual(slots.active("a"), 2)
        slots.release("a")
        self.assertTrue(granted[2].called)
        self.assertEqual(slots.active("a"), 2)

    def test_globalLimit(self) -> None:
        slots = ConnectionSlots(limit=2, perHost=5, reserve=0)
        a, b, c = slots.acquire("a"), slots.acquire("b"), slots.acquire("c")
        self.assertEqual([a.called, b.called, c.called], [True, True, False])
        slots.release("a")
        self.assertTrue(c.called)
        self.assertEqual(slots.inUse, 2)

    def test_hostAtItsLimitBlocksNobody(self) -> None:
        """A waiter for a full host does not hold up a later one for another."""
        slots = ConnectionSlots(limit=10, perHost=1, reserve=0)
        slots.acquire("a")
        second = slots.acquire("a")
        other = slots.acquire("b")
        self.assertEqual((second.called, other.called), (False, True))

    def test_reserveKeptForNewHosts(self) -> None:
        """
        limit 4, reserve 1: one host gets three slots, not four; the last
        goes to a host with no connection.
        """
        slots = ConnectionSlots(limit=4, perHost=4, reserve=1)
        slow = [slots.acquire("slow") for _ in range(4)]
        self.assertEqual([d.called for d in slow], [True, True, True, False])
        other = slots.acquire("other")
        self.assertTrue(other.called)
        self.assertEqual(slots.inUse, 4)
        slots.release("other")
        self.assertFalse(slow[3].called)  # the reserve is free again
        slots.release("slow")
        self.assertTrue(slow[3].called)  # two free, one above the reserve

    def test_defaultReserve(self) -> None:
        self.assertEqual(ConnectionSlots(20, 5).reserve, 5)
        self.assertEqual(ConnectionSlots(2, 5).reserve, 0)
        self.assertEqual(ConnectionSlots(1, 1, reserve=3).reserve, 0)

    def test_idleHostsForgotten(self) -> None:
        slots = ConnectionSlots(limit=4, perHost=2)
        slots.acquire("a")
        slots.release("a")
        self.assertTrue(slots.idle)
        self.assertEqual(slots._active, {})

    def test_releaseUnheld(self) -> None:
        slots = ConnectionSlots(limit=4, perHost=2)
        self.assertRaises(RuntimeError, slots.release, "a")

    def test_limitsChecked(self) -> None:
        self.assertRaises(ValueError, ConnectionSlots, 0, 1)
        self.assertRaises(ValueError, ConnectionSlots, 1, 0)

    def test_callbackMayAcquire(self) -> None:
        """A grant's callback that acquires again sees consistent counts."""
        slots = ConnectionSlots(limit=2, perHost=2, reserve=0)
        first = slots.acquire("a")
        nested = []
        waiting = slots.acquire("b")
        waiting.addCallback(lambda _: nested.append(slots.acquire("c")))
        self.assertTrue(first.called)
        self.assertFalse(nested[0].called)
        self.assertEqual(slots.inUse, 2)
