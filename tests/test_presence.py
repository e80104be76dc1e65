"""
Tests for L{imxd.presence}: subscriptions, presence fan-out, attributes and
the receiving domain's message checks, across an in-memory federation.
"""

from __future__ import annotations

import attrs
from twisted.trial.unittest import SynchronousTestCase

from imxd.peer import Refused, RemoteError
from imxd.presence import NOTIFY_BATCH, RENEW_AT
from imxd.wire import ErrorCode, Notify, Subscribe
from tests.network import Network, message


def presencesOf(backend, subscriber):
    """
    @return: C{[(publisher, presence)]} a memory backend was told for
        C{subscriber}.
    """
    return [
        (n.publisher, n.presence)
        for n in backend.notifications
        if subscriber in n.subscribers
    ]


class PresenceTestsMixin:
    """
    A (a.test), B (b.test) and C (c.test, d.test) on one in-memory network.
    """

    def setUp(self):
        self.network = Network()
        self.a = self.network.server("10.0.0.1", ["a.test"])
        self.b = self.network.server("10.0.0.2", ["b.test"])
        self.c = self.network.server("10.0.0.3", ["c.test", "d.test"])

    def domain(self, address):
        return self.network.domain(address)

    def backend(self, address):
        return self.domain(address).backend

    def settle(self, deferred):
        """
        Let the network run and return the result of C{deferred}.
        """
        self.network.flush()
        return self.successResultOf(deferred)

    def subscribe(self, subscriber, publisher):
        return self.settle(self.domain(subscriber).subscribe(subscriber, publisher))

    def presences(self, subscriber):
        return presencesOf(self.backend(subscriber), subscriber)


