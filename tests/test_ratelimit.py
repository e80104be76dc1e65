"""
Tests for L{imxd.ratelimit}: the token buckets, the per-account limit on
the messages a hosted domain's users send (L{imxd.router.Router.submit})
and the per-origin-domain limit on the Data a server accepts from its
peers (L{imxd.federation}), with their exempt lists.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from imxd import ratelimit
from imxd.config import LimitsConfig, QueueConfig
from imxd.peer import Refused
from imxd.ratelimit import MAX_BUCKETS, RateLimiter
from imxd.wire import ErrorCode
from tests.network import Network, message
from tests.test_outbox import makeServer


class RateLimiterTests(SynchronousTestCase):
    """
    L{RateLimiter} on a L{Clock}.
    """

    def setUp(self):
        self.clock = Clock()

    def drain(self, limiter, key):
        """
        Take tokens from C{key}'s bucket until one is refused.

        @return: how many were taken and the refusal's retry-after.
        """
        taken = 0
        while True:
            retryAfter = limiter.take(key)
            if retryAfter is not None:
                return taken, retryAfter
            taken += 1
            self.assertLess(taken, 100000)

    def test_burstThenRefused(self):
        """
        A fresh bucket allows C{burst} requests at once, then refuses with
        a retry-after of at least one second, counting the refusal.
        """
        limiter = RateLimiter(self.clock, rate=2, burst=3)
        taken, retryAfter = self.drain(limiter, "k")
        self.assertEqual(taken, 3)
        self.assertIsInstance(retryAfter, int)
        self.assertEqual(retryAfter, 1)
        self.assertEqual(limiter.refusals, 1)
        self.assertEqual(limiter.take("k"), 1)
        self.assertEqual(limiter.refusals, 2)

    def test_retryAfter(self):
        """
        The retry-after is the whole seconds until a token is back (at
        least one), and waiting that long is enough.
        """
        for rate, expected in [(1, 1), (2, 1), (10, 1), (0.5, 2), (0.25, 4), (0.3, 4)]:
            limiter = RateLimiter(self.clock, rate=rate, burst=1)
            self.assertIsNone(limiter.take("k"))
            retryAfter = limiter.take("k")
            self.assertEqual(retryAfter, expected, rate)
            self.clock.advance(retryAfter)
            self.assertIsNone(limiter.take("k"), rate)

    def test_refill(self):
        """
        Tokens come back at C{rate} a second, at most C{burst} of them.
        """
        limiter = RateLimiter(self.clock, rate=2, burst=4)
        self.assertEqual(self.drain(limiter, "k")[0], 4)
        self.clock.advance(1)
        self.assertEqual(self.drain(limiter, "k")[0], 2)
        self.clock.advance(0.5)
        self.assertEqual(self.drain(limiter, "k")[0], 1)
        self.clock.advance(1000)
        self.assertEqual(self.drain(limiter, "k")[0], 4)

    def test_keysIndependent(self):
        """
        Each key has its own bucket.
        """
        limiter = RateLimiter(self.clock, rate=1, burst=2)
        self.assertEqual(self.drain(limiter, "a")[0], 2)
        self.assertEqual(self.drain(limiter, "b")[0], 2)

    def test_exempt(self):
        """
        Exempt keys are never limited nor counted.
        """
        limiter = RateLimiter(self.clock, rate=1, burst=1, exempt=["vip"])
        for _ in range(1000):
            self.assertIsNone(limiter.take("vip"))
        self.assertEqual(limiter.refusals, 0)
        self.assertEqual(self.drain(limiter, "other")[0], 1)

    def test_noLimit(self):
        """
        Rate 0 disables the limit.
        """
        limiter = RateLimiter(self.clock, rate=0, burst=1)
        for _ in range(1000):
            self.assertIsNone(limiter.take("k"))
        self.assertEqual(limiter.refusals, 0)

    def test_bucketsBounded(self):
        """
        At most L{MAX_BUCKETS} buckets are kept; full ones (refilled) are
        forgotten first, so a drained bucket stays drained.
        """
        self.patch(ratelimit, "MAX_BUCKETS", 10)
        limiter = RateLimiter(self.clock, rate=1, burst=5)
        for n in range(9):
            self.assertIsNone(limiter.take(f"idle{n}"))
        self.clock.advance(100)
        self.assertEqual(self.drain(limiter, "hot")[0], 5)
        self.assertEqual(len(limiter._buckets), 10)
        self.assertIsNone(limiter.take("new"))
        self.assertLessEqual(len(limiter._buckets), 10)
        self.assertIsNotNone(limiter.take("hot"))
        for n in range(100):
            limiter.take(f"more{n}")
            self.assertLessEqual(len(limiter._buckets), 10)

    def test_bucketsBoundedNoneFull(self):
        """
        When no bucket has refilled, the oldest half is forgotten.
        """
        self.patch(ratelimit, "MAX_BUCKETS", 10)
        limiter = RateLimiter(self.clock, rate=1, burst=5)
        for n in range(10):
            self.drain(limiter, f"k{n}")
            self.clock.advance(0.01)
        self.drain(limiter, "new")
        self.assertLessEqual(len(limiter._buckets), 10)
        self.assertIn("k9", limiter._buckets)
        self.assertNotIn("k0", limiter._buckets)
        self.assertIsNotNone(limiter.take("k9"))

    def test_maxBuckets(self):
        """
        With the real ceiling, one bucket more than L{MAX_BUCKETS} does not
        grow the table beyond it.
        """
        limiter = RateLimiter(self.clock, rate=1, burst=5)
        for n in range(MAX_BUCKETS + 1):
            limiter.take(n)
        self.assertLessEqual(len(limiter._buckets), MAX_BUCKETS)


A = "10.0.0.1"
B = "10.0.0.2"
C = "10.0.0.3"
D = "10.0.0.4"


class AccountRateTests(SynchronousTestCase):
    """
    A hosted domain's users send within C{account_rate}.
    """

    def setUp(self):
        self.network = Network()
        self.a = self.network.server(
            A,
            [
                {
                    "name": "a.test",
                    "backend": "memory",
                    "policy": {
                        "account_rate": 2,
                        "account_burst": 2,
                        "rate_exempt": ["robot@a.test"],
                    },
                }
            ],
        )
        self.b = self.network.server(B, ["b.test"])
        self.domain = self.a.aggregator.domain("a.test")
        self.received = self.b.aggregator.domain("b.test").backend.messages

    def send(self, sender, messageId):
        return self.domain.sendMessage(message(sender, "bob@b.test", messageId))

    def test_limited(self):
        """
        Past its burst, an account's message is refused at once with a
        temporary C{rate-limited} and a retry-after, and is neither queued
        nor sent; after that time it may send again.
        """
        accepted = [self.send("alice@a.test", f"m{n}") for n in range(2)]
        refused = self.send("alice@a.test", "m2")
        refusal = self.failureResultOf(refused, Refused).value
        self.assertEqual(refusal.code, ErrorCode.RATE_LIMITED)
        self.assertTrue(refusal.temporary)
        self.assertEqual(refusal.retryAfter, 1)
        self.assertIn("alice@a.test", refusal.text)
        self.network.flush()
        for sent in accepted:
            self.assertIsNone(self.successResultOf(sent))
        self.assertEqual([m.messageId for m in self.received], ["m0", "m1"])
        self.assertEqual(self.a.outbox.depth, 0)

        self.network.clock.advance(refusal.retryAfter)
        again = self.send("alice@a.test", "m3")
        self.network.flush()
        self.assertIsNone(self.successResultOf(again))
        self.assertEqual([m.messageId for m in self.received], ["m0", "m1", "m3"])

    def test_perAccount(self):
        """
        Each account has its own bucket.
        """
        for n in range(2):
            self.send("alice@a.test", f"a{n}")
        self.failureResultOf(self.send("alice@a.test", "a2"), Refused)
        carol = [self.send("carol@a.test", f"c{n}") for n in range(2)]
        self.network.flush()
        for sent in carol:
            self.successResultOf(sent)

    def test_exempt(self):
        """
        An address in C{rate_exempt} is not limited.
        """
        sent = [self.send("robot@a.test", f"r{n}") for n in range(30)]
        self.network.flush()
        for each in sent:
            self.assertIsNone(self.successResultOf(each))
        self.assertEqual(len(self.received), 30)

    def test_defaults(self):
        """
        Without a policy, an account may send C{account_burst} (100)
        messages at once, not more.
        """
        other = self.network.server("10.0.0.9", ["z.test"])
        domain = other.aggregator.domain("z.test")
        sent = [
            domain.sendMessage(message("zed@z.test", "bob@b.test", f"z{n}")) for n in range(101)
        ]
        self.assertEqual(self.failureResultOf(sent[-1], Refused).value.code, ErrorCode.RATE_LIMITED)
        self.network.flush()
        for each in sent[:-1]:
            self.successResultOf(each)


class DomainRateTests(SynchronousTestCase):
    """
    B accepts Data from each remote domain within C{domain_rate}; a.test
    and d.test are limited, c.test is exempt.  The senders' outboxes would
    wait 500 s or more after a failure of their own.
    """

    def setUp(self):
        self.network = Network()
        queue = QueueConfig(retryInitial=1000.0, retryMax=1000.0)
        self.a = makeServer(self.network, A, ["a.test"], queue=queue)
        self.c = makeServer(self.network, C, ["c.test"], queue=queue)
        self.d = makeServer(self.network, D, ["d.test"], queue=queue)
        self.b = makeServer(
            self.network,
            B,
            ["b.test"],
            limits=LimitsConfig(domainRate=1, domainBurst=2, rateExemptDomains=("c.test",)),
        )
        self.received = self.b.aggregator.domain("b.test").backend.messages

    def sendAll(self, server, domain, count):
        """
        Give C{count} messages to C{domain} of C{server}, then let the
        network run.

        @return: their ids.
        """
        hosted = server.aggregator.domain(domain)
        sent = [
            hosted.sendMessage(message(f"user@{domain}", "bob@b.test", f"{domain}-{n}"))
            for n in range(count)
        ]
        self.network.flush()
        for each in sent:
            self.successResultOf(each)
        return [f"{domain}-{n}" for n in range(count)]

    def rateLimited(self):
        return dict(self.b.status())["count.rate-limited"]

    def test_limited(self):
        """
        Past the burst, B refuses a.test's Data with C{rate-limited} and a
        RETRY_AFTER; A's outbox waits that long (not its own backoff) and
        then delivers everything, in order.
        """
        ids = self.sendAll(self.a, "a.test", 5)
        self.assertEqual([m.messageId for m in self.received], ids[:2])
        self.assertEqual(self.rateLimited(), 3)
        queue = self.a.outbox.queues["b.test"]
        self.assertIn("402 rate-limited", queue.lastError)
        self.assertEqual(queue.retryAt - self.network.clock.seconds(), 1)
        reports = self.a.aggregator.domain("a.test").backend.reports
        self.assertEqual([(m.messageId, r) for m, r in reports], [(i, None) for i in ids[:2]])

        self.network.advance(10, step=0.5)
        self.assertEqual([m.messageId for m in self.received], ids)
        reports = self.a.aggregator.domain("a.test").backend.reports
        self.assertEqual([(m.messageId, r) for m, r in reports], [(i, None) for i in ids])
        self.assertGreater(self.rateLimited(), 3)
        self.assertEqual(self.a.outbox.depth, 0)

    def test_otherDomain(self):
        """
        One domain's bucket does not limit another's.
        """
        self.sendAll(self.a, "a.test", 5)
        self.assertEqual(self.rateLimited(), 3)
        ids = self.sendAll(self.d, "d.test", 2)
        self.assertEqual([m.messageId for m in self.received][-2:], ids)
        self.assertEqual(self.rateLimited(), 3)
        self.assertEqual(self.d.outbox.depth, 0)

    def test_exempt(self):
        """
        A domain in C{rate_exempt_domains} is not limited.
        """
        ids = self.sendAll(self.c, "c.test", 20)
        self.assertEqual([m.messageId for m in self.received], ids)
        self.assertEqual(self.rateLimited(), 0)
        self.assertEqual(self.c.outbox.depth, 0)
