"""
Tests for the example link backend, C{docs/examples/echo_backend.py}: its
handler serves a domain of an in-memory federation through a link.
"""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.linking import SECRET, RecordingHandler, message
from tests.network import Network, linkClient, linkTable

#: Where the example is.
EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "echo_backend.py"


def loadExample():
    """
    @return: the example, imported from its path as a module.
    """
    spec = importlib.util.spec_from_file_location("echo_backend", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def contentOf(body):
    """
    @return: what follows the headers of a MIME body.
    """
    return body.split(b"\r\n\r\n", 1)[1]


class EchoBackendTests(SynchronousTestCase):
    """
    a.test on 127.0.0.2 is served by a recording link handler, b.test on
    127.0.0.3 by the example's echo handler; both link to their imxd.
    """

    def setUp(self):
        self.example = loadExample()
        self.output = io.StringIO()
        self.patch(sys, "stdout", self.output)
        self.network = Network()
        self.a = self.network.server("127.0.0.2", [linkTable("a.test", SECRET)])
        self.b = self.network.server("127.0.0.3", [linkTable("b.test", SECRET)])
        self.alice = RecordingHandler()
        self.echo = self.example.EchoHandler()
        self.clientA = linkClient(self.network, self.a, ["a.test"], self.alice, {"a.test": SECRET})
        self.clientB = linkClient(self.network, self.b, ["b.test"], self.echo, {"b.test": SECRET})
        self.echo.client = self.clientB

    def send(self, messageId, body=b"hello"):
        """
        Send a message from alice@a.test to bob@b.test through A's link and
        let the network settle.
        """
        sent = self.clientA.sendMessage(message("alice@a.test", "bob@b.test", messageId, body))
        self.network.flush()
        self.assertIsNone(self.successResultOf(sent))

    def test_echo(self):
        """
        A message to bob@b.test comes back to alice@a.test with the same
        content, from bob, under a new MESSAGE_ID; both messages are
        reported delivered, and the echo's report is printed.
        """
        self.send("m-1")
        [echo] = self.alice.messages
        self.assertEqual((echo.sender, echo.recipient), ("bob@b.test", "alice@a.test"))
        self.assertNotEqual(echo.messageId, "m-1")
        self.assertEqual(contentOf(echo.body), b"hello")
        self.assertIn(b"From: bob@b.test\r\nTo: alice@a.test\r\n", echo.body)
        self.assertEqual([(r.messageId, r.code) for r in self.alice.reports], [("m-1", None)])
        self.assertIn(f"{echo.messageId} to alice@a.test: delivered", self.output.getvalue())

    def test_headersReplaced(self):
        """
        The echo carries the original content only, under headers of its
        own.
        """
        self.send("m-1", b"From: alice@a.test\r\nTo: bob@b.test\r\n\r\nhi there")
        [echo] = self.alice.messages
        self.assertEqual(contentOf(echo.body), b"hi there")
        self.assertNotIn(b"From: alice@a.test", echo.body)

    def test_uniqueIds(self):
        """
        Each message gets an echo of its own, each under a different
        MESSAGE_ID.
        """
        for n in range(3):
            self.send(f"m-{n}")
        ids = {echo.messageId for echo in self.alice.messages}
        self.assertEqual(len(ids), 3)
        self.assertFalse(ids & {"m-0", "m-1", "m-2"})

    def test_echoIsNotEchoed(self):
        """
        An echo, or a failure report from a postmaster, is not echoed
        again, so two echo backends do not talk for ever.
        """
        self.send("m-1")
        [echo] = self.alice.messages
        self.assertIsNone(self.echo.echo(self.clientB, echo))
        report = message("postmaster@a.test", "bob@b.test", "r-1")
        self.assertIsNone(self.echo.echo(self.clientB, report))
        self.network.flush()
        self.assertEqual(len(self.alice.messages), 1)

    def test_echoThroughGivenClient(self):
        """
        L{EchoHandler.echo} sends through the client it is given.
        """
        sent = self.echo.echo(self.clientB, message("alice@a.test", "bob@b.test", "x-1"))
        self.network.flush()
        self.assertIsNone(self.successResultOf(sent))
        [echo] = self.alice.messages
        self.assertEqual(echo.sender, "bob@b.test")

    def test_subscriptionGranted(self):
        """
        A subscription to bob@b.test is granted by the echo backend, and
        alice's side hears the grant.
        """
        state = self.clientA.subscribe("alice@a.test", "bob@b.test")
        self.network.flush()
        self.assertEqual(self.successResultOf(state), "granted")
        self.assertIn(("alice@a.test", "bob@b.test", "granted"), self.alice.changes)
