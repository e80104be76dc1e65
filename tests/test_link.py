"""
Tests for the backend link: the C{link} adapter (L{imxd.backend.link}) and
its client library (L{imxd.link}), alone, against the backend contract,
and on both sides of an in-memory federation.
"""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from imxd.backend.link import (
    AUTH_TIMEOUT,
    ENVELOPE_ROOM,
    MAX_AUTH_FAILURES,
    MAX_UNAUTHENTICATED_PER_ADDRESS,
    LinkBackend,
    LinkFactory,
    validateOptions,
)
from imxd.link import LinkClient, LinkHandler
from imxd.peer import PeerState, Refused
from imxd.testing import BackendContractMixin, FakeDomainService
from imxd.wire import Ack, Delivered, EncodeError, ErrorCode, LinkAuth, Message
from tests.linking import (
    SECRET,
    CallableEndpoint,
    RecordingHandler,
    joinSynchronously,
    linkedBackend,
    message,
)
from tests.network import Network, linkClient, linkTable


class LinkContractTests(BackendContractMixin, SynchronousTestCase):
    """
    The C{link} adapter, with a link client connected, keeps the contract.
    """

    def makeBackend(self):
        self.handler = RecordingHandler()
        backend, self.client, _ = linkedBackend(self.domainName, Clock(), self.handler)
        return backend

    def test_handedOver(self):
        """
        What the contract hands the adapter reaches the link client's
        handler.
        """
        self.successResultOf(
            self.backend.deliverMessage(message("x@else.test", self.user(), "m-1"))
        )
        self.assertEqual([m.messageId for m in self.handler.messages], ["m-1"])


class OptionsTests(SynchronousTestCase):
    """
    L{validateOptions} checks a link domain's options.
    """

    def test_inlineSecret(self):
        """
        A secret given inline becomes bytes; the listener has a default.
        """
        options = validateOptions({"secret": "s" * 16})
        self.assertEqual(options, {"listen": "tcp:5280:interface=127.0.0.1", "secret": b"s" * 16})

    def test_secretFile(self):
        """
        A secret file is read relative to the configuration, without its
        final newline.
        """
        directory = self.mktemp()
        os.mkdir(directory)
        with open(os.path.join(directory, "link.secret"), "wb") as f:
            f.write(b"x" * 20 + b"\n")
        options = validateOptions({"secret_file": "link.secret", "listen": "tcp:7000"}, directory)
        self.assertEqual(options["secret"], b"x" * 20)
        self.assertEqual(options["listen"], "tcp:7000")

    def test_problems(self):
        """
        Each bad option is named in one line.
        """
        cases = [
            ({}, "secret or as secret_file"),
            ({"secret": "s" * 16, "secret_file": "f"}, "secret or as secret_file"),
            ({"secret": "short"}, "16 to 64 octets, not 5"),
            ({"secret": "s" * 65}, "16 to 64 octets"),
            ({"secret": 7}, "expected text"),
            ({"secret_file": "/nonexistent/imxd-link"}, "cannot read"),
            ({"secret": "s" * 16, "listen": "nonsense:1"}, "listen:"),
            ({"secret": "s" * 16, "colour": "red"}, "unknown option 'colour'"),
        ]
        for options, text in cases:
            with self.assertRaises(ValueError) as caught:
                validateOptions(options)
            self.assertIn(text, str(caught.exception))


class Raw:
    """
    A link client connection driven by hand, to send what a real client
    would not.
    """

    def __init__(self, testCase, backends, factory=None):
        """
        @param factory: the L{LinkFactory} (the listener) to connect to, or
            L{None} for a new one.
        """
        self.clock = Clock() if factory is None else factory.clock
        self.factory = LinkFactory(self.clock, backends) if factory is None else factory
        self.handler = RecordingHandler()
        self.client = LinkClient(self.clock, CallableEndpoint(lambda p: None), {}, self.handler)
        self.protocol = self.client.factory.buildProtocol(None)
        self.server = joinSynchronously(self.factory.buildProtocol(None), self.protocol)

    def ask(self, record):
        outcome = []
        self.protocol.request(record).addBoth(outcome.append)
        return outcome[0]