class SubscriptionTests(PresenceTestsMixin, SynchronousTestCase):
    """
    Request, decide, renew and cancel.
    """

    def test_granted(self):
        """
        A subscription the publisher's backend grants at once: the
        subscriber's backend hears "granted" and the current presence, then
        every change.
        """
        self.backend("bob@b.test").decisions["bob@b.test"] = "granted"
        self.assertEqual(self.subscribe("alice@a.test", "bob@b.test"), "granted")
        self.assertEqual(
            self.backend("alice@a.test").subscriptionChanges,
            [("alice@a.test", "bob@b.test", "granted")],
        )
        self.assertEqual(self.presences("alice@a.test"), [("bob@b.test", "offline")])
        self.settle(self.domain("bob@b.test").publishPresence("bob@b.test", "online", "hi"))
        self.assertEqual(
            self.presences("alice@a.test"),
            [("bob@b.test", "offline"), ("bob@b.test", "online")],
        )
        self.assertEqual(self.backend("alice@a.test").notifications[-1].status, "hi")

    def test_pendingThenGranted(self):
        """
        A request the publisher decides later: pending first, then granted
        (with the current presence) through a SUBSCRIPTION_STATE request.
        """
        self.settle(self.domain("bob@b.test").publishPresence("bob@b.test", "busy"))
        self.assertEqual(self.subscribe("alice@a.test", "bob@b.test"), "pending")
        self.assertEqual(
            self.backend("bob@b.test").subscriptionRequests,
            [("alice@a.test", "bob@b.test")],
        )
        self.assertEqual(self.presences("alice@a.test"), [])
        self.settle(self.domain("bob@b.test").decide("bob@b.test", "alice@a.test", True))
        self.assertEqual(
            [c[2] for c in self.backend("alice@a.test").subscriptionChanges],
            ["pending", "granted"],
        )
        self.assertEqual(self.presences("alice@a.test"), [("bob@b.test", "busy")])

    def test_denied(self):
        """
        A denied request is reported to the subscriber's backend, which
        hears nothing of the publisher's presence.
        """
        self.backend("bob@b.test").decisions["bob@b.test"] = "denied"
        self.assertEqual(self.subscribe("alice@a.test", "bob@b.test"), "denied")
        self.settle(self.domain("bob@b.test").publishPresence("bob@b.test", "online"))
        self.assertEqual(self.presences("alice@a.test"), [])
        self.assertEqual(
            self.backend("alice@a.test").subscriptionChanges,
            [("alice@a.test", "bob@b.test", "denied")],
        )

    def test_deniedLater(self):
        """
        A pending request the publisher then denies.
        """
        self.subscribe("alice@a.test", "bob@b.test")
        self.settle(self.domain("bob@b.test").decide("bob@b.test", "alice@a.test", False))
        self.assertEqual(
            [c[2] for c in self.backend("alice@a.test").subscriptionChanges],
            ["pending", "denied"],
        )
        self.assertEqual(self.domain("bob@b.test").presence.subscribers("bob@b.test"), [])

    def test_decideWithoutRequest(self):
        """
        Deciding a request nobody made is refused with not-subscribed.
        """
        decided = self.domain("bob@b.test").decide("bob@b.test", "x@a.test", True)
        self.assertEqual(
            self.failureResultOf(decided, Refused).value.code, ErrorCode.NOT_SUBSCRIBED
        )

    def test_renewed(self):
        """
        The subscriber's server renews before the subscription lapses, for
        as long as the user wants it: presence still arrives long after the
        first lifetime.
        """
        self.backend("bob@b.test").decisions["bob@b.test"] = "granted"
        self.subscribe("alice@a.test", "bob@b.test")
        timeout = self.domain("bob@b.test").config.subscriptionTimeout
        self.network.advance(timeout * 3, step=timeout * RENEW_AT / 2)
        self.assertEqual(
            self.domain("bob@b.test").presence.subscribers("bob@b.test"), ["alice@a.test"]
        )
        self.settle(self.domain("bob@b.test").publishPresence("bob@b.test", "away"))
        self.assertEqual(self.presences("alice@a.test")[-1], ("bob@b.test", "away"))

    def test_lapsesWithoutRenewal(self):
        """
        On the publisher's server a subscription that is not renewed lapses.
        """
        self.backend("bob@b.test").decisions["bob@b.test"] = "granted"
        self.subscribe("alice@a.test", "bob@b.test")
        self.settle(self.domain("alice@a.test").unsubscribe("alice@a.test", "bob@b.test"))
        self.assertEqual(self.domain("bob@b.test").presence.subscribers("bob@b.test"), [])
        self.backend("bob@b.test").decisions["bob@b.test"] = "granted"
        presence = self.domain("bob@b.test").presence
        self.settle(
            presence.receive(
                Subscribe(subscriber="carol@c.test", publisher="bob@b.test", expires=120)
            )
        )
        self.assertEqual(presence.subscribers("bob@b.test"), ["carol@c.test"])
        self.network.clock.advance(121)
        self.assertEqual(presence.subscribers("bob@b.test"), [])

    def test_renewalFailsPresenceUnknown(self):
        """
        When renewals fail until the subscription lapses, the subscriber's
        backend is told the publisher's presence is unknown.
        """
        self.backend("bob@b.test").decisions["bob@b.test"] = "granted"
        self.subscribe("alice@a.test", "bob@b.test")
        self.network.publish("b.test", (0, 0, 5275, "imx.10.0.0.99"))
        self.network.resolver.records.pop("_imx._tcp.b.test")
        for connection in list(self.a.pool.connections("b.test")):
            connection.transport.loseConnection()
        self.network.flush()
        self.network.publish("b.test", (0, 0, 5275, "imx.10.0.0.99"))
        timeout = self.domain("bob@b.test").config.subscriptionTimeout
        self.network.advance(timeout + 60, step=30)
        self.assertEqual(self.presences("alice@a.test")[-1], ("bob@b.test", "unknown"))

    def test_renewUnknownResubscribes(self):
        """
        A RENEW the publisher's server does not know (it restarted) is
        answered not-subscribed, and the subscriber's server subscribes
        again.
        """
        self.backend("bob@b.test").decisions["bob@b.test"] = "granted"
        self.subscribe("alice@a.test", "bob@b.test")
        self.domain("bob@b.test").presence._subscriptions.clear()
        timeout = self.domain("bob@b.test").config.subscriptionTimeout
        self.network.advance(timeout * RENEW_AT + 1, step=60)
        self.assertEqual(
            self.domain("bob@b.test").presence.subscribers("bob@b.test"), ["alice@a.test"]
        )
        self.assertEqual(len(self.backend("bob@b.test").subscriptionRequests), 2)

    def test_notifyForStrangerIgnored(self):
        """
        A NOTIFY naming a user who does not want the publisher's presence is
        acknowledged but not handed to the backend.
        """
        notify = Notify(publisher="bob@b.test", subscribers=("alice@a.test",), presence="online")
        self.settle(self.domain("bob@b.test").route(notify))
        self.assertEqual(self.backend("alice@a.test").notifications, [])


