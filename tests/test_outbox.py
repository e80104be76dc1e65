"""
Tests for L{imxd.outbox}, L{imxd.store} and the dedupe of L{imxd.router}:
durable acceptance, delivery reports, per-destination backoff with jitter
and a probe of one, per-message delays, giving up, restarts, the queue's
ceiling, status lines and C{retryNow}, and at-most-once delivery at the
receiver.

Most run on the in-memory network of real servers (L{tests.network}),
built here by L{makeServer} so that each can have its own
L{imxd.config.QueueConfig}, database, connector and jitter; the rest drive
an L{Outbox} directly with a fake C{transmit}.
"""

from __future__ import annotations

import itertools
import json
import os

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from imxd.config import QueueConfig
from imxd.outbox import SWEEP_INTERVAL, Outbox
from imxd.peer import Refused, RemoteError
from imxd.router import PRUNE_INTERVAL
from imxd.store import Database, OutboundStore
from imxd.wire import Ack, Error, ErrorCode
from tests.network import Network, message

A = "10.0.0.1"
B = "10.0.0.2"
C = "10.0.0.3"


def makeServer(network, host, domains, **options):
    """
    Start an imxd server on C{network} (L{Network.server}), with a chosen
    queue configuration, database, connector or jitter source.

    @return: its L{Federation}.
    """
    return network.server(host, domains, **options)


class CountingConnector:
    """
    Wraps a network connector and records the clock time of every
    connection attempt.
    """

    def __init__(self, network, fromHost):
        self.clock = network.clock
        self.attempts = []
        self._connect = network.connector(fromHost)

    def __call__(self, host, port, protocol):
        self.attempts.append(self.clock.seconds())
        return self._connect(host, port, protocol)


def backendOf(server, domain):
    return server.aggregator.domain(domain).backend


def statusOf(server):
    """
    @return: the server's status lines as a dict.
    """
    return dict(server.status())


def rows(server):
    """
    @return: the sequence numbers of the messages in the server's durable
        queue (committed rows only).
    """
    return [seq for (seq,) in server.database.read("SELECT seq FROM outbound ORDER BY seq")]


def queueLine(line):
    """
    @return: the C{name=value} fields of a C{queue.<domain>} status line
        as a dict (C{last-error}, which has spaces, runs to the end).
    """
    fields = {}
    rest = line
    while rest:
        if rest.startswith("last-error="):
            fields["last-error"] = rest[len("last-error="):]
            break
        part, _, rest = rest.partition(" ")
        name, _, value = part.partition("=")
        fields[name] = value
    return fields


def ids(records):
    return [r.messageId for r in records]


def reportIds(backend):
    """
    @return: C{(messageId, refusal code or None)} for each delivery report.
    """
    return [(m.messageId, None if r is None else r.code) for m, r in backend.reports]


class NetworkMixin:
    """
    A sender A (a.test at 10.0.0.1) whose connections are counted; the
    receiver B (b.test at 10.0.0.2) is published but only started by
    L{startB}.
    """

    queue = QueueConfig(retryInitial=10.0, retryMax=80.0)

    def setUp(self):
        self.network = Network()
        self.clock = self.network.clock
        self.jitter = 0.0
        self.connector = CountingConnector(self.network, A)
        self.a = makeServer(
            self.network,
            A,
            ["a.test"],
            queue=self.queue,
            randomness=lambda: self.jitter,
            connect=self.connector,
        )
        self.network.publish("b.test", (0, 0, 5275, f"imx.{B}"))
        self.b = None

    def startB(self, **kwargs):
        self.b = makeServer(self.network, B, ["b.test"], **kwargs)
        return self.b

    def send(self, record, server=None, flush=True):
        """
        Give C{record} to its sender's domain (C{sendMessage}).
        """
        server = server or self.a
        domain = server.aggregator.domain(record.sender.split("@")[1])
        sent = domain.sendMessage(record)
        if flush:
            self.network.flush()
        return sent

    def queueOf(self, remote="b.test", server=None):
        return (server or self.a).outbox.queues.get(remote)

    def advanceTo(self, when):
        """
        Move the clock to C{when} exactly (running what falls due), then
        let the network settle.
        """
        self.clock.advance(when - self.clock.seconds())
        self.network.flush()


class AcceptanceTests(NetworkMixin, SynchronousTestCase):
    """
    A message is accepted only once it is durable.
    """

    def test_acceptedOnceCommitted(self):
        """
        A message is sent at once, but C{sendMessage}'s Deferred has no
        result until the grouped commit (the clock's 0-delay call) has run
        (with no answer from the receiver meanwhile); then the message is a
        row of the database.
        """
        record = message("alice@a.test", "bob@b.test", "m1")
        sent = self.send(record, flush=False)
        self.assertNoResult(sent)
        self.assertEqual(rows(self.a), [])
        self.assertEqual(self.connector.attempts, [0.0])
        self.clock.advance(0)
        self.assertIsNone(self.successResultOf(sent))
        self.assertEqual(len(rows(self.a)), 1)
        [stored] = self.a.outbox.store.load()
        self.assertEqual(stored.record, record)
        self.assertEqual((stored.origin, stored.remote), ("a.test", "b.test"))

    def test_deliveredBeforeCommitNeverWritten(self):
        """
        With C{write_behind}, a message the receiver acknowledges before
        the sender's commit is put together is accepted, reported and never
        written: the sender's database commits nothing for it.
        """
        self.startB()
        c = makeServer(self.network, C, ["c.test"], writeBehind=0.005)
        first = message("carol@c.test", "bob@b.test", "m1")
        accepted = c.aggregator.domain("c.test").sendMessage(first)
        self.network.advance(1, step=0.1)
        self.successResultOf(accepted)
        before = c.database.writes
        record = message("carol@c.test", "bob@b.test", "m2")
        sent = c.aggregator.domain("c.test").sendMessage(record)
        self.network.flush()
        self.assertIsNone(self.successResultOf(sent))
        self.assertEqual(backendOf(self.b, "b.test").messages, [first, record])
        self.assertEqual(backendOf(c, "c.test").reports, [(first, None), (record, None)])
        self.assertEqual(c.database.writes, before)
        self.assertEqual(dict(c.status())["queue-never-written"], "1")
        self.assertEqual(rows(c), [])

    def test_outcomeOffered(self):
        """
        A sender that offers C{onOutcome} is given the outcome of a message
        delivered before the commit instead of C{onAccepted} and the delivery
        report, if it takes it (returns true); one that declines or fails
        (logged) is accepted and reported as usual.
        """
        self.startB()
        c = makeServer(self.network, C, ["c.test"], writeBehind=1.0)
        domain = c.aggregator.domain("c.test")
        told = []

        def offer(answer):
            def onOutcome(origin, record, refusal, n):
                told.append(("outcome", n, origin, record.messageId, refusal))
                if answer is None:
                    raise RuntimeError("broken")
                return answer

            return onOutcome

        sent = [message("carol@c.test", "bob@b.test", f"m{n}") for n in range(3)]
        for n, answer in enumerate([True, False, None]):
            domain.sendMessageThen(
                sent[n],
                lambda result, n: told.append(("accepted", n, result)),
                lambda failure, n: told.append(("failed", n)),
                n,
                onOutcome=offer(answer),
            )
        self.network.flush()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(
            told,
            [
                ("outcome", 0, "c.test", "m0", None),
                ("outcome", 1, "c.test", "m1", None),
                ("accepted", 1, None),
                ("outcome", 2, "c.test", "m2", None),
                ("accepted", 2, None),
            ],
        )
        self.assertEqual(backendOf(c, "c.test").reports, [(sent[1], None), (sent[2], None)])
        self.assertEqual(dict(c.status())["queue-outcome-answers"], "1")
        self.assertEqual(dict(c.status())["queue-never-written"], "3")

    def test_commitFails(self):
        """
        When the commit fails, the send fails with a temporary refusal and
        the message is not in the database; the copy already under way is
        still delivered, without a report, and the copy the sender sends
        again is acknowledged and reported but not delivered twice.
        """
        self.a.database._db.execute("PRAGMA query_only = ON")
        record = message("alice@a.test", "bob@b.test", "m1")
        sent = self.send(record)
        refusal = self.failureResultOf(sent, Refused).value
        self.assertTrue(refusal.temporary)
        self.assertEqual(refusal.code, ErrorCode.TEMPORARY_FAILURE)
        self.a.database._db.execute("PRAGMA query_only = OFF")
        self.assertEqual(rows(self.a), [])
        self.startB()
        self.network.advance(200, step=10)
        self.assertEqual(backendOf(self.b, "b.test").messages, [record])
        self.assertEqual(backendOf(self.a, "a.test").reports, [])
        self.assertEqual(self.a.outbox.depth, 0)
        self.assertIsNone(self.successResultOf(self.send(record)))
        self.network.flush()
        self.assertEqual(backendOf(self.b, "b.test").messages, [record])
        self.assertEqual(backendOf(self.a, "a.test").reports, [(record, None)])
        self.flushLoggedErrors()

    def test_commitFailsOnClosedDatabase(self):
        """
        A message given after the database was closed (a backend sending
        while imxd shuts down) fails with a temporary refusal instead of
        waiting for ever.
        """
        self.a.database.close()
        sent = self.send(message("alice@a.test", "bob@b.test", "m1"))
        refusal = self.failureResultOf(sent, Refused).value
        self.assertTrue(refusal.temporary)
        self.assertEqual(backendOf(self.a, "a.test").reports, [])
        self.flushLoggedErrors()


