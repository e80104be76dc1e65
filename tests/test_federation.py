"""
Tests for L{imxd.federation}, L{imxd.pool} and L{imxd.router}: dial-back,
routing, the outbound pool and REDIRECT, on an in-memory network of real
servers (L{tests.network}).
"""

from __future__ import annotations

import attrs
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from imxd.config import LimitsConfig, PolicyConfig
from imxd.peer import PeerFactory, PeerSettings, PeerState, Refused, RemoteError
from imxd.pool import MAX_REDIRECTS, REQUEST_TIMEOUT, Redirection, RedirectTarget
from imxd.wire import (
    HEADER_SIZE,
    MINIMUM_MAX_RECORD,
    Ack,
    encodeRecord,
    DialbackKey,
    DialbackResult,
    DialbackSecret,
    DialbackVerify,
    Delivered,
    Error,
    ErrorCode,
    Redirect,
)
from imxd.federation import FederationProtocol
from imxd.peer import ACK_BATCH
from tests.network import Network, Stranger, message



class MuteProtocol(FederationProtocol):
    """
    A server connection that never answers DIALBACK_VERIFY.
    """

    def _ignore(self, record):
        pass


MuteProtocol.stateTables = {
    **FederationProtocol.stateTables,
    PeerState.OPEN: {
        **FederationProtocol.stateTables[PeerState.OPEN],
        DialbackVerify: MuteProtocol._ignore,
    },
}


def backendOf(server, domain):
    """
    @return: the memory backend of a hosted domain.
    """
    return server.aggregator.domain(domain).backend


def slowBackend(server, domain):
    """
    Make the memory backend of C{domain} on C{server} take messages
    without answering.

    @return: the list of their unfired L{Deferred}s, in order, to answer
        by hand.
    """
    pending = []

    def slow(message):
        pending.append(Deferred())
        return pending[-1]

    backendOf(server, domain).deliverMessage = slow
    return pending


def send(server, record, domain=None):
    """
    Send C{record} from a hosted domain of C{server} (by default the first
    one it hosts) in one try, past the outbox (whose queueing and retries
    are tested in C{test_outbox}).

    @return: the L{Deferred} of the send: the receiver's answer.
    """
    if domain is None:
        domain = record.sender.split("@")[1]
        if server.aggregator.domain(domain) is None:
            domain = min(server.hostedDomains())
    return server.aggregator.domain(domain).route(record)


class FederationTestsMixin:
    """
    Two servers: A hosts a.test at 10.0.0.1, B hosts b.test at 10.0.0.2,
    and C hosts c.test and d.test at 10.0.0.3.
    """

    def setUp(self):
        self.network = Network()
        self.a = self.network.server("10.0.0.1", ["a.test"])
        self.b = self.network.server("10.0.0.2", ["b.test"])
        self.c = self.network.server("10.0.0.3", ["c.test", "d.test"])

    def deliver(self, server, record):
        """
        Send C{record} from C{server}, let the network run, and return what
        the send gave.
        """
        sent = send(server, record)
        self.network.flush()
        return sent

    def stranger(self, server, fromHost="10.6.6.6"):
        """
        Connect a raw IMX peer to C{server} and finish HELLO.
        """
        protocol = Stranger(PeerFactory(self.network.clock, PeerSettings()))
        self.network.connect(server, protocol, fromHost, server.host, 5275)
        self.network.flush()
        self.assertIs(protocol.state, PeerState.OPEN)
        return protocol

    def ask(self, protocol, record):
        """
        Send a request from a stranger and return its answer (record or
        L{RemoteError}).
        """
        return self.network.answer(protocol, record)


