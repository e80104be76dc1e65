"""
Tests for L{imxd.presence} across restarts: subscriptions (both sides) and
published presence kept in the process's database by
L{imxd.store.SubscriptionStore}, taken up again when a server starts.

Each server has a file-backed database; a restart stops the Aggregator,
drops the server's connections, closes the database and starts a new
server on the same file, on the same clock.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from imxd.peer import Refused
from imxd.presence import RESUME_SPREAD
from imxd.store import Database, SubscriptionStore
from imxd.wire import Renew, Subscribe
from tests.network import Network
from tests.test_presence import presencesOf


def fileServer(network, host, domains, path, port=5275):
    """
    Start an imxd server at C{host:port} hosting C{domains} (memory
    backends) with its database in the file C{path}.

    @return: its L{Federation}.
    """
    return network.server(host, domains, port=port, database=Database(path, network.clock))


class RestartTests(SynchronousTestCase):
    """
    A (a.test) and B (b.test), each with a database file; alice@a.test
    subscribes to bob@b.test.
    """

    def setUp(self):
        self.network = Network()
        self.hosts = {}
        self.paths = {}
        self.start("10.0.0.1", ["a.test"])
        self.start("10.0.0.2", ["b.test"])
        self.addCleanup(self.stopAll)

    def start(self, host, domains):
        """
        Start the server at C{host} hosting C{domains}, on its database
        file (the same one every time).
        """
        path = self.paths.setdefault(host, self.mktemp())
        self.hosts[host] = fileServer(self.network, host, domains, path)
        return self.hosts[host]

    def stop(self, host):
        """
        Stop the server at C{host}, database and all.
        """
        self.network.stop(self.hosts.pop(host))

    def restart(self, host, domains=None):
        """
        Stop the server at C{host} and start a new one on its database.
        """
        if domains is None:
            domains = sorted(self.hosts[host].aggregator.hostedDomains())
        self.stop(host)
        return self.start(host, domains)

    def stopAll(self):
        for host in list(self.hosts):
            self.stop(host)

    def domain(self, address):
        return self.network.domain(address)

    def backend(self, address):
        return self.domain(address).backend

    def settle(self, deferred):
        """
        Let the network (and timers due now) run and return the result of
        C{deferred}.
        """
        self.network.advance(0.1, step=0.1)
        return self.successResultOf(deferred)

    def presences(self, subscriber):
        return presencesOf(self.backend(subscriber), subscriber)

    def subscribers(self, publisher):
        return self.domain(publisher).presence.subscribers(publisher)

    def granted(self):
        """
        bob@b.test grants alice@a.test's request at once and is busy.
        """
        self.backend("bob@b.test").decisions["bob@b.test"] = "granted"
        self.settle(self.domain("bob@b.test").publishPresence("bob@b.test", "busy", "at work"))
        subscribed = self.domain("alice@a.test").subscribe("alice@a.test", "bob@b.test")
        self.assertEqual(self.settle(subscribed), "granted")
        self.assertEqual(self.presences("alice@a.test"), [("bob@b.test", "busy")])

    def rows(self, host, table):
        """
        @return: the rows of C{table} committed in C{host}'s database.
        """
        database = self.hosts[host].database
        database.commit()
        return database.read(f"SELECT * FROM {table}")

    def presenceCalls(self):
        """
        @return: the clock's delayed calls made by L{imxd.presence}.
        """
        return [
            call
            for call in self.network.clock.getDelayedCalls()
            if "Presence" in getattr(call.func, "__qualname__", "")
        ]

    @property
    def timeout(self):
        return self.domain("bob@b.test").config.subscriptionTimeout

    # -- publisher side ---------------------------------------------------------

    def test_publisherRestartKeepsGranted(self):
        """
        After a restart of the publisher's server a granted subscription is
        live: a presence change reaches the subscriber, a RENEW is accepted
        (not answered not-subscribed, so no new request reaches the
        publisher's backend).
        """
        self.granted()
        self.restart("10.0.0.2")
        self.assertEqual(self.subscribers("bob@b.test"), ["alice@a.test"])
        self.settle(self.domain("bob@b.test").publishPresence("bob@b.test", "away"))
        self.assertEqual(self.presences("alice@a.test")[-1], ("bob@b.test", "away"))
        renewed = self.domain("bob@b.test").presence.receive(
            Renew(subscriber="alice@a.test", publisher="bob@b.test")
        )
        self.assertEqual(self.settle(renewed).state, "granted")
        self.network.advance(self.timeout * 2, step=60)
        self.assertEqual(self.subscribers("bob@b.test"), ["alice@a.test"])
        self.assertEqual(self.backend("bob@b.test").subscriptionRequests, [])
        self.assertNotIn(("bob@b.test", "unknown"), self.presences("alice@a.test"))

    def test_publisherRestartKeepsPresence(self):
        """
        The presence published before a restart is still the current one
        after it: a new subscriber is sent it on grant, attribute answers
        give it.
        """
        self.backend("bob@b.test").decisions["bob@b.test"] = "granted"
        published = self.domain("bob@b.test").publishPresence(
            "bob@b.test", "busy", "at work", {"alias": "Bob"}
        )
        self.settle(published)
        self.restart("10.0.0.2")
        presence = self.domain("bob@b.test").presence
        self.assertEqual(presence.current("bob@b.test"), ("busy", "at work"))
        self.backend("bob@b.test").decisions["bob@b.test"] = "granted"
        self.settle(self.domain("alice@a.test").subscribe("alice@a.test", "bob@b.test"))
        [first] = self.backend("alice@a.test").notifications
        self.assertEqual((first.presence, first.status), ("busy", "at work"))
        self.assertEqual(first.attributes, ("alias=Bob",))

    def test_pendingSurvivesPublisherRestart(self):
        """
        A request the publisher has not decided survives a restart of the
        publisher's server and is decided after it, without asking its
        backend again.
        """
        self.assertEqual(
            self.settle(self.domain("alice@a.test").subscribe("alice@a.test", "bob@b.test")),
            "pending",
        )
        self.restart("10.0.0.2")
        self.settle(self.domain("bob@b.test").decide("bob@b.test", "alice@a.test", True))
        self.network.advance(1)
        self.assertEqual(
            [c[2] for c in self.backend("alice@a.test").subscriptionChanges],
            ["pending", "granted"],
        )
        self.assertEqual(self.presences("alice@a.test"), [("bob@b.test", "offline")])
        self.assertEqual(self.subscribers("bob@b.test"), ["alice@a.test"])
        self.assertEqual(self.backend("bob@b.test").subscriptionRequests, [])

    def test_decisionsSurvivePublisherRestart(self):
        """
        Decisions taken before a restart of the publisher's server hold
        after it: the granted subscriber gets presence changes and may
        renew, the denied one has nothing left to decide.
        """
        for subscriber in ("alice@a.test", "ann@a.test"):
            self.settle(self.domain(subscriber).subscribe(subscriber, "bob@b.test"))
        self.settle(self.domain("bob@b.test").decide("bob@b.test", "alice@a.test", True))
        self.settle(self.domain("bob@b.test").decide("bob@b.test", "ann@a.test", False))
        self.restart("10.0.0.2")
        self.assertEqual(self.subscribers("bob@b.test"), ["alice@a.test"])
        renewed = self.domain("bob@b.test").presence.receive(
            Renew(subscriber="alice@a.test", publisher="bob@b.test")
        )
        self.assertEqual(self.settle(renewed).state, "granted")
        decided = self.domain("bob@b.test").decide("bob@b.test", "ann@a.test", True)
        self.failureResultOf(decided, Refused)

    def test_lapseWritten(self):
        """
        A subscription that lapses on the publisher's server while it runs
        is removed from the database too.
        """
        presence = self.domain("bob@b.test").presence
        self.backend("bob@b.test").decisions["bob@b.test"] = "granted"
        record = Subscribe(subscriber="carol@c.test", publisher="bob@b.test", expires=120)
        self.settle(presence.receive(record))
        self.assertEqual(len(self.rows("10.0.0.2", "subscribers")), 1)
        self.network.clock.advance(121)
        self.assertEqual(presence.subscribers("bob@b.test"), [])
        self.assertEqual(self.rows("10.0.0.2", "subscribers"), [])

    def test_expiredDroppedAtStart(self):
        """
        A subscription that expired while the publisher's server was down
        is dropped at start, and the drop is written; one still live is
        kept.
        """
        presence = self.domain("bob@b.test").presence
        self.backend("bob@b.test").decisions["bob@b.test"] = "granted"
        for subscriber, expires in [("carol@c.test", 120), ("dave@c.test", 600)]:
            record = Subscribe(subscriber=subscriber, publisher="bob@b.test", expires=expires)
            self.assertEqual(self.settle(presence.receive(record)).state, "granted")
        self.stop("10.0.0.2")
        self.network.clock.advance(300)
        self.start("10.0.0.2", ["b.test"])
        self.assertEqual(self.subscribers("bob@b.test"), ["dave@c.test"])
        self.assertEqual(
            [row[1:3] for row in self.rows("10.0.0.2", "subscribers")],
            [("bob@b.test", "dave@c.test")],
        )

    # -- subscriber side ----------------------------------------------------------

    def test_subscriberRestartResumesRenewals(self):
        """
        After a restart of the subscriber's server its renewals go on: long
        past the old expiry the subscription is still granted on the
        publisher's server, and the subscriber never hears "unknown".
        """
        self.granted()
        self.restart("10.0.0.1")
        self.network.advance(self.timeout * 3, step=60)
        self.assertEqual(self.subscribers("bob@b.test"), ["alice@a.test"])
        self.assertNotIn(("bob@b.test", "unknown"), self.presences("alice@a.test"))
        self.settle(self.domain("bob@b.test").publishPresence("bob@b.test", "away"))
        self.assertEqual(self.presences("alice@a.test")[-1], ("bob@b.test", "away"))
        self.assertEqual(len(self.backend("bob@b.test").subscriptionRequests), 1)

    def test_subscriberRestartGetsCurrentPresence(self):
        """
        The subscriber's backend, restarted with its server, is sent the
        publisher's current presence again within RESUME_SPREAD seconds,
        without a change of presence; it hears of no change of the
        subscription's state.
        """
        self.granted()
        self.restart("10.0.0.1")
        self.assertEqual(self.presences("alice@a.test"), [])
        self.network.advance(RESUME_SPREAD + 1)
        self.assertEqual(self.presences("alice@a.test"), [("bob@b.test", "busy")])
        self.assertEqual(self.backend("alice@a.test").notifications[0].status, "at work")
        self.assertEqual(self.backend("alice@a.test").subscriptionChanges, [])

    def test_renewalDoesNotResendPresence(self):
        """
        A RENEW is answered without the current presence; only the
        SUBSCRIBE of a resumed subscription is followed by it.
        """
        self.granted()
        self.network.advance(self.timeout * 2, step=60)
        self.assertEqual(self.presences("alice@a.test"), [("bob@b.test", "busy")])

    def test_resumedRequestsSpread(self):
        """
        The resumed subscriptions are asked for again at random moments
        within RESUME_SPREAD seconds of the start, not all at once.
        """
        self.backend("bob@b.test").decisions["bob@b.test"] = "granted"
        for n in range(20):
            self.settle(self.domain("alice@a.test").subscribe(f"u{n}@a.test", "bob@b.test"))
        self.restart("10.0.0.1")
        now = self.network.clock.seconds()
        times = [call.getTime() - now for call in self.presenceCalls()]
        self.assertEqual(len(times), 20)
        self.assertTrue(all(0 <= t <= RESUME_SPREAD for t in times), times)
        self.assertGreater(len(set(times)), 1)

    def test_subscriberDownPastExpiry(self):
        """
        A subscriber's server down for longer than the subscription's
        lifetime: at start it reports the lapse (presence unknown), then
        subscribes again and is granted with the current presence.
        """
        self.granted()
        self.stop("10.0.0.1")
        self.network.advance(self.timeout + 60, step=60)
        self.assertEqual(self.subscribers("bob@b.test"), [])
        self.start("10.0.0.1", ["a.test"])
        self.network.advance(RESUME_SPREAD + 1)
        self.assertEqual(
            self.presences("alice@a.test"),
            [("bob@b.test", "unknown"), ("bob@b.test", "busy")],
        )
        self.assertEqual(self.subscribers("bob@b.test"), ["alice@a.test"])
        self.assertEqual(
            self.backend("alice@a.test").subscriptionChanges,
            [("alice@a.test", "bob@b.test", "granted")],
        )

    def test_pendingSurvivesSubscriberRestart(self):
        """
        A request still pending when the subscriber's server restarts is
        still wanted after it: the later grant reaches the subscriber.
        """
        self.settle(self.domain("alice@a.test").subscribe("alice@a.test", "bob@b.test"))
        self.restart("10.0.0.1")
        self.network.advance(RESUME_SPREAD + 1)
        self.settle(self.domain("bob@b.test").decide("bob@b.test", "alice@a.test", True))
        self.network.advance(1)
        self.assertEqual(
            self.backend("alice@a.test").subscriptionChanges,
            [("alice@a.test", "bob@b.test", "granted")],
        )
        self.assertEqual(self.presences("alice@a.test"), [("bob@b.test", "offline")])
        self.assertEqual(len(self.backend("bob@b.test").subscriptionRequests), 1)

    def test_unsubscribeStays(self):
        """
        A subscription given up before a restart of both servers stays
        given up: nothing is asked again, nothing is notified, no row is
        left.
        """
        self.granted()
        self.settle(self.domain("alice@a.test").unsubscribe("alice@a.test", "bob@b.test"))
        self.restart("10.0.0.1")
        self.restart("10.0.0.2")
        self.network.advance(self.timeout * 2, step=60)
        self.assertEqual(self.subscribers("bob@b.test"), [])
        sent = self.settle(self.domain("bob@b.test").publishPresence("bob@b.test", "away"))
        self.assertEqual(sent, 0)
        self.assertEqual(self.backend("alice@a.test").notifications, [])
        self.assertEqual(self.backend("bob@b.test").subscriptionRequests, [])
        self.assertEqual(self.rows("10.0.0.1", "wanted"), [])
        self.assertEqual(self.rows("10.0.0.2", "subscribers"), [])

    def test_deniedNotKept(self):
        """
        A denied request leaves no row on either side.
        """
        self.backend("bob@b.test").decisions["bob@b.test"] = "denied"
        self.settle(self.domain("alice@a.test").subscribe("alice@a.test", "bob@b.test"))
        self.assertEqual(self.rows("10.0.0.1", "wanted"), [])
        self.assertEqual(self.rows("10.0.0.2", "subscribers"), [])

    # -- hosted domains, stopping ---------------------------------------------------

    def test_domainsKeptApart(self):
        """
        One database serves several hosted domains: a domain loads its own
        rows only, and the rows of a domain not hosted for a while are
        kept for when it is again.
        """
        self.start("10.0.0.3", ["c.test", "d.test"])
        self.backend("bob@b.test").decisions["bob@b.test"] = "granted"
        self.settle(self.domain("carol@c.test").subscribe("carol@c.test", "bob@b.test"))
        self.restart("10.0.0.3", ["d.test"])
        self.network.advance(RESUME_SPREAD + 1)
        self.assertEqual(self.domain("dave@d.test").presence._wanted, {})
        self.assertEqual(self.presenceCalls(), [])
        self.restart("10.0.0.3", ["c.test", "d.test"])
        self.assertEqual(
            list(self.domain("carol@c.test").presence._wanted), [("carol@c.test", "bob@b.test")]
        )
        self.assertEqual(self.domain("dave@d.test").presence._wanted, {})
        self.network.advance(RESUME_SPREAD + 1)
        self.assertEqual(self.presences("carol@c.test"), [("bob@b.test", "offline")])

    def test_storeKeyedByDomain(self):
        """
        L{SubscriptionStore} reads and writes the rows of its own domain.
        """
        database = Database(self.mktemp(), self.network.clock)
        self.addCleanup(database.close)
        a = SubscriptionStore(database, "a.test")
        b = SubscriptionStore(database, "b.test")
        a.putWanted("alice@a.test", "bob@b.test", "granted", 100.0)
        a.putSubscriber("alice@a.test", "bob@b.test", "pending", 200.0, 0, None)
        a.putPublished("alice@a.test", "online", None, ("alias=Alice",))
        b.putWanted("bob@b.test", "alice@a.test", "requesting", None)
        stored = a.load()
        self.assertEqual(stored.wanted, [("alice@a.test", "bob@b.test", "granted", 100.0)])
        self.assertEqual(
            stored.subscribers, [("alice@a.test", "bob@b.test", "pending", 200.0, 0, None)]
        )
        self.assertEqual(stored.published, [("alice@a.test", "online", None, ("alias=Alice",))])
        self.assertEqual(b.load().wanted, [("bob@b.test", "alice@a.test", "requesting", None)])
        self.assertEqual(b.load().subscribers, [])
        a.removeWanted("alice@a.test", "bob@b.test")
        a.removeSubscriber("alice@a.test", "bob@b.test")
        self.assertEqual(a.load().wanted, [])
        self.assertEqual(a.load().subscribers, [])
        self.assertEqual(len(b.load().wanted), 1)

    def test_stopLeavesNoTimers(self):
        """
        Stopping a domain cancels its renewals and the initial presence
        still to be sent, and nothing is scheduled after it.
        """
        self.granted()
        self.backend("bob@b.test").decisions["bob@b.test"] = "granted"
        presence = self.domain("bob@b.test").presence
        presence.receive(Subscribe(subscriber="carol@c.test", publisher="bob@b.test"))
        self.assertNotEqual(self.presenceCalls(), [])
        self.stop("10.0.0.1")
        self.stop("10.0.0.2")
        self.assertEqual(self.presenceCalls(), [])

    def test_writesGrouped(self):
        """
        The changes of one reactor turn are committed in one transaction.
        """
        database = self.hosts["10.0.0.2"].database
        self.backend("bob@b.test").decisions["bob@b.test"] = "granted"
        presence = self.domain("bob@b.test").presence
        commits = database.commits
        for n in range(10):
            presence.receive(Subscribe(subscriber=f"u{n}@c.test", publisher="bob@b.test"))
        self.network.clock.advance(0)
        self.assertEqual(database.commits, commits + 1)
        self.assertEqual(len(self.rows("10.0.0.2", "subscribers")), 10)