class ReportTests(NetworkMixin, SynchronousTestCase):
    """
    Delivered and refused messages leave the queue with one report.
    """

    queue = QueueConfig(retryInitial=10.0, retryMax=80.0, giveUpAfter=100.0)

    def test_delivered(self):
        """
        A delivered message is removed from the database and reported
        delivered (refusal L{None}) exactly once.
        """
        self.startB()
        record = message("alice@a.test", "bob@b.test", "m1")
        self.assertIsNone(self.successResultOf(self.send(record)))
        self.assertEqual(backendOf(self.b, "b.test").messages, [record])
        self.assertEqual(backendOf(self.a, "a.test").reports, [(record, None)])
        self.assertEqual(rows(self.a), [])
        self.assertEqual(self.a.outbox.depth, 0)
        self.assertEqual(self.a.outbox.queues, {})
        # Past the sweep and the give-up age: nothing more.
        self.network.advance(3 * SWEEP_INTERVAL, step=30)
        self.assertEqual(backendOf(self.a, "a.test").reports, [(record, None)])
        self.assertEqual(backendOf(self.b, "b.test").messages, [record])

    def test_reportNotTaken(self):
        """
        A backend that raises on a delivery report, or fails the Deferred
        it returns, has the failure logged; the message still leaves the
        queue, and the next report is given as usual.
        """
        self.startB()
        backend = backendOf(self.a, "a.test")
        taken = backend.deliveryReport
        answers = [lambda: fail(KeyError("gone")), lambda: 1 / 0]

        def deliveryReport(record, refusal):
            if answers:
                return answers.pop()()
            return taken(record, refusal)

        backend.deliveryReport = deliveryReport
        for n in range(3):
            self.successResultOf(self.send(message("alice@a.test", "bob@b.test", f"m{n}")))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)
        self.assertEqual([r.messageId for r, _ in backend.reports], ["m2"])
        self.assertEqual(rows(self.a), [])

    def test_refusedPermanently(self):
        """
        A permanent refusal by the receiver is reported with its code and
        the message is removed, never tried again.
        """
        self.startB()
        calls = []

        def refuse(m):
            calls.append(m)
            return fail(Refused(ErrorCode.UNKNOWN_USER, "no such user"))

        backendOf(self.b, "b.test").deliverMessage = refuse
        record = message("alice@a.test", "nobody@b.test", "m1")
        self.successResultOf(self.send(record))
        [(reported, refusal)] = backendOf(self.a, "a.test").reports
        self.assertEqual(reported, record)
        self.assertEqual(refusal.code, ErrorCode.UNKNOWN_USER)
        self.assertFalse(refusal.temporary)
        self.assertEqual(rows(self.a), [])
        self.assertEqual(self.a.outbox.depth, 0)
        self.network.advance(3 * SWEEP_INTERVAL, step=30)
        self.assertEqual(len(calls), 1)
        self.assertEqual(len(backendOf(self.a, "a.test").reports), 1)

    def test_queueFull(self):
        """
        With C{max_queued} messages held, the next is refused at once with
        a temporary C{resource-limit}, and not stored; once one leaves the
        queue there is room again.
        """
        self.a.outbox.settings = QueueConfig(maxQueued=3, retryInitial=10.0)
        for n in range(3):
            self.successResultOf(self.send(message("alice@a.test", "bob@b.test", f"m{n}")))
        sent = self.send(message("alice@a.test", "bob@b.test", "m3"), flush=False)
        refusal = self.failureResultOf(sent, Refused).value
        self.assertEqual(refusal.code, ErrorCode.RESOURCE_LIMIT)
        self.assertTrue(refusal.temporary)
        self.network.flush()
        self.assertEqual(len(rows(self.a)), 3)
        self.assertEqual(self.a.outbox.depth, 3)
        self.assertEqual(statusOf(self.a)["queue-depth"], "3")

        self.startB()
        self.a.outbox.retryNow()
        self.network.flush()
        self.assertEqual(ids(backendOf(self.b, "b.test").messages), ["m0", "m1", "m2"])
        self.successResultOf(self.send(message("alice@a.test", "bob@b.test", "m4")))
        self.assertEqual(ids(backendOf(self.b, "b.test").messages), ["m0", "m1", "m2", "m4"])

    def test_queueFullCountsUncommitted(self):
        """
        Messages accepted but not yet committed count towards C{max_queued}.
        """
        self.a.outbox.settings = QueueConfig(maxQueued=2)
        first = self.send(message("alice@a.test", "bob@b.test", "m0"), flush=False)
        second = self.send(message("alice@a.test", "bob@b.test", "m1"), flush=False)
        third = self.send(message("alice@a.test", "bob@b.test", "m2"), flush=False)
        self.assertEqual(self.failureResultOf(third, Refused).value.code, ErrorCode.RESOURCE_LIMIT)
        self.network.flush()
        self.successResultOf(first)
        self.successResultOf(second)


