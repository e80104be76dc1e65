"""
The fault-and-abuse suite on real processes (L{tests.live}): a stream of
10,000 messages from A (a.test, 127.0.0.71) to B (b.test, 127.0.0.72)
while B is killed and restarted, while B is frozen for 5 s, and while A is
killed and restarted with messages still queued; each ends with every
message in B's spool inbox exactly once.  Also: a flood of connections
from one address is capped, and a sender over B's rate limit is slowed
down with rate-limit errors yet loses nothing.

Each test prints one line of figures (run with C{pytest -s} to see them);
C{docs/reliability.md} quotes them.  Every wait is bounded.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import socket
import tempfile
import time
import unittest

import pytest
from twisted.trial.unittest import SynchronousTestCase

from imxd.federation import FederationProtocol
from imxd.peer import PeerState
from imxd.wire import DialbackKey
from tests.live import DNSServer, Server, waitFor
from tests.network import Network, message

#: Messages per stream.
STREAM = 10000

#: Seconds a whole stream may take to be delivered.
STREAM_DEADLINE = 180.0

#: Short retry delays, so that a test does not wait minutes for a backoff.
QUEUE = ["[server.queue]", "retry_initial = 0.5", "retry_max = 2.0"]

#: The spool sender sends as one account; no per-account limit for it.
UNLIMITED = ["policy = { account_rate = 0 }"]


class FaultTestsMixin:
    """
    A and B with spools, a DNS server, all stopped by PID at the end.
    """

    def startServers(self, bLines=()):
        self.base = tempfile.mkdtemp(prefix="imxd-faults-")
        self.addCleanup(shutil.rmtree, self.base, True)
        self.dns = DNSServer(self.base)
        self.a = Server(self.base, "A", "127.0.0.71", ["a.test"],
                        domainOptions={"a.test": UNLIMITED}, serverLines=QUEUE)
        self.b = Server(self.base, "B", "127.0.0.72", ["b.test"],
                        serverLines=[*QUEUE, *bLines])
        self.dns.serve(self.a, "a.test")
        self.dns.serve(self.b, "b.test")
        self.dns.start()
        self.addCleanup(self.dns.stop)
        for server in (self.a, self.b):
            self.addCleanup(server.stop)
            server.start(self.dns.port)
        for server in (self.a, self.b):
            server.waitListening()

    def restart(self, server, sig):
        """
        Stop C{server} with C{sig} and start it again.
        """
        server.stop(sig)
        server.start(self.dns.port)
        server.waitListening()

    def drop(self, count, prefix="m"):
        """
        Write C{count} messages from alice@a.test to bob@b.test into A's
        outbox (each written to tmp/ and renamed in).

        @return: their ids, in order.
        """
        outbox = self.a.spool("a.test", "outbox")
        scratch = self.a.spool("a.test", "tmp")
        os.makedirs(outbox, exist_ok=True)
        os.makedirs(scratch, exist_ok=True)
        ids = []
        for n in range(count):
            messageId = f"{prefix}{n:06d}"
            path = os.path.join(scratch, "." + messageId)
            with open(path, "w") as f:
                json.dump({"from": "alice@a.test", "to": "bob@b.test", "id": messageId,
                           "body": f"message {n} " + "x" * 80}, f)
            os.replace(path, os.path.join(outbox, messageId + ".json"))
            ids.append(messageId)
        return ids

    def received(self):
        """
        @return: a C{Counter} of the ids in B's inbox (one file per
            delivery to B's backend).
        """
        inbox = self.b.spool("b.test", "inbox")
        counts = collections.Counter()
        if not os.path.isdir(inbox):
            return counts
        for name in os.listdir(inbox):
            try:
                with open(os.path.join(inbox, name)) as f:
                    counts[json.load(f)["id"]] += 1
            except (OSError, ValueError):
                continue
        return counts

    def inboxSize(self):
        inbox = self.b.spool("b.test", "inbox")
        return len(os.listdir(inbox)) if os.path.isdir(inbox) else 0

    def waitInbox(self, count, timeout):
        waitFor(lambda: self.inboxSize() >= count, f"{count} messages in B's inbox", timeout)

    def assertAllOnce(self, ids, started, what):
        """
        Wait (bounded) until A's queue is empty and every id is in B's
        inbox; then each must be there exactly once.  Prints the figures.
        """
        def done():
            if self.inboxSize() < len(ids):
                return False
            status = self.a.status()
            return status.get("queue-depth") == "0" and status
        status = waitFor(done, "every message delivered and A's queue empty", STREAM_DEADLINE)
        elapsed = time.monotonic() - started
        counts = self.received()
        self.assertEqual(set(counts), set(ids))
        self.assertEqual([i for i, n in counts.items() if n != 1], [])
        delivered = len(os.listdir(self.a.spool("a.test", "delivered")))
        failed = os.listdir(self.a.spool("a.test", "failed"))
        self.assertEqual(failed, [])
        bStatus = self.b.status()
        print(
            f"\n{what}: {len(ids)} messages, each in B's inbox once, in {elapsed:.1f} s;"
            f" A: delivered-reports={delivered} retries={status.get('count.queue-retries', status.get('queue-retries'))};"
            f" B: duplicates-suppressed={bStatus.get('count.duplicates-suppressed')}"
        )
        return elapsed


@pytest.mark.slow
class StreamFaultTests(FaultTestsMixin, unittest.TestCase):
    """
    10,000 messages from A to B through faults of either process.
    """

    def setUp(self):
        self.startServers()

    def test_receiverKilled(self):
        """
        B is killed with SIGKILL in the middle of the stream and started
        again: all 10,000 arrive, each once.
        """
        started = time.monotonic()
        ids = self.drop(STREAM)
        self.waitInbox(STREAM // 4, STREAM_DEADLINE)
        self.restart(self.b, signal.SIGKILL)
        self.assertAllOnce(ids, started, "B killed (SIGKILL) and restarted")

    def test_receiverFrozen(self):
        """
        B is stopped with SIGSTOP for 5 s in the middle of the stream and
        continued: all 10,000 arrive, each once.
        """
        started = time.monotonic()
        ids = self.drop(STREAM)
        self.waitInbox(STREAM // 4, STREAM_DEADLINE)
        os.kill(self.b.process.pid, signal.SIGSTOP)
        try:
            time.sleep(5.0)
        finally:
            os.kill(self.b.process.pid, signal.SIGCONT)
        self.assertAllOnce(ids, started, "B frozen (SIGSTOP) for 5 s")

    def test_senderKilledWithQueue(self):
        """
        A is killed with SIGKILL while messages are queued (B is down, so
        all of them are) and in flight, and started again: all 10,000
        arrive, each once.
        """
        started = time.monotonic()
        self.b.stop(signal.SIGKILL)
        ids = self.drop(STREAM)
        waitFor(
            lambda: len(os.listdir(self.a.spool("a.test", "outbox"))) == 0,
            "A to accept every message",
            STREAM_DEADLINE,
        )
        queued = int(self.a.status()["queue-depth"])
        self.restart(self.a, signal.SIGKILL)
        self.b.start(self.dns.port)
        self.b.waitListening()
        self.waitInbox(STREAM // 2, STREAM_DEADLINE)
        self.restart(self.a, signal.SIGKILL)
        self.assertAllOnce(ids, started, f"A killed twice ({queued} queued, then mid-stream)")


@pytest.mark.slow
class AbuseTests(FaultTestsMixin, unittest.TestCase):
    """
    A hostile or greedy peer against B.
    """

    def test_connectionFlood(self):
        """
        200 connections from one address: at most max_connections_per_address
        (16 by default) stay open, the rest are refused; B still takes A's
        messages meanwhile.
        """
        self.startServers()
        held, refused = [], 0
        try:
            for _ in range(200):
                connection = socket.create_connection((self.b.host, self.b.port), timeout=5.0)
                connection.settimeout(5.0)
                held.append(connection)
            time.sleep(1.0)
            open_ = 0
            for connection in held:
                connection.setblocking(False)
                try:
                    data = connection.recv(65536)
                except BlockingIOError:
                    data = None
                except OSError:
                    data = b""
                if data is not None and b"connections here" in data:
                    refused += 1
                else:
                    open_ += 1
            ids = self.drop(20, prefix="flood")
            waitFor(lambda: self.inboxSize() >= 20, "A's messages during the flood", 30.0)
        finally:
            for connection in held:
                connection.close()
        self.assertLessEqual(open_, 16)
        self.assertEqual(refused + open_, 200)
        self.assertEqual(set(self.received()), set(ids))
        status = self.b.status()
        self.assertGreaterEqual(int(status["count.connections-over-limit"]), 184)
        print(f"\nconnection flood: 200 from one address, {open_} kept, {refused} refused;"
              " A's 20 messages delivered meanwhile")

    def test_rateLimited(self):
        """
        B accepts 20 requests a second from a remote domain (burst 20): A's
        500 messages meet rate-limited errors with RETRY_AFTER, A backs off
        as told, and all arrive, each once.
        """
        self.startServers(bLines=["[server.limits]", "domain_rate = 20", "domain_burst = 20"])
        started = time.monotonic()
        ids = self.drop(500, prefix="rate")
        elapsed = self.assertAllOnce(ids, started, "rate limit 20/s at B")
        refusals = int(self.b.status()["count.rate-limited"])
        self.assertGreater(refusals, 0)
        self.assertTrue(
            [line for line in self.a.output().splitlines()
             if "outbox: b.test failed" in line and "402 rate-limited" in line],
            self.a.output()[-3000:],
        )
        # 500 messages at 20 a second after a burst of 20 take 24 s at least.
        self.assertGreater(elapsed, 20.0)
        print(f"rate limit: B refused {refusals} requests with 402")


class KeyIgnoringProtocol(FederationProtocol):
    """
    A receiving server's connection that never answers DIALBACK_KEY.
    """

    def _ignore(self, record):
        pass


KeyIgnoringProtocol.stateTables = {
    **FederationProtocol.stateTables,
    PeerState.OPEN: {
        **FederationProtocol.stateTables[PeerState.OPEN],
        DialbackKey: KeyIgnoringProtocol._ignore,
    },
}


class SilentDialbackTests(SynchronousTestCase):
    """
    In memory: a receiving server that never answers dial-back.
    """

    def test_messagesStayQueued(self):
        """
        B takes A's connection but never answers DIALBACK_KEY: the pair
        stays unauthenticated, no message reaches B's backend or is
        reported failed, A keeps all of them queued and tries again only
        on its backoff timer (a handful of connections in ten minutes, not
        one per message); once B answers, all are delivered in order.
        """
        network = Network()
        a = network.server("10.0.0.1", ["a.test"])
        b = network.server("10.0.0.2", ["b.test"])
        b.protocol = KeyIgnoringProtocol
        opened = []
        connect = a.pool._connect
        a.pool._connect = lambda *args: opened.append(args) or connect(*args)
        sender = a.aggregator.domain("a.test")
        records = [message("alice@a.test", "bob@b.test", f"m{n}") for n in range(50)]
        for record in records:
            self.assertIsNone(self.successResultOf_(network, sender.sendMessage(record)))
        network.advance(600, step=5)
        self.assertEqual(b.aggregator.domain("b.test").backend.messages, [])
        self.assertEqual(sender.backend.reports, [])
        for connection in b.connections:
            self.assertEqual(connection.receivablePairs, set())
        status = dict(a.status())
        self.assertIn("depth=50", status["queue.b.test"])
        # The last error says why: the DIALBACK_KEY went unanswered, or the
        # connection it waited on was closed idle.
        self.assertRegex(
            status["queue.b.test"], "no dial-back from b.test|no answer to DIALBACK_KEY|lost before an answer"
        )
        self.assertLessEqual(len(opened), 12)
        b.protocol = FederationProtocol
        for connection in list(b.connections):
            connection.transport.abortConnection()
        network.flush()
        a.outbox.retryNow("b.test")
        network.advance(30, step=1)
        self.assertEqual(b.aggregator.domain("b.test").backend.messages, records)
        self.assertEqual([r for _, r in sender.backend.reports], [None] * 50)
        print(f"\nsilent dial-back: 50 messages kept 600 s with {len(opened)} connections opened,"
              " then delivered in order")

    def successResultOf_(self, network, deferred):
        network.flush()
        return self.successResultOf(deferred)