class RoutingTests(FederationTestsMixin, SynchronousTestCase):
    """
    Messages flow between domains of different servers and of one server.
    """

    def test_messageAcrossServers(self):
        """
        A message from a.test to b.test is authenticated by dial-back,
        delivered to b.test's backend and acknowledged to the sender.
        """
        record = message("alice@a.test", "bob@b.test")
        sent = self.deliver(self.a, record)
        self.assertIsInstance(self.successResultOf(sent), Ack)
        self.assertEqual(backendOf(self.b, "b.test").messages, [record])
        [inbound] = [c for c in self.b.connections if not c.originator]
        self.assertEqual(inbound.receivablePairs, {("a.test", "b.test")})
        self.assertEqual(self.b.counters["pairs-authenticated"], 1)

    def test_bothDirections(self):
        """
        Each direction opens its own connection and authenticates its pair.
        """
        self.successResultOf(self.deliver(self.a, message("alice@a.test", "bob@b.test")))
        self.successResultOf(self.deliver(self.b, message("bob@b.test", "alice@a.test", "m2")))
        self.assertEqual(len(backendOf(self.a, "a.test").messages), 1)
        self.assertEqual(len(backendOf(self.b, "b.test").messages), 1)

    def test_connectionReused(self):
        """
        Later messages for the same pair reuse the connection without a new
        dial-back.
        """
        for n in range(5):
            self.successResultOf(
                self.deliver(self.a, message("alice@a.test", "bob@b.test", f"m{n}"))
            )
        self.assertEqual(len(self.a.pool.connections("b.test")), 1)
        self.assertEqual(self.b.counters["dialbacks-started"], 1)
        self.assertEqual(len(backendOf(self.b, "b.test").messages), 5)

    def test_severalPairsOneConnection(self):
        """
        Two domains of one server sending to one remote domain share one
        connection; each pair is dial-back-authenticated on it.
        """
        self.successResultOf(self.deliver(self.c, message("carol@c.test", "alice@a.test")))
        self.successResultOf(self.deliver(self.c, message("dave@d.test", "alice@a.test")))
        self.assertEqual(len(self.c.pool.connections("a.test")), 1)
        [inbound] = [c for c in self.a.connections if not c.originator]
        self.assertEqual(
            inbound.receivablePairs, {("c.test", "a.test"), ("d.test", "a.test")}
        )
        self.assertEqual(self.a.counters["dialbacks-started"], 2)

    def test_coHostedInProcess(self):
        """
        Between two domains of one server a message is delivered in process:
        no connection is opened.
        """
        record = message("carol@c.test", "dave@d.test")
        self.successResultOf(self.deliver(self.c, record))
        self.assertEqual(backendOf(self.c, "d.test").messages, [record])
        self.assertEqual(self.c.connections, set())
        self.assertEqual(self.network.pumps, [])

    def test_senderBinding(self):
        """
        A hosted domain may send only as its own addresses, in process too.
        """
        for recipient in ("dave@d.test", "bob@b.test"):
            sent = send(self.c, message("mallory@a.test", recipient))
            self.assertEqual(
                self.failureResultOf(sent, Refused).value.code,
                ErrorCode.SENDER_MISMATCH,
            )
        self.assertEqual(backendOf(self.c, "d.test").messages, [])
        self.assertEqual(self.c.connections, set())

    def test_noService(self):
        """
        A domain whose SRV record says "no service" gets unknown-domain.
        """
        self.network.publish("gone.test", (0, 0, 0, b""))
        sent = self.deliver(self.a, message("alice@a.test", "x@gone.test"))
        self.assertEqual(
            self.failureResultOf(sent, Refused).value.code, ErrorCode.UNKNOWN_DOMAIN
        )

    def test_backendRefusal(self):
        """
        A backend's refusal travels back to the sender as its ERROR.
        """
        backend = backendOf(self.b, "b.test")
        backend.deliverMessage = lambda m: fail(
            Refused(ErrorCode.UNKNOWN_USER, "no such user")
        )
        sent = self.deliver(self.a, message("alice@a.test", "nobody@b.test"))
        failure = self.failureResultOf(sent, RemoteError)
        self.assertEqual(failure.value.code, ErrorCode.UNKNOWN_USER)

    def test_blockedDomain(self):
        """
        A domain that blocks the origin refuses the dial-back with blocked.
        """
        domain = self.b.aggregator.domain("b.test")
        domain.config = attrs.evolve(
            domain.config, policy=PolicyConfig(blockedDomains=("a.test",))
        )
        sent = self.deliver(self.a, message("alice@a.test", "bob@b.test"))
        self.assertEqual(self.failureResultOf(sent, RemoteError).value.code, ErrorCode.BLOCKED)
        self.assertEqual(backendOf(self.b, "b.test").messages, [])


class DiscoveryTests(FederationTestsMixin, SynchronousTestCase):
    """
    The pool tries SRV targets in order.
    """

    def test_failover(self):
        """
        When the first target does not answer the next one is used.
        """
        self.network.publish(
            "b.test", (0, 0, 5275, "imx.10.0.0.99"), (10, 0, 5275, "imx.10.0.0.2")
        )
        record = message("alice@a.test", "bob@b.test")
        self.successResultOf(self.deliver(self.a, record))
        self.assertEqual(backendOf(self.b, "b.test").messages, [record])

    def test_allTargetsDown(self):
        """
        When no target answers the sender gets a temporary failure naming
        each target tried.
        """
        self.network.publish(
            "b.test", (0, 0, 5275, "imx.10.0.0.98"), (10, 0, 5275, "imx.10.0.0.99")
        )
        sent = self.deliver(self.a, message("alice@a.test", "bob@b.test"))
        refusal = self.failureResultOf(sent, Refused).value
        self.assertTrue(refusal.temporary)
        self.assertIn("10.0.0.98", refusal.text)
        self.assertIn("10.0.0.99", refusal.text)