class BackoffTests(NetworkMixin, SynchronousTestCase):
    """
    A destination that cannot be reached: the queue backs off as a whole.
    """

    def test_downThenUp(self):
        """
        While B is down messages stay queued and nothing is reported; 100
        messages sent during the backoff make no connection attempt; the
        delays grow exponentially with jitter in [0.5, 1) of the base and
        are capped at C{retry_max}; after a delay one message probes; when
        B is back everything is delivered in order and reported delivered.
        """
        jitters = iter([0.0, 0.5, 0.9, 0.25, 0.999999, 0.0])
        self.a.outbox.random = lambda: next(jitters)
        first = message("alice@a.test", "bob@b.test", "m000")
        self.successResultOf(self.send(first))
        self.assertEqual(self.connector.attempts, [0.0])
        queue = self.queueOf()
        self.assertEqual(queue.failures, 1)
        self.assertEqual(queue.retryAt, 5.0)

        self.clock.advance(1)
        records = [message("alice@a.test", f"u{n % 7}@b.test", f"m{n:03d}") for n in range(1, 101)]
        for record in records:
            self.successResultOf(self.send(record))
        self.network.advance(3, step=1)
        self.assertEqual(self.connector.attempts, [0.0])
        self.assertEqual(len(rows(self.a)), 101)
        self.assertEqual(self.a.outbox.depth, 101)
        self.assertEqual(backendOf(self.a, "a.test").reports, [])

        # Failures 2 to 5, each after the previous delay, one attempt each.
        for failures in range(2, 6):
            self.advanceTo(queue.retryAt)
            self.assertEqual(len(self.connector.attempts), failures)
            self.assertEqual(queue.failures, failures)
            self.assertEqual(queue.inFlight, {})
        gaps = [b - a for a, b in zip(self.connector.attempts, self.connector.attempts[1:])]
        bases = [10.0, 20.0, 40.0, 80.0]
        expected = [base * (0.5 + j / 2) for base, j in zip(bases, [0.0, 0.5, 0.9, 0.25])]
        for gap, want, base in zip(gaps, expected, bases):
            self.assertAlmostEqual(gap, want)
            self.assertTrue(0.5 * base <= gap < base, (gap, base))
        # The fifth failure doubles past retry_max: capped at 80 s.
        wait = queue.retryAt - self.clock.seconds()
        self.assertAlmostEqual(wait, 80.0 * (0.5 + 0.999999 / 2))
        self.assertTrue(40.0 <= wait < 80.0)
        self.assertEqual(backendOf(self.a, "a.test").reports, [])

        # B comes back: at the next try, one message probes.
        self.startB()
        self.clock.advance(queue.retryAt - self.clock.seconds())
        self.assertEqual(len(self.connector.attempts), 6)
        self.assertEqual([e.record.messageId for e in queue.inFlight.values()], ["m000"])
        self.assertEqual(len(queue.waiting), 100)
        self.network.flush()

        delivered = backendOf(self.b, "b.test").messages
        self.assertEqual(ids(delivered), ["m000"] + ids(records))
        self.assertEqual(reportIds(backendOf(self.a, "a.test")), [(i, None) for i in ids(delivered)])
        self.assertEqual(rows(self.a), [])
        self.assertEqual(self.a.outbox.depth, 0)
        self.assertEqual(len(self.connector.attempts), 6)

    def test_notPublished(self):
        """
        A destination that publishes no SRV records and does not answer on
        its name is down for now, not refused for good: the message stays
        queued until the destination appears.
        """
        del self.network.resolver.records["_imx._tcp.b.test"]
        record = message("alice@a.test", "bob@b.test", "m1")
        self.successResultOf(self.send(record))
        self.network.advance(60, step=5)
        self.assertGreater(len(self.connector.attempts), 1)
        self.assertEqual(backendOf(self.a, "a.test").reports, [])
        self.assertEqual(len(rows(self.a)), 1)
        self.startB()
        self.network.advance(900, step=10)
        self.assertEqual(backendOf(self.b, "b.test").messages, [record])
        self.assertEqual(backendOf(self.a, "a.test").reports, [(record, None)])

    def test_windowOpensAfterProbe(self):
        """
        After a successful probe the window opens again, up to C{window}
        messages in flight and never more.
        """
        self.a.outbox.settings = QueueConfig(retryInitial=10.0, window=5)
        sent = [self.send(message("alice@a.test", "bob@b.test", f"m{n:02d}"), flush=False)
                for n in range(30)]
        self.network.flush()
        for each in sent:
            self.successResultOf(each)
        queue = self.queueOf()
        self.startB()
        self.clock.advance(queue.retryAt - self.clock.seconds())
        self.assertEqual(len(queue.inFlight), 1)
        # Let the connection open and the messages be acknowledged, one
        # pump round at a time, watching how many are in flight.
        seen = set()
        for _ in range(1000):
            self.clock.advance(0)
            moved = any([pump.pump() for pump in self.network.pumps])
            seen.add(len(queue.inFlight))
            if not moved and not queue.depth():
                break
        self.assertEqual(max(seen), 5, seen)
        self.assertEqual(
            ids(backendOf(self.b, "b.test").messages), [f"m{n:02d}" for n in range(30)]
        )

    def test_perMessageDelay(self):
        """
        A receiver refusing one message with C{recipient-unavailable} delays
        that message alone: messages to other recipients of the same domain
        are delivered at once, the queue does not back off, and the delayed
        message is delivered when its recipient is available again.
        """
        self.startB()
        backend = backendOf(self.b, "b.test")
        away = {"bob@b.test"}
        deliver = backend.deliverMessage
        tries = []

        def deliverMessage(m):
            tries.append((self.clock.seconds(), m.messageId))
            if m.recipient in away:
                return fail(Refused(ErrorCode.RECIPIENT_UNAVAILABLE, "bob is away"))
            return deliver(m)

        backend.deliverMessage = deliverMessage
        self.successResultOf(self.send(message("alice@a.test", "bob@b.test", "m1")))
        self.successResultOf(self.send(message("alice@a.test", "carol@b.test", "m2")))
        queue = self.queueOf()
        self.assertIsNone(queue.retryAt)
        self.assertEqual(queue.failures, 0)
        self.assertEqual([e.record.messageId for e in queue.delayed], ["m1"])
        self.assertEqual(reportIds(backendOf(self.a, "a.test")), [("m2", None)])

        self.clock.advance(1)
        self.successResultOf(self.send(message("alice@a.test", "carol@b.test", "m3")))
        self.assertEqual(ids(backend.messages), ["m2", "m3"])
        self.assertIn("recipient-unavailable", statusOf(self.a)["queue.b.test"])

        # m1 waits 10 * 0.5 s, is refused again, then waits 20 * 0.5 s.
        self.network.advance(5, step=1)
        self.assertEqual([t for t, i in tries if i == "m1"], [0.0, 5.0])
        away.clear()
        self.network.advance(10, step=1)
        self.assertEqual([t for t, i in tries if i == "m1"], [0.0, 5.0, 15.0])
        self.assertEqual(ids(backend.messages), ["m2", "m3", "m1"])
        self.assertEqual(
            reportIds(backendOf(self.a, "a.test")), [("m2", None), ("m3", None), ("m1", None)]
        )
        self.assertEqual(len(self.connector.attempts), 1)
        self.assertEqual(rows(self.a), [])


