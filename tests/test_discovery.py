"""
Tests for L{imxd.discovery}: the order in which SRV targets are tried.
"""

import collections
import random

from twisted.trial.unittest import SynchronousTestCase

from imxd.discovery import (
    NoService,
    Target,
    fallbackTargets,
    orderTargets,
    srvName,
)


class OrderTests(SynchronousTestCase):
    """
    RFC 2782 ordering: priority first, then weighted random choice.
    """

    def assertNear(self, observed, expected, tolerance):
        """
        Fail unless C{observed} is within C{tolerance} of C{expected}.
        """
        self.assertTrue(
            abs(observed - expected) <= tolerance,
            f"{observed} is not within {tolerance} of {expected}",
        )

    def test_priorityFirst(self):
        """
        Every target of a lower priority comes before any of a higher one,
        whatever the weights.
        """
        targets = [
            Target("c", 1, priority=20, weight=100),
            Target("a", 1, priority=10, weight=0),
            Target("b", 1, priority=10, weight=5),
            Target("d", 1, priority=30, weight=1),
        ]
        rng = random.Random(1)
        for _ in range(50):
            order = [t.host for t in orderTargets(targets, rng)]
            self.assertEqual(sorted(order[:2]), ["a", "b"])
            self.assertEqual(order[2:], ["c", "d"])

    def test_weights(self):
        """
        Within one priority, a target comes first in proportion to its
        weight (here 3:1, over 4,000 seeded draws).
        """
        targets = [Target("heavy", 1, weight=30), Target("light", 1, weight=10)]
        rng = random.Random(7)
        firsts = collections.Counter(
            orderTargets(targets, rng)[0].host for _ in range(4000)
        )
        self.assertNear(firsts["heavy"] / 4000, 0.75, 0.03)

    def test_equalWeightsRandom(self):
        """
        Targets of equal weight, zero included, each come first about
        equally often: the choice is random, as with MX.
        """
        for weight in (0, 10):
            targets = [Target(h, 1, weight=weight) for h in "abc"]
            rng = random.Random(3)
            firsts = collections.Counter(
                orderTargets(targets, rng)[0].host for _ in range(3000)
            )
            for host in "abc":
                self.assertNear(firsts[host] / 3000, 1 / 3, 0.04)

    def test_zeroWeightRarelyFirst(self):
        """
        A zero-weight target beside a weighted one comes first only when
        the draw is 0, and is never lost from the list.
        """
        targets = [Target("zero", 1, weight=0), Target("some", 1, weight=99)]
        rng = random.Random(5)
        orders = [orderTargets(targets, rng) for _ in range(2000)]
        firsts = collections.Counter(order[0].host for order in orders)
        self.assertLess(firsts["zero"], 60)
        self.assertTrue(all(len(order) == 2 for order in orders))

    def test_allTargetsKept(self):
        """
        Ordering is a permutation: every target is tried exactly once.
        """
        targets = [Target(f"h{i}", i, priority=i % 3, weight=i % 4) for i in range(12)]
        order = orderTargets(targets, random.Random(0))
        self.assertEqual(sorted(order, key=lambda t: t.port), targets)

    def test_noService(self):
        """
        A lone target '.' means the domain offers no IMX service.
        """
        self.assertRaises(NoService, orderTargets, [Target(".", 0)])

    def test_empty(self):
        """
        No targets order to an empty list.
        """
        self.assertEqual(orderTargets([]), [])


class NameTests(SynchronousTestCase):
    """
    Names and defaults.
    """

    def test_srvName(self):
        """
        IMX servers are published under _imx._tcp.
        """
        self.assertEqual(srvName("a.example"), "_imx._tcp.a.example")

    def test_fallback(self):
        """
        Without SRV records the domain itself is tried on port 5275.
        """
        self.assertEqual(fallbackTargets("a.example"), [Target("a.example", 5275)])
