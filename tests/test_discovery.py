"""
Tests for L{imxd.discovery}: the order in which SRV targets are tried.
"""

import collections
import random

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.names import dns, error
from twisted.trial.unittest import SynchronousTestCase

from imxd import discovery
from imxd.discovery import (
    Discovery,
    DiscoveryError,
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


class FakeResolver:
    """
    Answers C{lookupService} from a table, and counts the look-ups.
    """

    def __init__(self):
        self.answers = {}
        self.lookups = []

    def lookupService(self, name):
        self.lookups.append(name)
        answer = self.answers[name]
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed((answer, [], []))


def srv(target, port, ttl=300, priority=0, weight=0):
    """
    @return: an SRV answer record.
    """
    return dns.RRHeader(
        b"_imx._tcp.b.example",
        dns.SRV,
        ttl=ttl,
        payload=dns.Record_SRV(priority, weight, port, target, ttl=ttl),
    )


class DiscoveryTests(SynchronousTestCase):
    """
    L{Discovery}: overrides, SRV, fallback, caching and failures.
    """

    def setUp(self):
        self.clock = Clock()
        self.resolver = FakeResolver()
        self.discovery = Discovery(
            self.resolver,
            self.clock,
            overrides={"partner.example": Target("127.0.0.5", 5275)},
            failureTTL=30,
        )

    def test_override(self):
        """
        A configured peer override replaces DNS entirely.
        """
        self.assertEqual(
            self.successResultOf(self.discovery.targets("partner.example")),
            [Target("127.0.0.5", 5275)],
        )
        self.assertEqual(self.resolver.lookups, [])

    def test_srvCachedForItsTTL(self):
        """
        SRV targets are returned in priority order and the answer is reused
        until its TTL (the smallest of the records') runs out.
        """
        self.resolver.answers["_imx._tcp.b.example"] = [
            srv(b"two.b.example", 6000, ttl=300, priority=20),
            srv(b"one.b.example", 5275, ttl=100, priority=10),
        ]
        first = self.successResultOf(self.discovery.targets("b.example"))
        self.assertEqual(
            [(t.host, t.port) for t in first],
            [("one.b.example", 5275), ("two.b.example", 6000)],
        )
        self.clock.advance(99)
        self.successResultOf(self.discovery.targets("b.example"))
        self.assertEqual(len(self.resolver.lookups), 1)
        self.assertEqual(self.discovery.cached()["b.example"].source, "srv")
        self.clock.advance(2)
        self.successResultOf(self.discovery.targets("b.example"))
        self.assertEqual(len(self.resolver.lookups), 2)

    def test_noSuchName(self):
        """
        NXDOMAIN for the SRV name falls back to the domain on port 5275.
        """
        self.resolver.answers["_imx._tcp.b.example"] = error.DNSNameError()
        self.assertEqual(
            self.successResultOf(self.discovery.targets("b.example")),
            [Target("b.example", 5275)],
        )
        self.assertEqual(self.discovery.cached()["b.example"].source, "fallback")

    def test_failureCachedBriefly(self):
        """
        A DNS timeout fails with a reason an operator can read, is not
        asked again for the failure TTL, and is retried after it.
        """
        self.resolver.answers["_imx._tcp.b.example"] = error.DNSQueryTimeoutError(5)
        failure = self.failureResultOf(
            self.discovery.targets("b.example"), DiscoveryError
        )
        self.assertIn("_imx._tcp.b.example", str(failure.value))
        self.assertIn("DNSQueryTimeoutError", str(failure.value))
        self.failureResultOf(self.discovery.targets("b.example"), DiscoveryError)
        self.assertEqual(len(self.resolver.lookups), 1)
        self.clock.advance(31)
        self.resolver.answers["_imx._tcp.b.example"] = [srv(b"one.b.example", 5275)]
        self.assertEqual(
            len(self.successResultOf(self.discovery.targets("b.example"))), 1
        )

    def test_noService(self):
        """
        An SRV answer of '.' means no IMX service.
        """
        self.resolver.answers["_imx._tcp.b.example"] = [srv(b".", 0)]
        self.failureResultOf(self.discovery.targets("b.example"), NoService)

    def test_flush(self):
        """
        Flushing forgets one domain's answer, or all of them.
        """
        self.resolver.answers["_imx._tcp.b.example"] = [srv(b"one.b.example", 5275)]
        self.resolver.answers["_imx._tcp.c.example"] = error.DNSNameError()
        self.successResultOf(self.discovery.targets("b.example"))
        self.successResultOf(self.discovery.targets("c.example"))
        self.discovery.flush("b.example")
        self.assertEqual(list(self.discovery.cached()), ["c.example"])
        self.discovery.flush()
        self.assertEqual(self.discovery.cached(), {})


class CacheBoundTests(SynchronousTestCase):
    """
    The discovery cache cannot grow without bound.
    """

    def test_bounded(self):
        """
        Past MAX_CACHED answers, expired ones go first, then the ones that
        expire soonest; the newest answer is always kept.
        """
        self.patch(discovery, "MAX_CACHED", 3)
        clock = Clock()
        resolver = FakeResolver()
        for name in ("old", "a", "b", "c", "d"):
            resolver.answers[f"_imx._tcp.{name}.example"] = error.DNSNameError()
        finder = Discovery(resolver, clock, failureTTL=30)
        finder.targets("old.example")
        clock.advance(31)
        for name in ("a.example", "b.example", "c.example"):
            clock.advance(1)
            finder.targets(name)
        self.assertEqual(
            sorted(finder._cache), ["a.example", "b.example", "c.example"]
        )
        clock.advance(1)
        finder.targets("d.example")
        self.assertEqual(
            sorted(finder._cache), ["b.example", "c.example", "d.example"]
        )