class GiveUpTests(NetworkMixin, SynchronousTestCase):
    """
    Messages not delivered within C{give_up_after} are reported failed.
    """

    queue = QueueConfig(giveUpAfter=100.0, retryInitial=1000.0, retryMax=1000.0)

    def test_sweep(self):
        """
        The sweep gives up a message waiting past its age: it is reported
        failed (temporary, with a text saying why and the last error) and
        removed from the database.
        """
        record = message("alice@a.test", "bob@b.test", "m1")
        self.successResultOf(self.send(record))
        self.network.advance(SWEEP_INTERVAL, step=10)
        self.assertEqual(backendOf(self.a, "a.test").reports, [])
        self.assertEqual(len(rows(self.a)), 1)
        self.network.advance(SWEEP_INTERVAL, step=10)
        [(reported, refusal)] = backendOf(self.a, "a.test").reports
        self.assertEqual(reported, record)
        self.assertTrue(refusal.temporary)
        self.assertIn("not delivered within 100 s", refusal.text)
        self.assertIn("no server of b.test answered", refusal.text)
        self.assertEqual(rows(self.a), [])
        self.assertEqual(self.a.outbox.depth, 0)
        self.assertEqual(statusOf(self.a)["queue-given-up"], "1")
        # Only one try was made, and it is not tried again.
        self.network.advance(2000, step=100)
        self.assertEqual(self.connector.attempts, [0.0])
        self.assertEqual(len(backendOf(self.a, "a.test").reports), 1)

    def test_failedTryPastAge(self):
        """
        A message whose try fails after its give-up age is given up then,
        before the sweep, and reported once.
        """
        self.a.outbox.settings = QueueConfig(giveUpAfter=30.0, retryInitial=10.0)
        record = message("alice@a.test", "bob@b.test", "m1")
        self.successResultOf(self.send(record))
        # Tries at 0, 5, 15, 35 (delays 5, 10, 20 with jitter 0).
        self.network.advance(34, step=1)
        self.assertEqual(self.connector.attempts, [0.0, 5.0, 15.0])
        self.assertEqual(backendOf(self.a, "a.test").reports, [])
        self.network.advance(1)
        self.assertEqual(self.connector.attempts, [0.0, 5.0, 15.0, 35.0])
        [(reported, refusal)] = backendOf(self.a, "a.test").reports
        self.assertIn("not delivered within 30 s", refusal.text)
        self.assertEqual(rows(self.a), [])
        self.network.advance(3 * SWEEP_INTERVAL, step=30)
        self.assertEqual(len(backendOf(self.a, "a.test").reports), 1)


class RestartTests(SynchronousTestCase):
    """
    The queue survives a restart of the sender.
    """

    def setUp(self):
        self.network = Network()
        self.path = self.mktemp()
        self.network.publish("b.test", (0, 0, 5275, f"imx.{B}"))

    def sender(self):
        return makeServer(
            self.network,
            A,
            ["a.test"],
            queue=QueueConfig(retryInitial=10.0),
            database=Database(self.path, self.network.clock),
            randomness=lambda: 0.0,
        )

    def test_restart(self):
        """
        Messages queued for a down destination are delivered once and in
        order after the sender restarts on the same database file, and the
        reports go to the new server's backend.
        """
        old = self.sender()
        records = [message("alice@a.test", "bob@b.test", f"m{n}") for n in range(5)]
        domain = old.aggregator.domain("a.test")
        for record in records:
            sent = domain.sendMessage(record)
            self.network.flush()
            self.successResultOf(sent)
        self.assertEqual(old.outbox.depth, 5)
        self.network.stop(old)

        self.network.advance(30)
        new = self.sender()
        self.assertEqual(new.outbox.depth, 5)
        later = message("alice@a.test", "bob@b.test", "m5")
        sent = new.aggregator.domain("a.test").sendMessage(later)
        self.network.flush()
        self.successResultOf(sent)
        b = makeServer(self.network, B, ["b.test"])
        self.network.advance(60, step=1)
        self.assertEqual(
            ids(backendOf(b, "b.test").messages), ["m0", "m1", "m2", "m3", "m4", "m5"]
        )
        self.assertEqual(
            reportIds(backendOf(new, "a.test")), [(f"m{n}", None) for n in range(6)]
        )
        self.assertEqual(backendOf(old, "a.test").reports, [])
        self.assertEqual(rows(new), [])
        self.network.advance(300, step=30)
        self.assertEqual(len(backendOf(b, "b.test").messages), 6)
        self.network.stop(new)

    def test_restartEmpty(self):
        """
        Delivered messages do not come back after a restart.
        """
        b = makeServer(self.network, B, ["b.test"])
        old = self.sender()
        sent = old.aggregator.domain("a.test").sendMessage(message("alice@a.test", "bob@b.test"))
        self.network.flush()
        self.successResultOf(sent)
        self.assertEqual(len(backendOf(b, "b.test").messages), 1)
        self.network.stop(old)
        new = self.sender()
        self.network.advance(60, step=5)
        self.assertEqual(new.outbox.depth, 0)
        self.assertEqual(len(backendOf(b, "b.test").messages), 1)
        self.assertEqual(backendOf(new, "a.test").reports, [])
        self.network.stop(new)


class StatusTests(NetworkMixin, SynchronousTestCase):
    """
    Status lines of the queue, and C{retryNow}.
    """

    queue = QueueConfig(retryInitial=100.0, retryMax=100.0)

    def test_statusAndRetryNow(self):
        """
        C{queue-depth} counts the messages held and C{queue.<domain>} shows
        a destination's depth, time to the next try and last error;
        C{retryNow} ends the backoff at once.
        """
        for n in range(3):
            self.successResultOf(self.send(message("alice@a.test", "bob@b.test", f"m{n}")))
        self.network.advance(10, step=5)
        status = statusOf(self.a)
        self.assertEqual(status["queue-depth"], "3")
        line = queueLine(status["queue.b.test"])
        self.assertEqual(line["depth"], "3")
        self.assertEqual(line["in-flight"], "0")
        self.assertEqual(line["oldest"], "10s")
        self.assertEqual(line["retry-in"], "40s")
        self.assertEqual(line["failures"], "1")
        self.assertTrue(
            line["last-error"].startswith("400 temporary-failure: no server of b.test answered"),
            line,
        )

        self.assertEqual(self.a.outbox.retryNow("c.test"), [])
        self.assertEqual(len(self.connector.attempts), 1)
        self.startB()
        self.assertEqual(self.a.outbox.retryNow("b.test"), ["b.test"])
        self.assertEqual(len(self.connector.attempts), 2)
        self.network.flush()
        self.assertEqual(ids(backendOf(self.b, "b.test").messages), ["m0", "m1", "m2"])
        status = statusOf(self.a)
        self.assertEqual(status["queue-depth"], "0")
        self.assertNotIn("queue.b.test", status)
        self.assertEqual(status["queue-delivered"], "3")
        self.assertEqual(status["queue-retries"], "1")

    def test_retryNowAll(self):
        """
        C{retryNow()} without a domain wakes every destination.
        """
        self.network.publish("c.test", (0, 0, 5275, f"imx.{C}"))
        self.successResultOf(self.send(message("alice@a.test", "bob@b.test", "m1")))
        self.successResultOf(self.send(message("alice@a.test", "carl@c.test", "m2")))
        self.assertEqual(len(self.connector.attempts), 2)
        self.assertEqual(sorted(self.a.outbox.retryNow()), ["b.test", "c.test"])
        self.assertEqual(len(self.connector.attempts), 4)