class LifeTests(FederationTestsMixin, SynchronousTestCase):
    """
    Connections close when idle and are reopened on demand.
    """

    def test_idleCloseAndReconnect(self):
        """
        After the idle timeout the connection is closed in order; the next
        message opens a new one and authenticates again.
        """
        self.successResultOf(self.deliver(self.a, message("alice@a.test", "bob@b.test")))
        [first] = self.a.pool.connections("b.test")
        self.network.advance(601, step=60)
        self.assertIs(first.state, PeerState.CLOSED)
        self.assertEqual(self.a.pool.connections("b.test"), [])
        self.successResultOf(
            self.deliver(self.a, message("alice@a.test", "bob@b.test", "m2"))
        )
        [second] = self.a.pool.connections("b.test")
        self.assertIsNot(first, second)
        self.assertEqual(len(backendOf(self.b, "b.test").messages), 2)

    def test_peerLost(self):
        """
        When the peer's connection is lost, the next message reconnects.
        """
        self.successResultOf(self.deliver(self.a, message("alice@a.test", "bob@b.test")))
        [first] = self.a.pool.connections("b.test")
        first.transport.loseConnection()
        self.network.flush()
        self.successResultOf(
            self.deliver(self.a, message("alice@a.test", "bob@b.test", "m2"))
        )
        self.assertEqual(len(backendOf(self.b, "b.test").messages), 2)

    def test_lostWithRequestOutstanding(self):
        """
        A message whose connection is lost before its answer fails as a
        temporary failure (its outcome is unknown).
        """
        self.successResultOf(self.deliver(self.a, message("alice@a.test", "bob@b.test")))
        [first] = self.a.pool.connections("b.test")
        backendOf(self.b, "b.test").deliverMessage = lambda m: Deferred()
        sent = self.deliver(self.a, message("alice@a.test", "bob@b.test", "m2"))
        self.assertNoResult(sent)
        first.transport.abortConnection()
        self.network.flush()
        refusal = self.failureResultOf(sent, Refused).value
        self.assertEqual(refusal.code, ErrorCode.TEMPORARY_FAILURE)

    def test_maxPerPeer(self):
        """
        No more than the configured number of connections is opened to one
        peer: when all are out of use, sending is refused temporarily.
        """
        self.successResultOf(self.deliver(self.a, message("alice@a.test", "bob@b.test")))
        for n in range(2):
            for connection in self.a.pool.connections("b.test"):
                connection.stopUsing()
            sent = self.deliver(self.a, message("alice@a.test", "bob@b.test", f"n{n}"))
            if n == 0:
                self.successResultOf(sent)
        self.assertEqual(
            self.failureResultOf(sent, Refused).value.code, ErrorCode.RESOURCE_LIMIT
        )
        self.assertEqual(len(self.a.pool.connections("b.test")), 2)


class ReceiverRulesTests(FederationTestsMixin, SynchronousTestCase):
    """
    What a receiving server refuses from a peer.
    """

    def test_dataBeforeAuthentication(self):
        """
        Data for a pair not authenticated on the connection is refused with
        not-authenticated and not delivered.
        """
        stranger = self.stranger(self.b)
        answer = self.ask(stranger, message("alice@a.test", "bob@b.test"))
        self.assertEqual(answer.code, ErrorCode.NOT_AUTHENTICATED)
        self.assertEqual(backendOf(self.b, "b.test").messages, [])

    def test_linkDeliveredIgnored(self):
        """
        DELIVERED, a link-only response, answers nothing on a peer
        connection: it is counted as unmatched and the connection stays open.
        """
        stranger = self.stranger(self.b)
        stranger.sendRecord(Delivered(tags=(1, 2)))
        self.network.flush()
        self.assertEqual(self.b.counters["unmatched-responses"], 1)
        self.assertIs(stranger.state, PeerState.OPEN)

    def test_relayRefused(self):
        """
        Data for a domain not hosted here is refused with relay-denied and
        never forwarded.
        """
        stranger = self.stranger(self.b)
        answer = self.ask(stranger, message("alice@a.test", "carol@c.test"))
        self.assertEqual(answer.code, ErrorCode.RELAY_DENIED)
        self.assertEqual(backendOf(self.c, "c.test").messages, [])
        self.assertEqual([c for c in self.b.connections if c.originator], [])

    def test_relayRefusedOnAuthenticatedConnection(self):
        """
        Even on a connection where a pair is authenticated, Data for a
        domain not hosted here is refused.
        """
        self.successResultOf(self.deliver(self.a, message("alice@a.test", "bob@b.test")))
        [connection] = self.a.pool.connections("b.test")
        answer = connection.request(message("alice@a.test", "carol@c.test"))
        self.network.flush()
        self.assertEqual(
            self.failureResultOf(answer, RemoteError).value.code, ErrorCode.RELAY_DENIED
        )
        self.assertEqual(backendOf(self.c, "c.test").messages, [])

    def test_otherPairNotAuthenticated(self):
        """
        A pair authenticated on a connection does not authenticate another
        origin domain on it.
        """
        self.successResultOf(self.deliver(self.a, message("alice@a.test", "bob@b.test")))
        [connection] = self.a.pool.connections("b.test")
        answer = connection.request(message("carol@c.test", "bob@b.test"))
        self.network.flush()
        self.assertEqual(
            self.failureResultOf(answer, RemoteError).value.code,
            ErrorCode.NOT_AUTHENTICATED,
        )

    def test_malformedAddress(self):
        """
        A message whose FROM is not an address is refused as malformed.
        """
        stranger = self.stranger(self.b)
        answer = self.ask(stranger, message("no at sign", "bob@b.test"))
        self.assertEqual(answer.code, ErrorCode.MALFORMED)

    def test_connectionsPerAddress(self):
        """
        Connections from one source address beyond the limit are refused
        with resource-limit, whatever domain they claim.
        """
        self.b.limits = LimitsConfig(maxConnectionsPerAddress=2)
        strangers = [self.stranger(self.b) for _ in range(2)]
        extra = Stranger(PeerFactory(self.network.clock, PeerSettings()))
        self.network.connect(self.b, extra, "10.6.6.6", "10.0.0.2", 5275)
        self.network.flush()
        self.assertIs(extra.state, PeerState.CLOSED)
        [error] = [r for r in extra.received if isinstance(r, Error)]
        self.assertEqual(error.code, ErrorCode.RESOURCE_LIMIT)
        other = self.stranger(self.b, fromHost="10.7.7.7")
        self.assertIs(other.state, PeerState.OPEN)
        self.assertTrue(all(s.state is PeerState.OPEN for s in strangers))