class FanOutTests(PresenceTestsMixin, SynchronousTestCase):
    """
    One presence change, one NOTIFY per subscriber domain.
    """

    def test_onePerDomain(self):
        """
        Three subscribers in c.test, one in d.test (same server) and one in
        a.test: c.test's backend gets one NOTIFY naming all three.
        """
        self.backend("bob@b.test").decisions["bob@b.test"] = "granted"
        subscribers = ["c1@c.test", "c2@c.test", "c3@c.test", "dave@d.test", "alice@a.test"]
        for subscriber in subscribers:
            self.subscribe(subscriber, "bob@b.test")
        for subscriber in subscribers:
            self.backend(subscriber).notifications.clear()
        sent = self.settle(self.domain("bob@b.test").publishPresence("bob@b.test", "online"))
        self.assertEqual(sent, 3)
        [toC] = self.backend("c1@c.test").notifications
        self.assertEqual(toC.subscribers, ("c1@c.test", "c2@c.test", "c3@c.test"))
        self.assertEqual(len(self.backend("dave@d.test").notifications), 1)
        self.assertEqual(len(self.backend("alice@a.test").notifications), 1)

    def test_batches(self):
        """
        More subscribers in one domain than fit one NOTIFY are split into
        batches of NOTIFY_BATCH.
        """
        self.backend("bob@b.test").decisions["bob@b.test"] = "granted"
        count = NOTIFY_BATCH + 3
        for n in range(count):
            self.subscribe(f"u{n:03d}@a.test", "bob@b.test")
        self.backend("u000@a.test").notifications.clear()
        self.assertEqual(
            self.settle(self.domain("bob@b.test").publishPresence("bob@b.test", "away")), 2
        )
        sizes = [len(n.subscribers) for n in self.backend("u000@a.test").notifications]
        self.assertEqual(sorted(sizes), [3, NOTIFY_BATCH])

    def test_coHostedInProcess(self):
        """
        Between two domains of one server, presence travels in process.
        """
        self.backend("carol@c.test").decisions["carol@c.test"] = "granted"
        self.subscribe("dave@d.test", "carol@c.test")
        self.settle(self.domain("carol@c.test").publishPresence("carol@c.test", "busy"))
        self.assertEqual(self.presences("dave@d.test")[-1], ("carol@c.test", "busy"))
        self.assertEqual(self.c.connections, set())