class DedupeTests(SynchronousTestCase):
    """
    The receiver delivers a MESSAGE at most once per origin domain and
    MESSAGE_ID within the dedupe window.
    """

    def setUp(self):
        self.network = Network()
        self.a = makeServer(self.network, A, ["a.test"])
        self.path = self.mktemp()
        self.b = self.receiver()
        self.c = makeServer(self.network, C, ["c.test"])
        self.addCleanup(lambda: self.b.database.close())

    def receiver(self, **kwargs):
        return makeServer(
            self.network,
            B,
            ["b.test"],
            database=Database(self.path, self.network.clock),
            **kwargs,
        )

    def route(self, server, record):
        """
        Send C{record} once (past the outbox) and let the network run.
        """
        domain = server.aggregator.domain(record.sender.split("@")[1])
        sent = domain.route(record)
        self.network.flush()
        return sent

    def backend(self):
        return backendOf(self.b, "b.test")

    def suppressed(self):
        return statusOf(self.b)["count.duplicates-suppressed"]

    def test_duplicate(self):
        """
        The same MESSAGE sent twice is acknowledged twice and delivered
        once; the status counts the duplicate.
        """
        record = message("alice@a.test", "bob@b.test", "m1")
        self.assertIsInstance(self.successResultOf(self.route(self.a, record)), Ack)
        self.assertIsInstance(self.successResultOf(self.route(self.a, record)), Ack)
        self.assertEqual(self.backend().messages, [record])
        self.assertEqual(self.suppressed(), 1)

    def test_duplicateAcrossRestart(self):
        """
        The receiver remembers the ids across a restart on its database.
        """
        record = message("alice@a.test", "bob@b.test", "m1")
        self.successResultOf(self.route(self.a, record))
        self.network.stop(self.b)
        self.b = self.receiver()
        self.assertIsInstance(self.successResultOf(self.route(self.a, record)), Ack)
        self.assertEqual(self.backend().messages, [])
        self.assertEqual(self.suppressed(), 1)
        other = message("alice@a.test", "bob@b.test", "m2")
        self.successResultOf(self.route(self.a, other))
        self.assertEqual(self.backend().messages, [other])

    def pending(self):
        """
        Make B's backend hold every message it is given without an answer.

        @return: the list of C{(message, Deferred)} given.
        """
        held = []

        def deliverMessage(m):
            d = Deferred()
            held.append((m, d))
            return d

        self.backend().deliverMessage = deliverMessage
        return held

    def test_copyWhileDeliveringSucceeds(self):
        """
        A copy arriving while the first is still being delivered is not
        delivered again; both are acknowledged once the first is.
        """
        held = self.pending()
        record = message("alice@a.test", "bob@b.test", "m1")
        first = self.route(self.a, record)
        second = self.route(self.a, record)
        self.assertEqual(len(held), 1)
        self.assertNoResult(first)
        self.assertNoResult(second)
        held[0][1].callback(None)
        self.network.flush()
        self.assertIsInstance(self.successResultOf(first), Ack)
        self.assertIsInstance(self.successResultOf(second), Ack)
        self.assertEqual(len(held), 1)
        self.assertEqual(self.suppressed(), 1)

    def test_copyWhileDeliveringFails(self):
        """
        A copy arriving while the first is still being delivered gets the
        first one's refusal; the id is not remembered, so a later copy is
        delivered.
        """
        held = self.pending()
        record = message("alice@a.test", "bob@b.test", "m1")
        first = self.route(self.a, record)
        second = self.route(self.a, record)
        held[0][1].errback(Refused(ErrorCode.UNKNOWN_USER, "no such user"))
        self.network.flush()
        self.assertEqual(self.failureResultOf(first, RemoteError).value.code, ErrorCode.UNKNOWN_USER)
        self.assertEqual(self.failureResultOf(second, RemoteError).value.code, ErrorCode.UNKNOWN_USER)
        self.assertEqual(len(held), 1)
        self.assertEqual(self.suppressed(), 0)
        third = self.route(self.a, record)
        self.assertEqual(len(held), 2)
        held[1][1].callback(None)
        self.network.flush()
        self.assertIsInstance(self.successResultOf(third), Ack)

    def test_failedNotRemembered(self):
        """
        After a failed delivery the id is not remembered: a retry is
        delivered.
        """
        backend = self.backend()
        deliver = backend.deliverMessage
        answers = [fail(Refused(ErrorCode.RECIPIENT_UNAVAILABLE, "later"))]
        backend.deliverMessage = lambda m: answers.pop() if answers else deliver(m)
        record = message("alice@a.test", "bob@b.test", "m1")
        failure = self.failureResultOf(self.route(self.a, record), RemoteError)
        self.assertEqual(failure.value.code, ErrorCode.RECIPIENT_UNAVAILABLE)
        self.assertIsInstance(self.successResultOf(self.route(self.a, record)), Ack)
        self.assertEqual(backend.messages, [record])
        self.assertEqual(self.suppressed(), 0)

    def test_otherOrigin(self):
        """
        The same id from another origin domain is another message.
        """
        fromA = message("alice@a.test", "bob@b.test", "m1", body=b"from a")
        fromC = message("carl@c.test", "bob@b.test", "m1", body=b"from c")
        self.successResultOf(self.route(self.a, fromA))
        self.successResultOf(self.route(self.c, fromC))
        self.assertEqual(self.backend().messages, [fromA, fromC])
        self.assertEqual(self.suppressed(), 0)

    def test_pruned(self):
        """
        Ids older than C{dedupe_window} are forgotten by the next prune:
        the same id is then delivered again.
        """
        self.network.stop(self.b)
        self.b = self.receiver(queue=QueueConfig(giveUpAfter=3600.0, dedupeWindow=7200.0))
        record = message("alice@a.test", "bob@b.test", "m1")
        self.successResultOf(self.route(self.a, record))
        # Prunes run every ten minutes; at 2 h the id is not older than
        # the window.
        self.network.advance(7200.0, step=600)
        self.successResultOf(self.route(self.a, record))
        self.assertEqual(len(self.backend().messages), 1)
        self.assertEqual(self.suppressed(), 1)
        # By 2 h 10 min it is, and it is forgotten.
        self.network.advance(PRUNE_INTERVAL, step=600)
        self.successResultOf(self.route(self.a, record))
        self.assertEqual(len(self.backend().messages), 2)

    def test_lostAcknowledgement(self):
        """
        When the connection is lost after the receiver delivered a message
        but before its ACK arrived, the sender's outbox sends it again; the
        receiver acknowledges the copy without delivering it, and the sender
        reports it delivered once.
        """
        self.a.outbox.random = lambda: 0.0
        held = self.pending()
        record = message("alice@a.test", "bob@b.test", "m1")
        sent = self.a.aggregator.domain("a.test").sendMessage(record)
        self.network.flush()
        self.successResultOf(sent)
        self.assertEqual(len(held), 1)
        for connection in list(self.a.connections):
            connection.transport.abortConnection()
        self.network.flush()
        held[0][1].callback(None)
        self.network.flush()
        queue = self.a.outbox.queues["b.test"]
        self.assertIsNotNone(queue.retryAt)
        self.assertEqual(backendOf(self.a, "a.test").reports, [])
        self.network.advance(queue.retryAt - self.network.clock.seconds())
        self.assertEqual(len(held), 1)
        self.assertEqual(backendOf(self.a, "a.test").reports, [(record, None)])
        self.assertEqual(self.suppressed(), 1)
        self.assertEqual(rows(self.a), [])


class FakeTransmit:
    """
    Records what an outbox sends and answers it by hand.
    """

    def __init__(self):
        self.calls = []

    def __call__(self, origin, remote, record, onAnswer, onFailure, args):
        d = Deferred()
        d.addCallbacks(onAnswer, onFailure, args, None, args)
        self.calls.append((remote, record.messageId, d))

    def sent(self):
        return [(remote, messageId) for remote, messageId, _ in self.calls]

    def answer(self, index, result=None):
        d = self.calls[index][2]
        if isinstance(result, Exception):
            d.errback(result)
        else:
            d.callback(result)