class ServerSideTests(SynchronousTestCase):
    """
    imxd's side of the link: authentication, routing of the backend's
    requests, and what happens while no link serves a domain.
    """

    def setUp(self):
        self.backend = LinkBackend("a.test", "tcp:5280", SECRET)
        self.service = FakeDomainService("a.test")
        self.backend.start(self.service)
        self.raw = Raw(self, [self.backend])

    def test_wrongSecret(self):
        """
        A wrong secret, or a domain not served on this listener, is refused
        with C{not-authenticated}; the link does not serve the domain.
        """
        for auth in (
            LinkAuth(domain="a.test", secret=b"w" * 16),
            LinkAuth(domain="other.test", secret=SECRET),
        ):
            refusal = self.raw.ask(auth).value
            self.assertEqual(refusal.code, ErrorCode.NOT_AUTHENTICATED)
        self.assertFalse(self.backend.connected())
        self.assertEqual(self.raw.factory.counters["link-auth-failures"], 2)

    def test_authDeadline(self):
        """
        A connection that has not authenticated a domain within
        L{AUTH_TIMEOUT} seconds is refused and closed (imxd's keepalive
        would otherwise hold it open for good); one that has is kept.
        """
        self.raw.clock.advance(AUTH_TIMEOUT - 1)
        self.assertIs(self.raw.server.state, PeerState.OPEN)
        self.raw.clock.advance(1)
        self.assertIs(self.raw.server.state, PeerState.CLOSED)
        self.assertEqual(self.raw.server.closeReason.code, ErrorCode.NOT_AUTHENTICATED)
        self.assertEqual(self.raw.factory.counters["link-auth-timeouts"], 1)
        linked = Raw(self, [self.backend])
        linked.ask(LinkAuth(domain="a.test", secret=SECRET))
        linked.clock.advance(2 * AUTH_TIMEOUT)
        self.assertIs(linked.server.state, PeerState.OPEN)

    def test_unauthenticatedPerAddress(self):
        """
        One address may hold L{MAX_UNAUTHENTICATED_PER_ADDRESS} link
        connections that have not authenticated; one more is refused with
        C{resource-limit} and closed; once one of them authenticates,
        another may connect.
        """
        waiting = [self.raw] + [
            Raw(self, [self.backend], self.raw.factory)
            for _ in range(MAX_UNAUTHENTICATED_PER_ADDRESS - 1)
        ]
        self.assertTrue(all(r.server.state is PeerState.OPEN for r in waiting))
        extra = Raw(self, [self.backend], self.raw.factory)
        self.assertIs(extra.server.state, PeerState.CLOSED)
        self.assertEqual(extra.server.closeReason.code, ErrorCode.RESOURCE_LIMIT)
        self.assertEqual(self.raw.factory.counters["link-connections-refused"], 1)
        waiting[0].ask(LinkAuth(domain="a.test", secret=SECRET))
        another = Raw(self, [self.backend], self.raw.factory)
        self.assertIs(another.server.state, PeerState.OPEN)

    def test_tooManyFailures(self):
        """
        After L{MAX_AUTH_FAILURES} failed attempts the connection is closed.
        """
        for _ in range(MAX_AUTH_FAILURES):
            self.raw.ask(LinkAuth(domain="a.test", secret=b"w" * 16))
        self.assertIs(self.raw.server.state, PeerState.CLOSED)

    def test_requestForOtherDomain(self):
        """
        A request from an address whose domain this connection has not
        authenticated is refused, and nothing reaches imxd.
        """
        self.raw.ask(LinkAuth(domain="a.test", secret=SECRET))
        refusal = self.raw.ask(message("eve@b.test", "bob@c.test", "m-1")).value
        self.assertEqual(refusal.code, ErrorCode.NOT_AUTHENTICATED)
        refusal = self.raw.ask(message("not an address", "bob@c.test", "m-2")).value
        self.assertEqual(refusal.code, ErrorCode.MALFORMED)
        self.assertEqual(self.service.calls, [])

    def test_sendMessage(self):
        """
        A MESSAGE from an authenticated domain goes to the hosted domain
        (C{sendMessageThen}, which ignores its link tag) and is
        acknowledged.
        """
        self.raw.ask(LinkAuth(domain="a.test", secret=SECRET))
        answer = self.raw.ask(message("alice@a.test", "bob@c.test", "m-1"))
        self.assertEqual(type(answer).__name__, "Ack")
        [(method, (sent,))] = self.service.calls
        self.assertEqual((method, sent.messageId), ("sendMessage", "m-1"))

    def test_recordSizeFollowsMessageSize(self):
        """
        The link listener takes records large enough for the largest
        message its domains accept (C{max_message_size}) with its
        envelope; at the default size it refuses what is larger.
        """
        big = LinkBackend("big.test", "tcp:5280", SECRET, maxMessageSize=1_000_000)
        big.start(FakeDomainService("big.test"))
        raw = Raw(self, [big])
        self.assertEqual(raw.protocol.sendLimit, 1_000_000 + ENVELOPE_ROOM)
        raw.ask(LinkAuth(domain="big.test", secret=SECRET))
        body = b"x" * 900_000
        answer = raw.ask(message("alice@big.test", "bob@c.test", "m-1", body=body))
        self.assertEqual(type(answer).__name__, "Ack")
        [(_method, (sent,))] = big.service.calls
        self.assertEqual(sent.body, body)
        self.assertEqual(self.raw.protocol.sendLimit, 32768 + ENVELOPE_ROOM)
        self.assertRaises(
            EncodeError, self.raw.protocol.request, message("alice@a.test", "bob@c.test", "m-2", body=body)
        )

    def test_unlinked(self):
        """
        With no link, what imxd asks of the backend is refused for now, so
        the sender retries; reports and subscription changes are held and
        sent, in order, once a link authenticates.
        """
        failure = self.failureResultOf(
            self.backend.deliverMessage(message("x@c.test", "alice@a.test", "m-1")), Refused
        )
        self.assertEqual(failure.value.code, ErrorCode.TEMPORARY_FAILURE)
        self.assertTrue(failure.value.retryAfter)
        self.backend.deliveryReport(message("alice@a.test", "x@c.test", "m-2"), None)
        self.backend.subscriptionChanged("alice@a.test", "x@c.test", "granted")
        self.assertEqual(len(self.backend.held), 2)
        self.raw.ask(LinkAuth(domain="a.test", secret=SECRET))
        self.assertEqual([r.messageId for r in self.raw.handler.reports], ["m-2"])
        self.assertEqual(self.raw.handler.changes, [("alice@a.test", "x@c.test", "granted")])
        self.assertEqual(len(self.backend.held), 0)

    def test_heldIsBounded(self):
        """
        Beyond C{maxHeld} records the oldest are dropped and counted.
        """
        self.backend.maxHeld = 3
        for index in range(5):
            self.backend.deliveryReport(message("alice@a.test", "x@c.test", f"m-{index}"), None)
        self.assertEqual([r.messageId for _, r in self.backend.held], ["m-2", "m-3", "m-4"])
        self.assertEqual(self.backend.heldDropped, 2)

    def test_unconfirmedSentAgain(self):
        """
        Held records a link took but never confirmed (it died first) are
        sent again, in their order and before newer ones, to the next link.
        """
        from twisted.internet.defer import Deferred

        class Stalling(RecordingHandler):
            def deliveryReport(self, report):
                self.reports.append(report)
                return Deferred()

        stalling = Raw(self, [self.backend])
        stalling.handler.__class__ = Stalling
        stalling.ask(LinkAuth(domain="a.test", secret=SECRET))
        for index in range(3):
            self.backend.deliveryReport(message("alice@a.test", "x@c.test", f"m-{index}"), None)
        self.assertEqual(len(stalling.handler.reports), 3)
        stalling.server.transport.abortConnection()
        self.backend.deliveryReport(message("alice@a.test", "x@c.test", "m-3"), None)
        second = Raw(self, [self.backend])
        second.ask(LinkAuth(domain="a.test", secret=SECRET))
        self.assertEqual(
            [r.messageId for r in second.handler.reports], ["m-0", "m-1", "m-2", "m-3"]
        )

    def test_backendDataRefusedAsUnsupported(self):
        """
        A record a backend never sends (NOTIFY) is refused as unsupported.
        """
        from imxd.wire import Notify

        self.raw.ask(LinkAuth(domain="a.test", secret=SECRET))
        notify = Notify(publisher="alice@a.test", subscribers=("x@c.test",), presence="away")
        self.assertEqual(self.raw.ask(notify).value.code, ErrorCode.UNSUPPORTED)

    def test_newLinkTakesOver(self):
        """
        A second connection authenticating for a domain serves it from then
        on; the first no longer does.
        """
        self.raw.ask(LinkAuth(domain="a.test", secret=SECRET))
        first = self.raw.server
        second = Raw(self, [self.backend])
        second.ask(LinkAuth(domain="a.test", secret=SECRET))
        self.assertIs(self.backend.connection, second.server)
        self.assertNotIn("a.test", first.domains)
        first.transport.abortConnection()
        self.assertTrue(self.backend.connected())
        self.successResultOf(
            self.backend.deliverMessage(message("x@c.test", "alice@a.test", "m-1"))
        )
        self.assertEqual(len(second.handler.messages), 1)
        self.assertEqual(self.raw.handler.messages, [])

    def test_lostBeforeAnswer(self):
        """
        A request the link loses before the backend answers fails for now
        (C{temporary-failure}), not with the connection's error.
        """

        class Silent(LinkHandler):
            def deliverMessage(self, message):
                from twisted.internet.defer import Deferred

                return Deferred()

        backend, client, server = linkedBackend("a.test", Clock(), Silent())
        delivered = backend.deliverMessage(message("x@c.test", "alice@a.test", "m-1"))
        self.assertNoResult(delivered)
        server.transport.abortConnection()
        failure = self.failureResultOf(delivered, Refused)
        self.assertEqual(failure.value.code, ErrorCode.TEMPORARY_FAILURE)

    def test_handlerRefuses(self):
        """
        A handler's refusal travels back with its code; a handler that
        raises anything else is answered C{internal-error}.
        """
        handler = RecordingHandler()
        backend, client, server = linkedBackend("a.test", Clock(), handler)
        handler.refuseWith = Refused(ErrorCode.UNKNOWN_USER, "no such user")
        failure = self.failureResultOf(
            backend.deliverMessage(message("x@c.test", "nobody@a.test", "m-1")), Refused
        )
        self.assertEqual(failure.value.code, ErrorCode.UNKNOWN_USER)
        handler.refuseWith = ZeroDivisionError()
        failure = self.failureResultOf(
            backend.deliverMessage(message("x@c.test", "nobody@a.test", "m-2")), Refused
        )
        self.assertEqual(failure.value.code, ErrorCode.INTERNAL_ERROR)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_deliverMessageThen(self):
        """
        C{deliverMessageThen} is C{deliverMessage} without a Deferred: the
        backend's ACK, its refusal, no link, and a link lost before the
        answer reach the same outcomes.
        """
        told = []

        def deliver(backend, messageId):
            backend.deliverMessageThen(
                message("x@c.test", "alice@a.test", messageId),
                lambda result, name: told.append((name, result)),
                lambda failure, name: told.append((name, failure.value.code)),
                messageId,
            )

        deliver(self.backend, "unlinked")
        handler = RecordingHandler()
        backend, client, server = linkedBackend("a.test", Clock(), handler)
        deliver(backend, "taken")
        self.assertEqual([m.messageId for m in handler.messages], ["taken"])
        handler.refuseWith = Refused(ErrorCode.UNKNOWN_USER, "no such user")
        deliver(backend, "refused")

        class Silent(LinkHandler):
            def deliverMessage(self, message):
                return Deferred()

        silent, client, server = linkedBackend("a.test", Clock(), Silent())
        deliver(silent, "lost")
        server.transport.abortConnection()
        self.assertEqual(
            told,
            [
                ("unlinked", ErrorCode.TEMPORARY_FAILURE),
                ("taken", None),
                ("refused", ErrorCode.UNKNOWN_USER),
                ("lost", ErrorCode.TEMPORARY_FAILURE),
            ],
        )

    def test_badDecision(self):
        """
        A decision that is not granted, denied or pending is not passed on:
        the client answers C{internal-error}.
        """
        handler = RecordingHandler()
        backend, client, server = linkedBackend("a.test", Clock(), handler)
        handler.decision = "maybe"
        failure = self.failureResultOf(
            backend.decideSubscription("x@c.test", "alice@a.test"), Refused
        )
        self.assertEqual(failure.value.code, ErrorCode.INTERNAL_ERROR)