class DialbackTests(FederationTestsMixin, SynchronousTestCase):
    """
    Every dial-back failure path leaves the pair unauthenticated.
    """

    def key(self, fromDomain="a.test", toDomain="b.test", token=b"\x01" * 60):
        return DialbackKey(fromDomain=fromDomain, toDomain=toDomain, token=token)

    def assertUnauthenticated(self, stranger):
        """
        Data from the claimed domain on the stranger's connection is refused
        and nothing reaches the backend.
        """
        answer = self.ask(stranger, message("alice@a.test", "bob@b.test", "spoof"))
        self.assertEqual(answer.code, ErrorCode.NOT_AUTHENTICATED)
        delivered = [m.messageId for m in backendOf(self.b, "b.test").messages]
        self.assertNotIn("spoof", delivered)

    def test_forgedToken(self):
        """
        A stranger claiming a.test with a token a.test never issued: B dials
        a.test, which refuses; the KEY is answered dialback-failed.
        """
        stranger = self.stranger(self.b)
        answer = self.ask(stranger, self.key())
        self.assertEqual(answer.code, ErrorCode.DIALBACK_FAILED)
        self.assertIn("a.test", answer.text)
        self.assertEqual(self.a.counters["verifies-refused"], 1)
        self.assertUnauthenticated(stranger)

    def test_replayedToken(self):
        """
        A genuine token, captured while a.test waits for its dial-back and
        replayed by a stranger on its own connection: the real a.test
        echoes the stranger's secret on its own connection, where it is
        refused (it was coined for the stranger's connection) and burnt.
        The stranger never sees a secret and is never authenticated; the
        genuine dial-back still succeeds.
        """
        pair = ("a.test", "b.test")
        self.successResultOf(self.deliver(self.a, message("alice@a.test", "bob@b.test")))
        [connection] = self.a.pool.connections("b.test")
        [atB] = [c for c in self.b.connections if c.receivablePairs]
        atB.receivablePairs.clear()
        connection._sendablePairs.pop(pair)
        stranger = self.stranger(self.b)
        sent = []
        original = connection.sendRecord
        connection.sendRecord = lambda record, tag=None: (sent.append(record), original(record, tag))
        pending = connection.authenticatePair(pair)
        [captured] = [r for r in sent if isinstance(r, DialbackKey)]
        replay = stranger.request(self.key(token=captured.token))
        self.network.flush()
        self.successResultOf(pending)
        self.assertEqual(
            [r for r in stranger.received if isinstance(r, DialbackSecret)], []
        )
        self.assertEqual(self.b.counters["dialbacks-failed"], 1)
        self.network.advance(16)
        self.failureResultOf(replay, RemoteError)
        self.assertUnauthenticated(stranger)

    def test_tokenForAnotherPair(self):
        """
        A token a.test issued for a.test → c.test does not authenticate
        a.test → b.test.
        """
        token = self.a.tokens.issue("a.test", "c.test", 1, self.network.clock.seconds())
        stranger = self.stranger(self.b)
        answer = self.ask(stranger, self.key(token=token))
        self.assertEqual(answer.code, ErrorCode.DIALBACK_FAILED)
        self.assertIn("not issued", answer.text)
        self.assertUnauthenticated(stranger)

    def test_expiredToken(self):
        """
        A token past its lifetime is refused.
        """
        self.network.clock.advance(1000)
        token = self.a.tokens.issue("a.test", "b.test", 1, 0)
        stranger = self.stranger(self.b)
        answer = self.ask(stranger, self.key(token=token))
        self.assertEqual(answer.code, ErrorCode.DIALBACK_FAILED)
        self.assertIn("expired", answer.text)

    def test_secretOnWrongConnection(self):
        """
        A secret echoed on a connection other than the one it was coined
        for is refused, and burnt: it cannot be used on the right one
        afterwards either.
        """
        stranger = self.stranger(self.b)
        other = self.stranger(self.b)
        pair = ("a.test", "b.test")
        [inbound, _] = sorted(
            (c for c in self.b.connections if not c.originator),
            key=lambda c: c.connectionId != self._serverSide(stranger).connectionId,
        )
        secret = self.b.secrets.coin(inbound.connectionId, pair, self.network.clock.seconds())
        other.sendRecord(DialbackSecret(fromDomain="a.test", toDomain="b.test", secret=secret))
        self.network.flush()
        [error] = [r for r in other.received if isinstance(r, Error)]
        self.assertEqual(error.code, ErrorCode.DIALBACK_FAILED)
        stranger.sendRecord(
            DialbackSecret(fromDomain="a.test", toDomain="b.test", secret=secret)
        )
        self.network.flush()
        self.assertUnauthenticated(stranger)
        self.assertUnauthenticated(other)

    def _serverSide(self, stranger):
        """
        @return: the server's protocol for a stranger's connection.
        """
        port = stranger.transport.getHost().port
        [server] = [
            c for c in self.b.connections if c.transport.getPeer().port == port
        ]
        return server

    def test_expiredSecret(self):
        """
        A secret echoed after its lifetime is refused.
        """
        stranger = self.stranger(self.b)
        inbound = self._serverSide(stranger)
        pair = ("a.test", "b.test")
        secret = self.b.secrets.coin(inbound.connectionId, pair, self.network.clock.seconds())
        self.network.clock.advance(16)
        stranger.sendRecord(DialbackSecret(fromDomain="a.test", toDomain="b.test", secret=secret))
        self.network.flush()
        [error] = [r for r in stranger.received if isinstance(r, Error)]
        self.assertEqual(error.code, ErrorCode.DIALBACK_FAILED)
        self.assertIn("expired", error.text)
        self.assertUnauthenticated(stranger)

    def test_originUnreachable(self):
        """
        When the claimed origin cannot be dialled the KEY fails as a
        temporary dial-back timeout.
        """
        self.network.publish("a.test", (0, 0, 5275, "imx.10.0.0.99"))
        stranger = self.stranger(self.b)
        answer = self.ask(stranger, self.key())
        self.assertEqual(answer.code, ErrorCode.DIALBACK_TIMEOUT)
        self.assertUnauthenticated(stranger)

    def test_originSilent(self):
        """
        When the claimed origin never answers DIALBACK_VERIFY the KEY fails
        with dialback-timeout once the dial-back timeout has passed, and
        the secret is forgotten.
        """
        self.network.server("10.0.0.5", ["silent.test"]).protocol = MuteProtocol
        stranger = self.stranger(self.b)
        answer = stranger.request(self.key(fromDomain="silent.test"))
        self.network.flush()
        self.assertNoResult(answer)
        self.assertEqual(self.b.secrets.pending(), 1)
        self.network.advance(16)
        self.assertEqual(
            self.failureResultOf(answer, RemoteError).value.code,
            ErrorCode.DIALBACK_TIMEOUT,
        )
        self.assertEqual(self.b.secrets.pending(), 0)

    def test_unknownReceivingDomain(self):
        """
        A KEY for a domain not hosted here is refused with unknown-domain.
        """
        stranger = self.stranger(self.b)
        answer = self.ask(stranger, self.key(toDomain="c.test"))
        self.assertEqual(answer.code, ErrorCode.UNKNOWN_DOMAIN)

    def test_claimsHostedDomain(self):
        """
        A KEY claiming a domain hosted by this very server is refused.
        """
        stranger = self.stranger(self.b)
        answer = self.ask(stranger, self.key(fromDomain="b.test"))
        self.assertEqual(answer.code, ErrorCode.DIALBACK_FAILED)

    def test_pendingPerAddress(self):
        """
        Pending dial-backs from one source address are capped, counted
        across its connections, never per claimed domain: another address
        is unaffected.
        """
        self.b.limits = LimitsConfig(maxPendingDialbacksPerAddress=2)
        self.network.server("10.0.0.5", ["silent.test"]).protocol = MuteProtocol
        answers = []
        for fromHost in ("10.6.6.6", "10.6.6.6", "10.6.6.6", "10.7.7.7"):
            stranger = self.stranger(self.b, fromHost)
            answers.append(stranger.request(self.key(fromDomain="silent.test")))
            self.network.flush()
        self.assertEqual(
            self.failureResultOf(answers[2], RemoteError).value.code,
            ErrorCode.RESOURCE_LIMIT,
        )
        for pending in (answers[0], answers[1], answers[3]):
            self.assertNoResult(pending)

    def test_alreadyAuthenticated(self):
        """
        A KEY for a pair already authenticated on the connection is answered
        with DIALBACK_RESULT at once.
        """
        self.successResultOf(self.deliver(self.a, message("alice@a.test", "bob@b.test")))
        [connection] = self.a.pool.connections("b.test")
        answer = connection.request(self.key(token=b"\x00" * 60))
        self.network.flush()
        self.assertIsInstance(self.successResultOf(answer), DialbackResult)

    def test_verifyForConnectionGone(self):
        """
        DIALBACK_VERIFY naming a connection that has closed is refused.
        """
        token = self.a.tokens.issue("a.test", "b.test", 12345, self.network.clock.seconds())
        stranger = self.stranger(self.a)
        answer = self.ask(
            stranger,
            DialbackVerify(
                fromDomain="b.test", toDomain="a.test", token=token, secret=b"s" * 16
            ),
        )
        self.assertEqual(answer.code, ErrorCode.DIALBACK_FAILED)
        self.assertIn("gone", answer.text)