class AttributeTests(PresenceTestsMixin, SynchronousTestCase):
    """
    User and domain attributes across the federation, with presence privacy.
    """

    def test_presencePrivacy(self):
        """
        A granted subscriber sees the user's presence; anyone else sees the
        other attributes only.
        """
        backend = self.backend("bob@b.test")
        backend.attributes["bob@b.test"] = {"alias": "Bob", "presence": "leaked"}
        backend.decisions["bob@b.test"] = "granted"
        self.subscribe("alice@a.test", "bob@b.test")
        self.settle(self.domain("bob@b.test").publishPresence("bob@b.test", "online"))
        seen = self.settle(self.domain("alice@a.test").remoteAttributes("alice@a.test", "bob@b.test"))
        self.assertEqual(seen["alias"], "Bob")
        self.assertEqual(seen["presence"], "online")
        stranger = self.settle(self.domain("carol@c.test").remoteAttributes("carol@c.test", "bob@b.test"))
        self.assertEqual(stranger["alias"], "Bob")
        self.assertNotIn("presence", stranger)
        self.assertIn("max-message-size", stranger)

    def test_cached(self):
        """
        An answer is cached for its TTL: a second request within it sends
        nothing.
        """
        self.settle(self.domain("alice@a.test").remoteAttributes("alice@a.test", "bob@b.test"))
        received = self.b.counters["data-received"]
        self.settle(self.domain("alice@a.test").remoteAttributes("alice@a.test", "bob@b.test"))
        self.assertEqual(self.b.counters["data-received"], received)
        self.network.clock.advance(61)
        self.settle(self.domain("alice@a.test").remoteAttributes("alice@a.test", "bob@b.test"))
        self.assertEqual(self.b.counters["data-received"], received + 1)

    def test_domainAttributes(self):
        """
        A domain's attributes: subscription timeout, maximum message and
        record size, idle timeout, accepted types.
        """
        values = self.settle(self.domain("alice@a.test").remoteAttributes("alice@a.test", "b.test"))
        self.assertEqual(values["subscription-timeout"], "1800")
        self.assertEqual(values["max-message-size"], "32768")
        self.assertEqual(values["accepted-types"], "text/plain,text/html-lite")
        self.assertEqual(values["max-record-size"], "65536")
        self.assertEqual(values["idle-timeout"], "600")
        self.assertEqual(values["rate-limit"], "10000/1")


class MessageCheckTests(PresenceTestsMixin, SynchronousTestCase):
    """
    The receiving domain checks a MESSAGE's declared type and size only.
    """

    def refusalOf(self, record):
        """
        @return: the refusal the sender's backend was told of for
            C{record} (a L{RemoteError}).
        """
        [(sent, refusal)] = [r for r in self.backend(record.sender).reports if r[0] == record]
        self.assertIsInstance(refusal, RemoteError)
        return refusal

    def test_wrongType(self):
        """
        A media type the recipient's domain does not accept is refused with
        media-type-refused.
        """
        record = attrs.evolve(
            message("alice@a.test", "bob@b.test"), contentType="image/png", body=b"\x89PNG"
        )
        self.assertIsNone(self.settle(self.domain("alice@a.test").sendMessage(record)))
        self.assertEqual(self.refusalOf(record).code, ErrorCode.MEDIA_TYPE_REFUSED)
        self.assertEqual(self.backend("bob@b.test").messages, [])

    def test_tooLarge(self):
        """
        A body over the recipient domain's max-message-size is refused with
        message-too-large; one at the limit is accepted.
        """
        limit = self.domain("bob@b.test").config.maxMessageSize
        big = message("alice@a.test", "bob@b.test", "big", body=b"x" * (limit + 1))
        self.settle(self.domain("alice@a.test").sendMessage(big))
        self.assertEqual(self.refusalOf(big).code, ErrorCode.MESSAGE_TOO_LARGE)
        fits = message("alice@a.test", "bob@b.test", "fits", body=b"x" * limit)
        self.settle(self.domain("alice@a.test").sendMessage(fits))
        self.assertEqual(len(self.backend("bob@b.test").messages), 1)

    def test_typeParametersIgnored(self):
        """
        Parameters and case of the declared type do not matter.
        """
        record = attrs.evolve(
            message("alice@a.test", "bob@b.test"),
            contentType="Text/HTML-lite; charset=utf-8",
        )
        self.settle(self.domain("alice@a.test").sendMessage(record))
        self.assertEqual(len(self.backend("bob@b.test").messages), 1)