class ClientTests(SynchronousTestCase):
    """
    The link client: authentication, resending after a reconnect, and
    stopping.
    """

    def setUp(self):
        self.network = Network()
        self.server = self.network.server("127.0.0.2", [linkTable("a.test", SECRET)])

    def test_refusedSecretStops(self):
        """
        A refused secret fails L{LinkClient.whenLinked} and stops the client:
        it does not try again.
        """
        client = linkClient(
            self.network, self.server, ["a.test"], RecordingHandler(), {"a.test": b"w" * 16}
        )
        failure = self.failureResultOf(client.whenLinked(), Refused)
        self.assertEqual(failure.value.code, ErrorCode.NOT_AUTHENTICATED)
        self.assertFalse(client.running)
        self.network.advance(60)
        self.assertEqual(client.endpoint.attempts, 1)

    def test_unexpectedAnswerFails(self):
        """
        An answer of the wrong kind (an ACK where SUBSCRIPTION_STATE was
        due) fails the request instead of leaving it waiting forever.
        """
        client = LinkClient(Clock(), "tcp:127.0.0.2:5280", {"a.test": SECRET}, RecordingHandler())
        state = client.subscribe("alice@a.test", "bob@b.test")
        [key] = client.outstanding
        client._answered(Ack(tags=(1,)), key)
        self.failureResultOf(state, AttributeError)
        self.assertEqual(client.outstanding, {})

    def test_reconnectResends(self):
        """
        Requests made while the link is down, or lost with it, are sent
        once the client has reconnected, in order.
        """
        client = linkClient(self.network, self.server, ["a.test"], RecordingHandler(), {"a.test": SECRET})
        self.successResultOf(client.whenLinked())
        client.connection.transport.abortConnection()
        self.network.flush()
        self.assertIsNone(client.connection)
        sent = [
            client.sendMessage(message("alice@a.test", "bob@a.test", f"m-{n}")) for n in range(3)
        ]
        for each in sent:
            self.assertNoResult(each)
        self.network.advance(15)
        for each in sent:
            self.assertIsNone(self.successResultOf(each))
        self.assertEqual(client.outstanding, {})
        self.assertGreater(client.endpoint.attempts, 1)

    def test_status(self):
        """
        C{imxctl status} says whether a link serves each link domain, from
        where, and how many records are held for it.
        """
        status = dict(self.server.status())
        self.assertEqual(status["link.a.test"], "unlinked held=0 dropped=0")
        client = linkClient(self.network, self.server, ["a.test"], RecordingHandler(), {"a.test": SECRET})
        self.successResultOf(client.whenLinked())
        status = dict(self.server.status())
        self.assertRegex(status["link.a.test"], r"^linked from=127\.0\.0\.1:\d+ held=0 dropped=0$")

    def test_secretLength(self):
        """
        The client refuses a secret imxd could never accept, at once.
        """
        with self.assertRaises(ValueError):
            LinkClient(Clock(), CallableEndpoint(lambda p: None), {"a.test": b"short"}, LinkHandler())

    def test_stopFailsOutstanding(self):
        """
        Stopping the client fails what is still unanswered, with
        C{shutting-down}.
        """
        client = linkClient(self.network, self.server, ["a.test"], RecordingHandler(), {"a.test": SECRET})
        client.connection.transport.abortConnection()
        self.network.flush()
        pending = client.sendMessage(message("alice@a.test", "bob@a.test", "m-1"))
        client.stopService()
        failure = self.failureResultOf(pending, Refused)
        self.assertEqual(failure.value.code, ErrorCode.SHUTTING_DOWN)