class RedirectTests(FederationTestsMixin, SynchronousTestCase):
    """
    A draining server moves its peers; REDIRECT is followed only within the
    safety rules.
    """

    def setUp(self):
        super().setUp()
        self.b2 = self.network.server("10.0.0.22", ["b.test"])
        self.network.publish("b.test", (0, 0, 5275, "imx.10.0.0.2"))

    def test_drain(self):
        """
        B drains towards B2: A's next messages go to B2 over a new,
        newly authenticated connection; B's old connection closes.
        """
        self.successResultOf(self.deliver(self.a, message("alice@a.test", "bob@b.test")))
        [old] = self.a.pool.connections("b.test")
        self.assertEqual(self.b.drain("10.0.0.22", 5275, "maintenance"), 1)
        self.network.flush()
        self.assertEqual(self.a.counters["redirects-followed"], 1)
        record = message("alice@a.test", "bob@b.test", "m2")
        self.successResultOf(self.deliver(self.a, record))
        self.assertEqual(backendOf(self.b2, "b.test").messages, [record])
        self.assertEqual(len(backendOf(self.b, "b.test").messages), 1)
        self.network.advance(11)
        self.assertIs(old.state, PeerState.CLOSED)
        self.assertEqual(self.b2.counters["pairs-authenticated"], 1)

    def test_drainRefusesNewRequests(self):
        """
        After REDIRECT a draining server answers new requests with
        shutting-down; the pool resends them to the new address.
        """
        self.successResultOf(self.deliver(self.a, message("alice@a.test", "bob@b.test")))
        [old] = self.a.pool.connections("b.test")
        old._handleRedirect = lambda redirect: None
        self.b.drain("10.0.0.22", 5275)
        self.network.flush()
        answer = old.request(message("alice@a.test", "bob@b.test", "m2"))
        self.network.flush()
        self.assertEqual(
            self.failureResultOf(answer, RemoteError).value.code, ErrorCode.SHUTTING_DOWN
        )

    def test_drainRefusesNewConnections(self):
        """
        A draining server refuses new connections with shutting-down.
        """
        self.b.drain("10.0.0.22", 5275)
        extra = Stranger(PeerFactory(self.network.clock, PeerSettings()))
        self.network.connect(self.b, extra, "10.6.6.6", "10.0.0.2", 5275)
        self.network.flush()
        [error] = [r for r in extra.received if isinstance(r, Error)]
        self.assertEqual(error.code, ErrorCode.SHUTTING_DOWN)

    def test_redirectOnAcceptedConnectionIgnored(self):
        """
        A REDIRECT on a connection the peer opened is ignored.
        """
        stranger = self.stranger(self.a)
        stranger.sendRecord(Redirect(host="10.9.9.9", port=1))
        self.network.flush()
        self.assertEqual(self.a.counters["redirects-ignored"], 1)
        self.assertEqual(self.a.pool.redirections, {})

    def test_redirectOnlyForDialledDomains(self):
        """
        A REDIRECT naming a domain the connection was not dialled for does
        not move that domain.
        """
        self.successResultOf(self.deliver(self.a, message("alice@a.test", "bob@b.test")))
        [connection] = self.a.pool.connections("b.test")
        connection._handleRedirect(Redirect(host="10.9.9.9", port=1, domains=("c.test",)))
        self.assertEqual(self.a.pool.redirections, {})

    def test_hopLimit(self):
        """
        After MAX_REDIRECTS redirects in a row discovery is used again.
        """
        self.successResultOf(self.deliver(self.a, message("alice@a.test", "bob@b.test")))
        [connection] = self.a.pool.connections("b.test")
        for n in range(MAX_REDIRECTS):
            self.a.pool.redirect(connection, "10.0.0.22", 5275, ())
            self.assertEqual(self.a.pool.redirections["b.test"].hops, n + 1)
        self.a.pool.redirect(connection, "10.0.0.22", 5275, ())
        self.assertNotIn("b.test", self.a.pool.redirections)

    def test_redirectExpires(self):
        """
        A redirect replaces discovery for at most an hour.
        """
        self.successResultOf(self.deliver(self.a, message("alice@a.test", "bob@b.test")))
        [connection] = self.a.pool.connections("b.test")
        self.a.pool.redirect(connection, "10.0.0.22", 5275, ())
        connection.stopUsing()
        self.network.clock.advance(3601)
        self.network.flush()
        record = message("alice@a.test", "bob@b.test", "m2")
        self.successResultOf(self.deliver(self.a, record))
        self.assertEqual(len(backendOf(self.b, "b.test").messages), 2)
        self.assertEqual(backendOf(self.b2, "b.test").messages, [])


