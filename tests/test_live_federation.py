"""
Integration tests: real imxd processes federating on loopback through a
real DNS server (L{tests.live}).

A (a.test) on 127.0.0.2, B (b.test) on 127.0.0.3 and C (c.test and d.test)
on 127.0.0.4.  c.test's SRV records list a dead target before C.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import unittest

from imxd.imxctl import AdminError
from imxd.wire import DialbackKey, ErrorCode, Message
from tests.live import IMXCTL, DNSServer, Server, freePort, waitFor

DOMAINS = {"a.test": "A", "b.test": "B", "c.test": "C", "d.test": "C"}


def _message(sender, recipient, messageId):
    return Message(
        tag=1,
        sender=sender,
        recipient=recipient,
        messageId=messageId,
        contentType="text/plain",
        body=b"spoofed",
    )


class LiveFederation:
    """
    Start the DNS server and the servers named; stop them all by PID.
    """

    def startFederation(self, extra=()):
        self.base = tempfile.mkdtemp(prefix="imxd-live-")
        self.dns = DNSServer(self.base)
        self.servers = {
            "A": Server(self.base, "A", "127.0.0.2", ["a.test"]),
            "B": Server(self.base, "B", "127.0.0.3", ["b.test"]),
            "C": Server(self.base, "C", "127.0.0.4", ["c.test", "d.test"]),
        }
        for server in extra:
            self.servers[server.name] = server
        self.addCleanup(self.stopFederation)
        for domain, name in DOMAINS.items():
            self.dns.serve(self.servers[name], domain)
        self.dns.dead("c.test", "127.0.0.6", freePort("127.0.0.6"), priority=0)
        self.dns.start()
        for server in self.servers.values():
            server.start(self.dns.port)
        for server in self.servers.values():
            server.waitListening()

    def stopFederation(self):
        for server in self.servers.values():
            server.stop()
        self.dns.stop()
        for directory in {os.path.dirname(s.directory) for s in self.servers.values()}:
            shutil.rmtree(directory, ignore_errors=True)

    def server(self, address):
        return self.servers[DOMAINS[address.split("@")[1]]]

    def exchange(self, sender, recipient, body):
        """
        Send one message through the spools and wait until it is accepted.
        """
        server = self.server(sender)
        name = server.send(sender, recipient, body)
        server.waitSent(sender.split("@")[1], name)
        return name


class FederationTests(LiveFederation, unittest.TestCase):
    """
    Three servers, four domains, one DNS server.
    """

    def setUp(self):
        self.startFederation()

    def test_everyPair(self):
        """
        Messages flow in both directions between every pair of domains,
        including the two domains C hosts (in process), and arrive once
        each, body intact.
        """
        addresses = ["alice@a.test", "bob@b.test", "carol@c.test", "dave@d.test"]
        sent = []
        for sender in addresses:
            for recipient in addresses:
                if sender != recipient:
                    body = f"from {sender} to {recipient} " + "x" * 2000
                    self.server(sender).send(sender, recipient, body)
                    sent.append((sender, recipient, body))
        for sender, recipient, body in sent:
            domain = recipient.split("@")[1]

            def arrived(domain=domain, sender=sender, body=body):
                return [
                    m
                    for m in self.server(recipient).inbox(domain)
                    if m["from"] == sender and m["body"] == body
                ]

            self.assertEqual(len(waitFor(arrived, f"{sender} -> {recipient}")), 1)
        for domain, name in DOMAINS.items():
            self.assertEqual(len(self.servers[name].inbox(domain)), 3)

    def test_severalPairsOnOneConnection(self):
        """
        C's two domains reach a.test over one connection, each pair
        authenticated by dial-back on it.
        """
        self.exchange("carol@c.test", "alice@a.test", "one")
        self.exchange("dave@d.test", "alice@a.test", "two")
        status = self.servers["A"].status()
        inbound = [v for k, v in status.items() if k.startswith("inbound.")]
        self.assertIn("c.test->a.test d.test->a.test", inbound)
        self.assertEqual(self.servers["C"].status()["peer.a.test"], "1")

    def test_spoofedOriginRefused(self):
        """
        A connection claiming a.test without being it: B dials the real
        a.test, which does not confirm the key; the KEY is refused and the
        Data sent after it is refused too and never delivered.
        """
        peer = self.servers["B"].raw(toDomain="b.test")
        with self.assertRaises(AdminError) as caught:
            peer.request(
                DialbackKey(tag=1, fromDomain="a.test", toDomain="b.test", token=b"\x01" * 80)
            )
        self.assertEqual(caught.exception.error.code, ErrorCode.DIALBACK_FAILED)
        with self.assertRaises(AdminError) as caught:
            peer.request(_message("mallory@a.test", "bob@b.test", "spoof-1"))
        self.assertEqual(caught.exception.error.code, ErrorCode.NOT_AUTHENTICATED)
        peer.close()
        self.exchange("alice@a.test", "bob@b.test", "genuine")
        self.assertEqual(
            [m["body"] for m in self.servers["B"].inbox("b.test")], ["genuine"]
        )

    def test_relayRefused(self):
        """
        Data for a domain B does not host is refused with relay-denied and
        never forwarded.
        """
        peer = self.servers["B"].raw()
        with self.assertRaises(AdminError) as caught:
            peer.request(_message("mallory@a.test", "carol@c.test", "relay-1"))
        self.assertEqual(caught.exception.error.code, ErrorCode.RELAY_DENIED)
        peer.close()
        self.exchange("alice@a.test", "carol@c.test", "genuine")
        self.assertEqual(
            [m["body"] for m in self.servers["C"].inbox("c.test")], ["genuine"]
        )

    def test_srvFailover(self):
        """
        c.test's first SRV target is down; messages still arrive through
        the second.
        """
        self.exchange("alice@a.test", "carol@c.test", "via the second target")
        self.assertEqual(len(self.servers["C"].inbox("c.test")), 1)
        self.assertIn(
            "could not connect to c.test at dead-127-0-0-6.test",
            self.servers["A"].output(),
        )

    def test_peerRestarted(self):
        """
        B is killed and restarted; A reaches it again on demand.
        """
        self.exchange("alice@a.test", "bob@b.test", "before")
        b = self.servers["B"]
        b.stop(signal.SIGKILL)
        b.start(self.dns.port)
        b.waitListening()
        self.exchange("alice@a.test", "bob@b.test", "after")
        self.assertEqual([m["body"] for m in b.inbox("b.test")], ["before", "after"])


class DrainTests(LiveFederation, unittest.TestCase):
    """
    A drained server's peers move to the redirect address.
    """

    def setUp(self):
        self.b2 = Server(tempfile.mkdtemp(prefix="imxd-live-b2-"), "B2", "127.0.0.5", ["b.test"])
        self.startFederation(extra=[self.b2])

    def test_drain(self):
        """
        After C{imxctl drain} on B, A's next message for b.test reaches B2
        (over a new connection, authenticated again), and B refuses new
        connections.
        """
        b = self.servers["B"]
        self.exchange("alice@a.test", "bob@b.test", "to B")
        drained = subprocess.run(
            [*IMXCTL, "-s", b.adminSocket(), "drain", "127.0.0.5", str(self.b2.port),
             "--text", "maintenance"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        self.assertEqual(drained.returncode, 0, drained.stderr)
        waitFor(
            lambda: self.servers["A"].status().get("redirect.b.test"),
            "A to follow the redirect",
        )
        self.assertEqual(
            self.servers["A"].status()["redirect.b.test"], f"127.0.0.5:{self.b2.port}"
        )
        self.exchange("alice@a.test", "bob@b.test", "to B2")
        self.assertEqual([m["body"] for m in b.inbox("b.test")], ["to B"])
        self.assertEqual([m["body"] for m in self.b2.inbox("b.test")], ["to B2"])
        self.assertEqual(b.status()["state"], "draining")

        def refused():
            try:
                socket.create_connection((b.host, b.port), timeout=1.0).close()
                return False
            except OSError:
                return True

        waitFor(refused, "B to stop listening")