class FederatedLinkTests(SynchronousTestCase):
    """
    A link client on each side of a federation: a.test on 127.0.0.2, b.test
    on 127.0.0.3, both served by link backends.
    """

    def setUp(self):
        self.network = Network()
        self.a = self.network.server("127.0.0.2", [linkTable("a.test", SECRET)])
        self.b = self.network.server("127.0.0.3", [linkTable("b.test", SECRET)])
        self.alice = RecordingHandler()
        self.bob = RecordingHandler()
        self.clientA = linkClient(self.network, self.a, ["a.test"], self.alice, {"a.test": SECRET})
        self.clientB = linkClient(self.network, self.b, ["b.test"], self.bob, {"b.test": SECRET})

    def send(self, count, prefix="m"):
        sent = [
            self.clientA.sendMessage(message("alice@a.test", "bob@b.test", f"{prefix}-{n}"))
            for n in range(count)
        ]
        self.network.flush()
        return sent

    def test_messageAndReport(self):
        """
        A message from A's backend reaches B's backend byte for byte, and
        A's backend gets the delivery report.
        """
        [sent] = self.send(1)
        self.assertIsNone(self.successResultOf(sent))
        [received] = self.bob.messages
        self.assertEqual((received.sender, received.body), ("alice@a.test", b"hello"))
        [report] = self.alice.reports
        self.assertEqual((report.messageId, report.code), ("m-0", None))

    def test_sendMessageThen(self):
        """
        C{LinkClient.sendMessageThen} is C{sendMessage} without a Deferred:
        an accepted message calls the first function, a refused one the
        second, each with the arguments given.
        """
        told = []
        self.clientA.sendMessageThen(
            message("alice@a.test", "bob@b.test", "fast-1"),
            lambda result, n: told.append((n, result)),
            lambda failure, n: told.append((n, failure.value.code)),
            1,
        )
        self.clientA.sendMessageThen(
            message("mallory@c.test", "bob@b.test", "fast-2"),
            lambda result, n: told.append((n, result)),
            lambda failure, n: told.append((n, failure.value.code)),
            2,
        )
        self.network.flush()
        self.assertEqual(sorted(told), [(1, None), (2, ErrorCode.NOT_AUTHENTICATED)])
        self.assertEqual([m.messageId for m in self.bob.messages], ["fast-1"])

    def test_failureReport(self):
        """
        A message B's backend refuses for good comes back to A's backend as
        a REPORT with the refusal's code.
        """
        self.bob.refuseWith = Refused(ErrorCode.UNKNOWN_USER, "no bob here")
        self.send(1)
        [report] = self.alice.reports
        self.assertEqual((report.code, report.text), (ErrorCode.UNKNOWN_USER, "no bob here"))

    def test_presenceAndAttributes(self):
        """
        A subscription asked through A's link is decided by B's backend;
        B's presence then reaches A's backend, and attributes asked through
        A's link are answered by B's backend.
        """
        state = self.clientA.subscribe("alice@a.test", "bob@b.test")
        self.network.flush()
        self.assertEqual(self.successResultOf(state), "granted")
        self.assertEqual(self.bob.requests, [("alice@a.test", "bob@b.test")])
        self.assertIn(("alice@a.test", "bob@b.test", "granted"), self.alice.changes)
        self.clientB.publishPresence("bob@b.test", "away", "lunch", {"alias": "Bob"})
        self.network.flush()
        notification = self.alice.notifications[-1]
        self.assertEqual(
            (notification.publisher, notification.subscribers, notification.presence),
            ("bob@b.test", ("alice@a.test",), "away"),
        )
        self.bob.attributes["bob@b.test"] = {"alias": "Bob B."}
        values = self.clientA.remoteAttributes("alice@a.test", "bob@b.test")
        self.network.flush()
        self.assertEqual(self.successResultOf(values)["alias"], "Bob B.")

    def test_pendingThenDecided(self):
        """
        A request B's backend leaves pending is decided later through B's
        link, and A's backend hears the outcome.
        """
        self.bob.decision = "pending"
        state = self.clientA.subscribe("alice@a.test", "bob@b.test")
        self.network.flush()
        self.assertEqual(self.successResultOf(state), "pending")
        decided = self.clientB.decide("bob@b.test", "alice@a.test", True)
        self.network.flush()
        self.successResultOf(decided)
        self.assertIn(("alice@a.test", "bob@b.test", "granted"), self.alice.changes)

    def test_receiverLinkDown(self):
        """
        While B's link is down, A's messages are refused for now and stay
        queued on A; once B's backend links again every one arrives, once.
        """
        self.clientB.connection.transport.abortConnection()
        self.network.flush()
        self.clientB.stopService()
        sent = self.send(20)
        for each in sent:
            self.successResultOf(each)
        self.assertEqual(self.bob.messages, [])
        self.assertEqual(self.a.outbox.depth, 20)
        self.clientB = linkClient(self.network, self.b, ["b.test"], self.bob, {"b.test": SECRET})
        self.network.advance(120, step=5)
        self.assertEqual(sorted(m.messageId for m in self.bob.messages), sorted(f"m-{n}" for n in range(20)))
        self.assertEqual(self.a.outbox.depth, 0)
        self.assertEqual(len(self.alice.reports), 20)

    def test_senderLinkDropsBeforeAck(self):
        """
        When A's link drops after imxd took messages but before its ACKs
        reached the client, the client sends them again on the new link
        and B's backend still gets each message once.
        """
        connection = self.clientA.connection
        sent = [
            self.clientA.sendMessage(message("alice@a.test", "bob@b.test", f"m-{n}"))
            for n in range(10)
        ]
        # imxd reads the requests; the connection dies before its ACKs move.
        pump = next(p for p in self.network.pumps if p.clientIO is connection.transport)
        pump.pump()
        self.network.clock.advance(0)
        self.assertTrue(pump.serverIO.getOutBuffer(), "imxd wrote no ACK")
        connection.transport.abortConnection()
        self.network.advance(30)
        for each in sent:
            self.assertIsNone(self.successResultOf(each))
        self.assertEqual(sorted(m.messageId for m in self.bob.messages), sorted(f"m-{n}" for n in range(10)))
        # Each was accepted twice; B dropped the second copies.
        self.assertEqual(self.b.router.duplicates, 10)
        self.assertEqual(len(self.alice.reports), 20)