class OutboxTests(SynchronousTestCase):
    """
    An L{Outbox} on an L{OutboundStore} in memory, with a fake transmit.
    """

    def setUp(self):
        self.clock = Clock()
        self.database = Database(":memory:", self.clock)
        self.store = OutboundStore(self.database)
        self.transmit = FakeTransmit()
        self.reports = []
        self.jitter = iter(itertools.repeat(0.0))
        self.outbox = self.build()

    def build(self, **settings):
        outbox = Outbox(
            self.store,
            self.clock,
            self.transmit,
            lambda entry, refusal: self.reports.append((entry.record.messageId, refusal)),
            QueueConfig(**{"retryInitial": 10.0, "retryMax": 80.0, "window": 3, **settings}),
            randomness=lambda: next(self.jitter),
        )
        outbox.start()
        self.clock.advance(0)
        self.addCleanup(outbox.stop)
        return outbox

    def answer(self, index, result=None):
        """
        Answer the C{index}th send, then let the commit that the report
        waits for run.
        """
        self.transmit.answer(index, result)
        self.clock.advance(0)

    def submit(self, messageId, remote="b.test", commit=True):
        sent = self.outbox.submit(
            "a.test", remote, message("alice@a.test", f"bob@{remote}", messageId)
        )
        if commit:
            self.clock.advance(0)
        return sent

    def stored(self):
        self.clock.advance(0)
        return [e.record.messageId for e in self.store.load()]

    def test_sentAtOnceAcceptedWhenCommitted(self):
        """
        C{submit} sends the message at once and fires once it is committed.
        """
        sent = self.submit("m1", commit=False)
        self.assertNoResult(sent)
        self.assertEqual(self.transmit.sent(), [("b.test", "m1")])
        self.assertEqual(self.store.load(), [])
        self.clock.advance(0)
        self.assertIsNone(self.successResultOf(sent))
        self.assertEqual([e.record.messageId for e in self.store.load()], ["m1"])

    def test_answeredBeforeCommit(self):
        """
        A message answered before its commit is accepted at once, reported
        on a later turn, and never written.
        """
        sent = self.submit("m1", commit=False)
        self.transmit.answer(0, None)
        self.assertIsNone(self.successResultOf(sent))
        self.assertEqual(self.reports, [])
        self.clock.advance(0)
        self.assertEqual(self.reports, [("m1", None)])
        self.assertEqual(self.database.writes, 0)
        self.assertEqual(self.outbox.depth, 0)

    def test_refusedBeforeCommit(self):
        """
        A message refused for good before its commit is accepted, then
        reported refused, and never written.
        """
        sent = self.submit("m1", commit=False)
        self.transmit.answer(0, Refused(ErrorCode.UNKNOWN_USER, "no such user"))
        self.assertIsNone(self.successResultOf(sent))
        self.clock.advance(0)
        [(messageId, refusal)] = self.reports
        self.assertEqual((messageId, refusal.code), ("m1", ErrorCode.UNKNOWN_USER))
        self.assertEqual(self.stored(), [])

    def test_stopSendsDueReports(self):
        """
        Reports due for messages never written go out when the outbox
        stops, not on a turn that may come after the backends stopped.
        """
        self.submit("m1", commit=False)
        self.transmit.answer(0, None)
        self.assertEqual(self.reports, [])
        self.outbox.stop()
        self.assertEqual(self.reports, [("m1", None)])
        self.clock.advance(0)
        self.assertEqual(self.reports, [("m1", None)])

    def test_answeredAfterCommit(self):
        """
        A message answered after its commit is removed with the next
        commit and reported only then.
        """
        sent = self.submit("m1")
        self.successResultOf(sent)
        self.transmit.answer(0, None)
        self.assertEqual(self.reports, [])
        self.clock.advance(0)
        self.assertEqual(self.reports, [("m1", None)])
        self.assertEqual(self.stored(), [])

    def test_groupedCommit(self):
        """
        Messages submitted in one turn are committed in one transaction.
        """
        before = self.database.commits
        sent = [self.submit(f"m{n}", commit=False) for n in range(5)]
        self.clock.advance(0)
        for each in sent:
            self.successResultOf(each)
        self.assertEqual(self.database.commits, before + 1)

    def test_commitFailure(self):
        """
        A failed commit fails every submit waiting for it with a temporary
        refusal; the messages already sent are not reported when answered.
        """
        self.database._db.execute("PRAGMA query_only = ON")
        sent = [self.submit(f"m{n}", commit=False) for n in range(2)]
        self.clock.advance(0)
        for each in sent:
            refusal = self.failureResultOf(each, Refused).value
            self.assertEqual(refusal.code, ErrorCode.TEMPORARY_FAILURE)
        self.assertEqual(self.transmit.sent(), [("b.test", "m0"), ("b.test", "m1")])
        self.database._db.execute("PRAGMA query_only = OFF")
        self.answer(0)
        self.answer(1)
        self.assertEqual(self.reports, [])
        self.assertEqual(self.outbox.depth, 0)
        self.assertEqual(self.stored(), [])

    def test_window(self):
        """
        At most C{window} messages are in flight to one destination; the
        next goes when one is answered; other destinations have their own
        window.
        """
        for n in range(5):
            self.submit(f"m{n}")
        self.submit("x1", remote="c.test")
        self.assertEqual(
            self.transmit.sent(),
            [("b.test", "m0"), ("b.test", "m1"), ("b.test", "m2"), ("c.test", "x1")],
        )
        self.answer(1)
        self.assertEqual(self.transmit.sent()[-1], ("b.test", "m3"))
        self.assertEqual(self.reports, [("m1", None)])
        self.assertEqual(self.stored(), ["m0", "m2", "m3", "m4", "x1"])

    def test_backoffOncePerFailure(self):
        """
        All the messages in flight failing count as one failure of the
        destination, with one backoff.
        """
        for n in range(3):
            self.submit(f"m{n}")
        for n in range(3):
            self.answer(n, Refused(ErrorCode.TEMPORARY_FAILURE, "down"))
        queue = self.outbox.queues["b.test"]
        self.assertEqual(queue.failures, 1)
        self.assertEqual(queue.retryAt, 5.0)
        self.assertEqual(self.outbox.counters["retries"], 1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)  # timer + sweep
        self.assertEqual(self.reports, [])
        # After the backoff one message probes: the oldest.
        self.clock.advance(5)
        self.assertEqual(self.transmit.sent()[3:], [("b.test", "m0")])
        self.answer(3)
        self.assertEqual(self.transmit.sent()[4:], [("b.test", "m1"), ("b.test", "m2")])

    def test_delays(self):
        """
        The delays double from C{retry_initial} up to C{retry_max}, each
        scaled by 0.5 + jitter / 2.
        """
        jitters = [0.0, 0.999999, 0.5, 0.2, 0.8, 0.0, 0.999999]
        self.jitter = iter(jitters)
        self.submit("m0")
        waits = []
        for n in range(len(jitters)):
            self.answer(n, Refused(ErrorCode.TEMPORARY_FAILURE, "down"))
            queue = self.outbox.queues["b.test"]
            waits.append(queue.retryAt - self.clock.seconds())
            self.clock.advance(waits[-1])
            self.assertEqual(len(self.transmit.calls), n + 2)
        bases = [10, 20, 40, 80, 80, 80, 80]
        for wait, base, jitter in zip(waits, bases, jitters):
            self.assertAlmostEqual(wait, base * (0.5 + jitter / 2))
            self.assertTrue(base / 2 <= wait < base)

    def test_delayLongRun(self):
        """
        However many failures in a row, the delay stays within C{retry_max}.
        """
        self.jitter = itertools.repeat(0.999999)
        for failures in (1, 10, 33, 100, 10000):
            delay = self.outbox._backoffDelay(failures)
            self.assertTrue(0 < delay < 80.0)

    def test_retryAfter(self):
        """
        A refusal's RETRY_AFTER replaces the computed delay.
        """
        self.submit("m0")
        self.answer(
            0, RemoteError(Error(code=ErrorCode.RATE_LIMITED, text="slow", retryAfter=7))
        )
        self.assertEqual(self.outbox.queues["b.test"].retryAt, 7.0)
        self.clock.advance(6.9)
        self.assertEqual(len(self.transmit.calls), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.transmit.calls), 2)

    def test_busyReceiverHalvesWindow(self):
        """
        A remote C{resource-limit} while other messages are in flight
        halves the window and sends the message again as answers come,
        without a backoff; with nothing else in flight it is a backoff
        (RETRY_AFTER obeyed).
        """
        for n in range(3):
            self.submit(f"m{n}")
        busy = RemoteError(Error(code=ErrorCode.RESOURCE_LIMIT, text="busy", retryAfter=1))
        self.answer(2, busy)
        queue = self.outbox.queues["b.test"]
        self.assertIsNone(queue.retryAt)
        self.assertEqual(queue.window, 1)
        self.assertEqual(len(self.transmit.calls), 3)
        self.answer(0)
        self.assertEqual(self.transmit.sent()[3:], [("b.test", "m2")])
        self.assertEqual(dict(self.outbox.status())["queue-slowed"], "1")
        self.answer(1, busy)
        self.answer(3, busy)
        self.assertEqual(queue.retryAt, 1.0)
        self.clock.advance(1)
        self.answer(4)
        self.answer(5)
        self.assertEqual(sorted(m for m, _ in self.reports), ["m0", "m1", "m2"])

    def test_perMessage(self):
        """
        A remote C{recipient-unavailable} delays that message alone; its
        own delays grow; the rest go on; C{retryNow} sends it at once.
        """
        self.submit("m0")
        unavailable = RemoteError(Error(code=ErrorCode.RECIPIENT_UNAVAILABLE, text="away"))
        self.answer(0, unavailable)
        queue = self.outbox.queues["b.test"]
        self.assertIsNone(queue.retryAt)
        self.assertEqual(queue.delayed[0].notBefore, 5.0)
        self.submit("m1")
        self.assertEqual(self.transmit.sent()[1], ("b.test", "m1"))
        self.clock.advance(5)
        self.assertEqual(self.transmit.sent()[2], ("b.test", "m0"))
        self.answer(2, unavailable)
        self.assertEqual(queue.delayed[0].notBefore, 15.0)
        self.assertEqual(queue.delayed[0].attempts, 2)
        self.assertEqual(self.outbox.retryNow("b.test"), ["b.test"])
        self.assertEqual(self.transmit.sent()[3], ("b.test", "m0"))
        self.answer(3)
        self.assertEqual(self.reports, [("m0", None)])

    def test_permanent(self):
        """
        A permanent refusal is reported and the message removed at once.
        """
        self.submit("m0")
        self.answer(0, Refused(ErrorCode.UNKNOWN_USER, "who?"))
        [(messageId, refusal)] = self.reports
        self.assertEqual((messageId, refusal.code), ("m0", ErrorCode.UNKNOWN_USER))
        self.assertEqual(self.stored(), [])
        self.assertEqual(self.outbox.depth, 0)
        self.assertEqual(self.outbox.counters["failed"], 1)
        self.assertNotIn("b.test", self.outbox.queues)

    def test_unexpectedError(self):
        """
        An unexpected exception from C{transmit} is treated as a temporary
        failure: logged, the destination backs off, the message is kept.
        """
        self.submit("m0")
        self.answer(0, RuntimeError("boom"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertIsNotNone(self.outbox.queues["b.test"].retryAt)
        self.assertEqual(self.reports, [])
        self.assertEqual(self.stored(), ["m0"])

    def test_reportFails(self):
        """
        A report that raises does not keep the message in the queue.
        """
        def report(entry, refusal):
            raise ValueError("backend gone")

        self.outbox.report = report
        self.submit("m0")
        self.answer(0)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(self.stored(), [])
        self.assertEqual(self.outbox.depth, 0)

    def test_start(self):
        """
        A new outbox on the same store takes up the messages in order,
        numbering new ones after them.
        """
        for n in range(4):
            self.submit(f"m{n}", remote="b.test" if n % 2 else "c.test")
        self.outbox.stop()
        self.transmit.calls = []
        self.outbox = self.build()
        self.assertEqual(self.outbox.depth, 4)
        self.assertEqual(
            sorted(self.transmit.sent()),
            [("b.test", "m1"), ("b.test", "m3"), ("c.test", "m0"), ("c.test", "m2")],
        )
        self.assertEqual([m for r, m in self.transmit.sent() if r == "b.test"], ["m1", "m3"])
        self.submit("m4")
        seqs = [e.seq for e in self.store.load()]
        self.assertEqual(seqs, sorted(seqs))
        self.assertEqual(self.store.load()[-1].record.messageId, "m4")

    def test_sweep(self):
        """
        The sweep gives up the messages waiting past their age and leaves
        the rest.
        """
        self.outbox.stop()
        self.outbox = self.build(giveUpAfter=90.0, retryInitial=1000.0, retryMax=1000.0)
        self.submit("m0")
        self.answer(0, Refused(ErrorCode.TEMPORARY_FAILURE, "down"))
        self.clock.advance(50)
        self.submit("m1")
        self.clock.advance(SWEEP_INTERVAL - 50)
        self.assertEqual(self.reports, [])
        self.clock.advance(SWEEP_INTERVAL)
        [(messageId, refusal)] = self.reports
        self.assertEqual(messageId, "m0")
        self.assertIn("not delivered within 90 s", refusal.text)
        self.assertIn("down", refusal.text)
        self.assertEqual(self.stored(), ["m1"])
        self.clock.advance(SWEEP_INTERVAL)
        self.assertEqual([m for m, _ in self.reports], ["m0", "m1"])
        self.assertEqual(self.stored(), [])

    def test_sweepAfterImmediateFailure(self):
        """
        The sweep also gives up a message whose last try failed at once
        (C{transmit} failing synchronously, as a refused connection to a
        full pool or a cached discovery failure does).
        """
        self.outbox.stop()
        self.outbox = self.build(giveUpAfter=90.0, retryInitial=1000.0, retryMax=1000.0)
        def failAtOnce(origin, remote, record, onAnswer, onFailure, args):
            onFailure(Failure(Refused(ErrorCode.TEMPORARY_FAILURE, "down")), *args)

        self.outbox.transmit = failAtOnce
        self.submit("m0")
        self.assertIsNotNone(self.outbox.queues["b.test"].retryAt)
        self.clock.advance(2 * SWEEP_INTERVAL)
        self.assertEqual([m for m, _ in self.reports], ["m0"])
        self.assertEqual(self.stored(), [])
        self.assertEqual(self.outbox.depth, 0)

    def test_status(self):
        """
        The status lines: totals, and one line per destination holding
        messages.
        """
        self.submit("m0")
        self.submit("m1", remote="c.test")
        self.answer(0, Refused(ErrorCode.TEMPORARY_FAILURE, "down"))
        self.clock.advance(2)
        lines = dict(self.outbox.status())
        self.assertEqual(lines["queue-depth"], "2")
        b = queueLine(lines["queue.b.test"])
        self.assertEqual(
            {k: b[k] for k in ("depth", "in-flight", "oldest", "retry-in", "failures")},
            {"depth": "1", "in-flight": "0", "oldest": "2s", "retry-in": "3s", "failures": "1"},
        )
        self.assertEqual(b["last-error"], "400 temporary-failure: down")
        c = queueLine(lines["queue.c.test"])
        self.assertEqual((c["depth"], c["in-flight"], c["oldest"]), ("1", "1", "2s"))
        self.assertNotIn("retry-in", c)
        self.assertNotIn("last-error", c)
        self.clock.advance(3)
        self.answer(1)
        self.answer(2)
        lines = dict(self.outbox.status())
        self.assertEqual(lines["queue-depth"], "0")
        self.assertNotIn("queue.b.test", lines)
        self.assertNotIn("queue.c.test", lines)


class ReviewRegressionTests(SynchronousTestCase):
    """
    Defects a review found in the first version of the outbox, each shown
    here so that it cannot come back.
    """

    def setUp(self):
        self.network = Network()

    def test_startTakesUpStoredMessagesOnce(self):
        """
        A backend that sends as soon as it starts (the spool polls at once)
        does not make the stored messages load twice: the outbox takes up
        the store before any backend starts.
        """
        path = self.mktemp()
        os.mkdir(path)
        spool = os.path.join(path, "spool")
        tables = [
            {"name": "a.test", "backend": "spool", "backend_options": {"directory": spool}},
            {"name": "z.test", "backend": "memory"},
        ]
        os.makedirs(os.path.join(spool, "outbox"))
        with open(os.path.join(spool, "outbox", "m1.json"), "w") as f:
            json.dump({"from": "alice@a.test", "to": "bob@b.test", "body": "hi"}, f)
        database = Database(os.path.join(path, "imxd.sqlite3"), self.network.clock)
        b = makeServer(self.network, "10.0.0.2", ["b.test"])
        a = makeServer(self.network, "10.0.0.1", tables, database=database)
        self.network.advance(5)
        self.assertEqual(ids(backendOf(b, "b.test").messages), ["m1"])
        self.assertEqual(a.outbox.depth, 0)
        self.assertEqual(a.outbox.counters["delivered"], 1)
        self.assertEqual(os.listdir(os.path.join(spool, "delivered")), ["m1.json"])
        self.network.stop(a)

    def test_reportAfterRemovalIsDurable(self):
        """
        The sender hears of a delivery only once the message's removal is
        committed, so a restart cannot send and report it again.
        """
        clock = Clock()
        database = Database(":memory:", clock)
        transmit = FakeTransmit()
        reports = []
        outbox = Outbox(OutboundStore(database), clock, transmit,
                        lambda entry, refusal: reports.append(entry.record.messageId),
                        QueueConfig())
        outbox.start()
        clock.advance(0)
        outbox.submit("a.test", "b.test", message("alice@a.test", "bob@b.test", "m1"))
        clock.advance(0)
        transmit.answer(0)
        self.assertEqual(reports, [])
        self.assertEqual(len(OutboundStore(database).load()), 1)
        clock.advance(0)
        self.assertEqual(reports, ["m1"])
        self.assertEqual(OutboundStore(database).load(), [])
        outbox.stop()

    def test_acceptedBeforeImmediateRefusal(self):
        """
        When the destination refuses at once (a domain hosted here), the
        sender hears "accepted" before the refusal's report.
        """
        c = self.network.server("10.0.0.3", ["c.test", "d.test"])
        backendOf(c, "d.test").deliverMessage = lambda m: fail(
            Refused(ErrorCode.UNKNOWN_USER, "no such user"))
        events = []
        sender = c.aggregator.domain("c.test")
        sender.backend.deliveryReport = lambda m, r: events.append(("report", r.code))
        sent = sender.sendMessage(message("carol@c.test", "nobody@d.test"))
        sent.addCallback(lambda _: events.append(("accepted", None)))
        self.network.flush()
        self.assertEqual(events, [("accepted", None), ("report", ErrorCode.UNKNOWN_USER)])

    def test_unencodableMessageRefused(self):
        """
        A message that cannot be encoded (a MESSAGE_ID over 128 octets) is
        refused with malformed, not raised into the backend.
        """
        a = self.network.server("10.0.0.1", ["a.test"])
        sent = a.aggregator.domain("a.test").sendMessage(
            message("alice@a.test", "bob@b.test", "x" * 200))
        self.assertEqual(self.failureResultOf(sent, Refused).value.code, ErrorCode.MALFORMED)
        self.assertEqual(a.outbox.depth, 0)

    def test_badValueDoesNotWedgeTheDatabase(self):
        """
        A write SQLite cannot take (a lone surrogate) fails its own commit
        only; the next commit works.
        """
        clock = Clock()
        database = Database(":memory:", clock)
        database.schema("CREATE TABLE t (v TEXT)")
        database.write("INSERT INTO t VALUES (?)", ("bad \ud800",))
        failed = database.committed()
        clock.advance(0)
        self.failureResultOf(failed)
        database.write("INSERT INTO t VALUES (?)", ("good",))
        done = database.committed()
        clock.advance(0)
        self.successResultOf(done)
        self.assertEqual(database.read("SELECT v FROM t"), [("good",)])
        self.flushLoggedErrors()

    def test_tooOldAtStartGivenUp(self):
        """
        A message kept past give_up_after while imxd was down is given up
        at start, never sent.
        """
        clock = Clock()
        database = Database(":memory:", clock)
        store = OutboundStore(database)
        store.add("a.test", "b.test", message("alice@a.test", "bob@b.test", "old"), 0.0)
        clock.advance(0)
        clock.advance(100000)
        transmit = FakeTransmit()
        reports = []
        outbox = Outbox(store, clock, transmit,
                        lambda entry, refusal: reports.append((entry.record.messageId, refusal)),
                        QueueConfig(giveUpAfter=86400.0))
        outbox.start()
        clock.advance(0)
        clock.advance(0)
        self.assertEqual(transmit.calls, [])
        [(messageId, refusal)] = reports
        self.assertEqual(messageId, "old")
        self.assertIn("not delivered within 86400 s", refusal.text)
        outbox.stop()

    def test_accountKeyedByCanonicalAddress(self):
        """
        Case variants of one address share one rate-limit bucket.
        """
        a = self.network.server("10.0.0.1", [
            {"name": "a.test", "backend": "memory",
             "policy": {"account_rate": 1, "account_burst": 1}}])
        domain = a.aggregator.domain("a.test")
        sent = domain.sendMessage(message("alice@a.test", "bob@b.test", "m1"))
        self.network.flush()
        self.successResultOf(sent)
        refused = domain.sendMessage(message("ALICE@a.test", "bob@b.test", "m2"))
        self.assertEqual(self.failureResultOf(refused, Refused).value.code, ErrorCode.RATE_LIMITED)

    def test_peerErrorTextCleanedInStatus(self):
        """
        A peer's ERROR text reaches the status line on one line and cut
        short.
        """
        clock = Clock()
        transmit = FakeTransmit()
        outbox = Outbox(OutboundStore(Database(":memory:", clock)), clock, transmit,
                        lambda entry, refusal: None, QueueConfig())
        outbox.start()
        clock.advance(0)
        outbox.submit("a.test", "b.test", message("alice@a.test", "bob@b.test"))
        clock.advance(0)
        transmit.answer(0, RemoteError(Error(
            code=ErrorCode.TEMPORARY_FAILURE, text="bad\nqueue-depth=0 " + "x" * 900)))
        [line] = [v for k, v in outbox.status() if k == "queue.b.test"]
        self.assertNotIn("\n", line)
        self.assertLess(len(line), 400)
        outbox.stop()

    def test_stopDropsConnections(self):
        """
        Stopping the federation drops its connections, so no answer can
        arrive after the database is closed; what was in flight is sent
        again later.
        """
        a = self.network.server("10.0.0.1", ["a.test"])
        self.network.server("10.0.0.2", ["b.test"])
        domain = a.aggregator.domain("a.test")
        sent = domain.sendMessage(message("alice@a.test", "bob@b.test"))
        self.network.flush()
        self.successResultOf(sent)
        self.assertTrue(a.connections)
        a.stop()
        self.network.flush()
        self.assertEqual(a.connections, set())