class HardeningTests(FederationTestsMixin, SynchronousTestCase):
    """
    Rules that keep REDIRECT, admission and dial-back from being turned
    against the server.
    """

    def test_verifyNeverFollowsRedirect(self):
        """
        Connection 2 of a dial-back is found by discovery even when a
        REDIRECT moved the domain: an impostor at the redirect address is
        never asked, and the real domain confirms the key.
        """
        impostor = self.network.server("10.0.0.66", ["a.test"], secret=b"other" * 8)
        self.network.publish("a.test", (0, 0, 5275, "imx.10.0.0.1"))
        self.b.pool.redirections["a.test"] = Redirection(
            RedirectTarget("10.0.0.66", 5275), 10**9, 1
        )
        record = message("alice@a.test", "bob@b.test")
        self.successResultOf(self.deliver(self.a, record))
        self.assertEqual(backendOf(self.b, "b.test").messages, [record])
        self.assertEqual(impostor.connections, set())

    def test_redirectedConnectionNotTrusted(self):
        """
        A connection opened to a redirect address does not carry the
        originator's trust: the far side's Data on it is refused until it
        authenticates its own pair.
        """
        b2 = self.network.server("10.0.0.22", ["b.test"])
        self.network.publish("b.test", (0, 0, 5275, "imx.10.0.0.2"))
        self.successResultOf(self.deliver(self.a, message("alice@a.test", "bob@b.test")))
        self.b.drain("10.0.0.22", 5275)
        self.network.flush()
        self.successResultOf(
            self.deliver(self.a, message("alice@a.test", "bob@b.test", "m2"))
        )
        [redirected] = [c for c in self.a.pool.connections("b.test") if c.usable()]
        self.assertFalse(redirected.trusted)
        [far] = [c for c in b2.connections if not c.originator]
        answer = far.request(message("bob@b.test", "alice@a.test", "back"))
        self.network.flush()
        self.assertEqual(
            self.failureResultOf(answer, RemoteError).value.code,
            ErrorCode.NOT_AUTHENTICATED,
        )
        self.assertEqual(backendOf(self.a, "a.test").messages, [])

    def test_keyOnOwnConnectionRefused(self):
        """
        A DIALBACK_KEY arriving on a connection this server opened is
        refused with bad-sequence.
        """
        self.successResultOf(self.deliver(self.a, message("alice@a.test", "bob@b.test")))
        [far] = [c for c in self.b.connections if not c.originator]
        answer = far.request(
            DialbackKey(fromDomain="b.test", toDomain="a.test", token=b"\x01" * 60)
        )
        self.network.flush()
        self.assertEqual(
            self.failureResultOf(answer, RemoteError).value.code,
            ErrorCode.BAD_SEQUENCE,
        )

    def test_refusedTargetFailsOver(self):
        """
        A server that refuses a connection (here: draining) does so before
        HELLO, so the pool tries the next SRV target.
        """
        b2 = self.network.server("10.0.0.22", ["b.test"])
        self.network.publish(
            "b.test", (0, 0, 5275, "imx.10.0.0.2"), (10, 0, 5275, "imx.10.0.0.22")
        )
        self.b.drain("10.0.0.99", 5275)
        record = message("alice@a.test", "bob@b.test")
        self.successResultOf(self.deliver(self.a, record))
        self.assertEqual(backendOf(b2, "b.test").messages, [record])

    def test_longErrorText(self):
        """
        A refusal whose text is longer than an ERROR can carry is cut, so
        the request is still answered.
        """
        backendOf(self.b, "b.test").deliverMessage = lambda m: fail(
            Refused(ErrorCode.UNKNOWN_USER, "x" * 10000)
        )
        sent = self.deliver(self.a, message("alice@a.test", "nobody@b.test"))
        refusal = self.failureResultOf(sent, RemoteError).value
        self.assertEqual(refusal.code, ErrorCode.UNKNOWN_USER)
        self.assertLessEqual(len(refusal.text), 1000)

    def test_noConnectionIdLeak(self):
        """
        Failed connection attempts leave nothing behind: only live
        connections can be named by a dial-back token.
        """
        self.network.publish("x.test", (0, 0, 5275, "imx.10.0.0.98"))
        for n in range(5):
            self.failureResultOf(self.deliver(self.a, message("alice@a.test", f"u{n}@x.test")))
        self.assertEqual(set(self.a._byId.values()), self.a.connections)

    def test_drainRefusesDialback(self):
        """
        After REDIRECT, a DIALBACK_KEY on the old connection is answered
        shutting-down; a connection still in HELLO when the drain begins is
        refused.
        """
        stranger = self.stranger(self.b)
        waiting = Stranger(PeerFactory(self.network.clock, PeerSettings()))
        server = self.network.connect(self.b, waiting, "10.6.6.7", "10.0.0.2", 5275)
        self.b.drain("10.0.0.22", 5275)
        self.network.flush()
        self.assertIs(server.state, PeerState.CLOSED)
        answer = self.ask(stranger, DialbackKey(fromDomain="a.test", toDomain="b.test", token=b"t"))
        self.assertEqual(answer.code, ErrorCode.SHUTTING_DOWN)

    def test_requestTimeout(self):
        """
        A message the peer never answers fails as temporary after the
        request timeout; an answer arriving later is ignored.
        """
        self.successResultOf(self.deliver(self.a, message("alice@a.test", "bob@b.test")))
        late = Deferred()
        backendOf(self.b, "b.test").deliverMessage = lambda m: late
        sent = self.deliver(self.a, message("alice@a.test", "bob@b.test", "m2"))
        self.network.clock.advance(REQUEST_TIMEOUT + 1)
        refusal = self.failureResultOf(sent, Refused).value
        self.assertEqual(refusal.code, ErrorCode.TEMPORARY_FAILURE)
        late.callback(None)
        self.network.flush()
        self.assertEqual(self.a.counters["unmatched-responses"], 1)

    def test_hopLimitKeepsConnection(self):
        """
        A REDIRECT refused by the hop limit leaves the connection in use.
        """
        self.successResultOf(self.deliver(self.a, message("alice@a.test", "bob@b.test")))
        [connection] = self.a.pool.connections("b.test")
        for n in range(MAX_REDIRECTS):
            self.a.pool.redirect(connection, "10.0.0.22", 5275, ())
        connection._handleRedirect(Redirect(host="10.0.0.23", port=5275))
        self.assertTrue(connection.usable())
        self.assertEqual(self.a.counters["redirects-ignored"], 1)

    def test_verificationConnectionClosed(self):
        """
        A connection opened only for a dial-back check is closed once the
        check is done and the dial-back timeout has passed unused.
        """
        self.successResultOf(self.deliver(self.a, message("alice@a.test", "bob@b.test")))
        [check] = [c for c in self.b.connections if c.originator]
        self.network.advance(16)
        self.assertIs(check.state, PeerState.CLOSED)
        self.assertEqual(self.b.counters["verification-closes"], 1)