class OrderedHandler(RecordingHandler):
    """
    Notes, with each report, whether the message's acceptance had already
    been heard (C{accepted} holds the MESSAGE_IDs accepted so far).
    """

    def __init__(self):
        super().__init__()
        self.accepted = []
        self.acceptedFirst = []

    def deliveryReport(self, report):
        self.acceptedFirst.append(report.messageId in self.accepted)
        return super().deliveryReport(report)


class OutcomeAnswerTests(SynchronousTestCase):
    """
    C{report-answer}: when a message's outcome comes before imxd has written
    or accepted it (C{write_behind}), a client that announces the capability
    gets its MESSAGE answered with the outcome, DELIVERED or a REPORT
    response, instead of an ACK and a REPORT request (protocol.md, section
    19.3).
    """

    def setUp(self):
        self.network = Network()
        self.a = self.network.server("127.0.0.2", [linkTable("a.test", SECRET)], writeBehind=1.0)
        self.b = self.network.server("127.0.0.3", [linkTable("b.test", SECRET)])
        self.bob = RecordingHandler()
        linkClient(self.network, self.b, ["b.test"], self.bob, {"b.test": SECRET})

    def clientA(self, **options):
        self.alice = OrderedHandler()
        return linkClient(self.network, self.a, ["a.test"], self.alice, {"a.test": SECRET}, **options)

    def send(self, client, messageId):
        sent = client.sendMessage(message("alice@a.test", "bob@b.test", messageId))
        sent.addCallback(lambda _: self.alice.accepted.append(messageId))
        self.network.flush()
        return sent

    def backendOfA(self):
        return self.a.aggregator.domain("a.test").backend

    def test_deliveredAnswers(self):
        """
        Messages delivered before A's commit are answered together with one
        DELIVERED: nothing is written, no REPORT request is made (the link
        backend holds and numbers none), and the client hears "accepted"
        before each report, which it makes from the message it sent.
        """
        client = self.clientA()
        writes = self.a.database.writes
        link = self.backendOfA().connection
        written = []
        sendRecord = link.sendRecord
        link.sendRecord = lambda record, tag=None: written.append(record) or sendRecord(record, tag)
        sent = []
        for n in range(3):
            sent.append(client.sendMessage(message("alice@a.test", "bob@b.test", f"m-{n}")))
            sent[-1].addCallback(lambda _, n=n: self.alice.accepted.append(f"m-{n}"))
        self.network.flush()
        for each in sent:
            self.assertIsNone(self.successResultOf(each))
        self.assertEqual([m.messageId for m in self.bob.messages], ["m-0", "m-1", "m-2"])
        self.assertEqual(
            [(r.sender, r.recipient, r.messageId, r.code, r.tag, r.response) for r in self.alice.reports],
            [("alice@a.test", "bob@b.test", f"m-{n}", None, 0, False) for n in range(3)],
        )
        self.assertEqual(self.alice.acceptedFirst, [True] * 3)
        [answer] = written
        self.assertEqual((type(answer), len(answer.tags)), (Delivered, 3))
        status = dict(self.a.status())
        self.assertEqual(status["queue-outcome-answers"], "3")
        self.assertEqual(self.backendOfA()._serial, 0)
        self.assertEqual(self.a.database.writes, writes)
        self.assertEqual(client.outstanding, {})
        # No ACK besides the answer: nothing came that no request awaited.
        self.assertEqual(client.factory.counters["unmatched-responses"], 0)

    def test_failureAnswers(self):
        """
        A message refused for good before A's commit is answered with a
        REPORT carrying the refusal's code and text.
        """
        self.bob.refuseWith = Refused(ErrorCode.UNKNOWN_USER, "no bob here")
        client = self.clientA()
        self.assertIsNone(self.successResultOf(self.send(client, "m-1")))
        [report] = self.alice.reports
        self.assertEqual(
            (report.code, report.text, report.response), (ErrorCode.UNKNOWN_USER, "no bob here", True)
        )
        self.assertEqual(self.alice.acceptedFirst, [True])
        self.assertEqual(dict(self.a.status())["queue-outcome-answers"], "1")

    def test_clientWithoutCapability(self):
        """
        A client made with C{reportAnswers=False} does not announce
        C{report-answer}: it gets the ACK, then the REPORT as a request of
        its own, which it answers once its handler has taken it.
        """
        client = self.clientA(reportAnswers=False)
        self.assertIsNone(self.successResultOf(self.send(client, "m-1")))
        [report] = self.alice.reports
        self.assertEqual((report.messageId, report.response), ("m-1", False))
        self.assertEqual(self.alice.acceptedFirst, [True])
        self.assertEqual(dict(self.a.status())["queue-outcome-answers"], "0")
        self.assertEqual(self.backendOfA()._serial, 1)

    def test_acceptedFirst(self):
        """
        A message whose outcome comes after its commit is accepted at the
        commit, and its outcome comes later as a REPORT request.
        """
        client = self.clientA()
        # B's backend refuses for now: A retries after its commit.
        self.bob.refuseWith = Refused(ErrorCode.TEMPORARY_FAILURE, "busy")
        sent = self.send(client, "m-1")
        self.network.advance(1.5, step=0.5)
        self.assertIsNone(self.successResultOf(sent))
        self.assertEqual(self.alice.reports, [])
        self.bob.refuseWith = None
        self.network.advance(60, step=1)
        [report] = self.alice.reports
        self.assertEqual((report.messageId, report.code), ("m-1", None))
        self.assertEqual(dict(self.a.status())["queue-outcome-answers"], "0")

    def test_declinedWhenDomainMoved(self):
        """
        When the connection that sent the message no longer serves its
        domain (another link took it over), the outcome is not answered on
        it: the ACK goes there and the REPORT to the new link.
        """
        client = self.clientA()
        other = OrderedHandler()
        gate = Deferred()
        # B's backend answers once the second link has taken a.test over.
        self.bob.deliverMessage = lambda message: gate
        sent = self.send(client, "m-1")
        self.assertNoResult(sent)
        linkClient(self.network, self.a, ["a.test"], other, {"a.test": SECRET})
        gate.callback(None)
        self.network.flush()
        self.assertIsNone(self.successResultOf(sent))
        self.assertEqual(self.alice.reports, [])
        [report] = other.reports
        self.assertEqual((report.messageId, report.response), ("m-1", False))
        self.assertEqual(dict(self.a.status())["queue-outcome-answers"], "0")

    def test_declinedWhileClosing(self):
        """
        A connection that imxd is closing answers nothing more: the outcome
        that comes meanwhile is reported as a REPORT request, held for the
        next link.
        """
        client = self.clientA()
        gate = Deferred()
        self.bob.deliverMessage = lambda message: gate
        self.send(client, "m-1")
        link = self.backendOfA().connection
        link.close("going away")
        self.assertEqual(link.state, PeerState.CLOSING)
        gate.callback(None)
        self.network.flush()
        self.assertEqual(self.a.outbox.counters["delivered"], 1)
        self.assertEqual(self.alice.reports, [])
        self.assertEqual(dict(self.a.status())["queue-outcome-answers"], "0")
        self.assertEqual(len(self.backendOfA().held) + len(self.backendOfA()._unconfirmed), 1)

    def test_lostAnswersCounted(self):
        """
        DELIVERED answers still gathered when the link is lost are counted
        and logged; their MESSAGEs, unanswered, are sent again by the
        client on its next link, and B takes the copy as the message it
        already delivered.
        """
        client = self.clientA()
        gate = Deferred()
        self.bob.deliverMessage = lambda message: gate
        sent = self.send(client, "m-1")
        link = self.backendOfA().connection
        # As if the link were reading: the answer is gathered, not written.
        link._reading = True
        gate.callback(None)
        self.network.flush()
        self.assertEqual(len(link._delivered), 1)
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        link.transport.abortConnection()
        self.network.flush()
        self.assertEqual(link.factory.counters["delivered-answers-lost"], 1)
        [logged] = [e for e in events if "DELIVERED answers" in e.get("log_format", "")]
        self.assertEqual(logged["count"], 1)
        self.assertNoResult(sent)
        self.network.advance(5, step=0.5)
        self.assertIsNone(self.successResultOf(sent))
        [report] = self.alice.reports
        self.assertEqual((report.messageId, report.code), ("m-1", None))
        self.assertEqual(self.b.router.duplicates, 1)

    def test_deliveredWhileClientCloses(self):
        """
        A DELIVERED that reaches the client after it began to close still
        completes the MESSAGEs it answers.
        """
        client = self.clientA()
        gate = Deferred()
        self.bob.deliverMessage = lambda message: gate
        sent = self.send(client, "m-1")
        connection = client.connection
        [tag] = [t for t, (_w, _at, r) in connection._pending.items() if type(r) is Message]
        connection.state = PeerState.CLOSING
        connection._dispatch(Delivered(tags=(tag,)))
        self.assertIsNone(self.successResultOf(sent))
        [report] = self.alice.reports
        self.assertEqual(report.messageId, "m-1")

    def test_handlerFailureLogged(self):
        """
        A handler that fails to take a report given as an answer is logged;
        the message stays accepted.
        """
        client = self.clientA()

        def broken(report):
            raise RuntimeError("no room for reports")

        self.alice.deliveryReport = broken
        self.assertIsNone(self.successResultOf(self.send(client, "m-1")))
        [logged] = self.flushLoggedErrors(RuntimeError)
        self.assertEqual(str(logged.value), "no room for reports")