class AckBatchTests(SynchronousTestCase):
    """
    One ACK never outgrows the smallest record a peer may accept.
    """

    def test_fullBatchFitsTheSmallestRecord(self):
        """
        An ACK of L{ACK_BATCH} tags (the largest tags) encodes within
        MINIMUM_MAX_RECORD.
        """
        ack = Ack(tags=tuple(range(2**32 - ACK_BATCH, 2**32)))
        self.assertLessEqual(len(encodeRecord(ack)) - HEADER_SIZE, MINIMUM_MAX_RECORD)


class BackPressureTests(FederationTestsMixin, SynchronousTestCase):
    """
    A slow backend or a peer that does not read cannot make the server
    hold more and more.
    """

    def test_busyDomainRefusesForNow(self):
        """
        A hosted domain handling max_requests_in_progress records refuses
        more with a temporary resource-limit and RETRY_AFTER; another
        domain on the same server (and connection) is not held up, and the
        domain takes records again once its backend answers.
        """
        c = self.network.server(
            "10.0.0.5", ["e.test", "f.test"], limits=LimitsConfig(maxRequestsInProgress=2)
        )
        pending = slowBackend(c, "e.test")
        sent = [send(self.a, message("alice@a.test", f"u{n}@e.test", f"m{n}")) for n in range(3)]
        self.network.flush()
        refusal = self.failureResultOf(sent[2], RemoteError).value
        self.assertEqual((refusal.code, refusal.retryAfter), (ErrorCode.RESOURCE_LIMIT, 1))
        self.assertEqual(dict(c.status())["count.busy-refusals"], 1)
        other = send(self.a, message("alice@a.test", "u@f.test", "f1"))
        self.network.flush()
        self.assertIsInstance(self.successResultOf(other), Ack)
        pending[0].callback(None)
        self.network.flush()
        self.assertIsInstance(self.successResultOf(sent[0]), Ack)
        again = send(self.a, message("alice@a.test", "u9@e.test", "m9"))
        self.network.flush()
        self.assertNoResult(again)
        self.assertEqual(len(pending), 3)

    def test_busyCountedPerSender(self):
        """
        max_requests_in_progress counts each sending domain apart: one
        sender at its limit does not make the hosted domain refuse another.
        """
        c = self.network.server(
            "10.0.0.5", ["e.test"], limits=LimitsConfig(maxRequestsInProgress=2)
        )
        d = self.network.server("10.0.0.6", ["d.test"])
        pending = slowBackend(c, "e.test")
        fromA = [send(self.a, message("alice@a.test", f"u{n}@e.test", f"a{n}")) for n in range(3)]
        fromD = [send(d, message("dora@d.test", f"u{n}@e.test", f"d{n}")) for n in range(2)]
        self.network.flush()
        self.assertEqual(len(pending), 4)
        self.assertEqual(self.failureResultOf(fromA[2], RemoteError).value.code, ErrorCode.RESOURCE_LIMIT)
        for each in fromA[:2] + fromD:
            self.assertNoResult(each)
        for each in pending:
            each.callback(None)
        self.network.flush()
        for each in fromA[:2] + fromD:
            self.assertIsInstance(self.successResultOf(each), Ack)

    def test_peerThatDoesNotReadIsNotRead(self):
        """
        When the transport's write buffer to a peer fills (it pauses the
        protocol as its producer), reading from that peer pauses until the
        buffer drains.
        """
        protocol = self.b.buildProtocol(IPv4Address("TCP", "10.6.6.6", 4000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertIs(transport.producer, protocol)
        protocol.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        protocol.resumeProducing()
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(dict(self.b.status())["count.reads-paused"], 1)
