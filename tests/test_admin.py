"""
Tests for L{imxd.admin} (the admin endpoint's protocol, on in-memory
connections to a real L{imxd.federation.Federation}) and L{imxd.imxctl}
(the operator's command, its errors and its output).
"""

from __future__ import annotations

import io
import os
import socket
import sys

from twisted.application import service
from twisted.internet.address import UNIXAddress
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from imxd import imxctl
from imxd.admin import ADMIN_IDLE, AdminFactory, AdminProtocol
from imxd.federation import FederationProtocol
from imxd.peer import PeerFactory, PeerProtocol, PeerSettings, PeerState, RemoteError
from imxd.wire import (
    Ack,
    Close,
    Drain,
    ErrorCode,
    Redirect,
    Status,
    StatusResult,
)
from tests.network import Network, Stranger, message


class RecordingService(service.Service):
    """
    A child service of the aggregator that counts how often it is
    stopped.
    """

    def __init__(self, name):
        self.setName(name)
        self.stops = 0

    def stopService(self):
        self.stops += 1
        return super().stopService()


class AdminTestsMixin:
    """
    A server hosting a.test at 10.0.0.1 on an in-memory network, its admin
    factory, and helpers to talk to it as imxctl does.
    """

    def setUp(self):
        self.network = Network()
        self.federation = self.network.server("10.0.0.1", ["a.test"])
        self.aggregator = self.federation.aggregator
        self.admin = AdminFactory(
            self.network.clock, self.federation.settings, self.aggregator
        )

    def connectAdmin(self):
        """
        Open an admin connection from a raw IMX client and finish HELLO.

        @return: the client (a L{Stranger}, which records what it receives).
        """
        client = Stranger(PeerFactory(self.network.clock, PeerSettings()))
        serverAddress = UNIXAddress("admin.sock")
        clientAddress = UNIXAddress(None)
        server = self.admin.buildProtocol(serverAddress)
        self.assertIsInstance(server, AdminProtocol)
        self.network.join(server, client, serverAddress, clientAddress)
        self.network.flush()
        self.assertIs(client.state, PeerState.OPEN)
        return client

    def connectPeer(self):
        """
        Connect a raw IMX peer to the server's IMX listener (the
        federation) and finish HELLO.
        """
        peer = Stranger(PeerFactory(self.network.clock, PeerSettings()))
        self.network.connect(self.federation, peer, "10.6.6.6", "10.0.0.1", 5275)
        self.network.flush()
        self.assertIs(peer.state, PeerState.OPEN)
        return peer

    def ask(self, client, record):
        """
        Send a request and return its answer: a record, or the
        L{RemoteError} of an ERROR.
        """
        return self.network.answer(client, record)

    def status(self, client):
        """
        @return: the STATUS answer as a C{{name: value}} dict.
        """
        answer = self.ask(client, Status())
        self.assertIsInstance(answer, StatusResult)
        lines = {}
        for line in answer.attributes:
            name, equals, value = line.partition("=")
            self.assertEqual(equals, "=", line)
            self.assertNotIn(name, lines)
            lines[name] = value
        return lines


class AdminProtocolTests(AdminTestsMixin, SynchronousTestCase):
    """
    The admin endpoint serves STATUS and DRAIN and nothing else.
    """

    def test_settings(self):
        """
        Admin connections use the server's settings with the idle timeout
        replaced by L{ADMIN_IDLE}; the federation's own settings are left
        alone.
        """
        self.assertEqual(self.admin.settings.idleTimeout, ADMIN_IDLE)
        self.assertEqual(
            self.admin.settings.hostedDomains, self.federation.settings.hostedDomains
        )
        self.assertEqual(
            self.admin.settings.maxRecordSize, self.federation.settings.maxRecordSize
        )
        self.assertEqual(self.federation.settings.idleTimeout, 600.0)
        self.assertIs(self.admin.aggregator, self.aggregator)

    def test_status(self):
        """
        STATUS is answered with STATUS_RESULT, with the request's tag,
        whose C{name=value} lines say the server is serving and which
        domains it hosts.
        """
        client = self.connectAdmin()
        answer = self.ask(client, Status())
        self.assertIsInstance(answer, StatusResult)
        self.assertTrue(answer.response)
        self.assertIn("state=serving", answer.attributes)
        self.assertIn("domains=a.test", answer.attributes)
        self.assertIn("connections-inbound=0", answer.attributes)
        self.assertFalse([a for a in answer.attributes if a.startswith("redirect-to=")])

    def test_statusCounts(self):
        """
        The STATUS lines follow the federation: its inbound connections and
        counters are reported, and admin connections are not counted as
        peers.
        """
        client = self.connectAdmin()
        self.connectPeer()
        lines = self.status(client)
        self.assertEqual(lines["connections-inbound"], "1")
        self.assertEqual(lines["count.handshakes"], "1")
        self.assertEqual(len(self.admin.connections), 1)

    def test_drain(self):
        """
        DRAIN is answered with ACK listing its tag; it sets the federation
        draining to C{(host, port)}, stops the aggregator's children named
        C{imx-listener-*} (and only those), and STATUS then says
        C{state=draining} and C{redirect-to=HOST:PORT}.
        """
        listeners = [RecordingService(f"imx-listener-{n}") for n in range(2)]
        others = [RecordingService("admin"), RecordingService("listener-x")]
        for child in listeners + others:
            child.setServiceParent(self.aggregator)
        self.assertTrue(all(child.running for child in listeners + others))
        client = self.connectAdmin()

        client.sendRecord(Drain(tag=42, host="10.0.0.9", port=5300, text="upgrade"))
        self.network.flush()
        answers = [r for r in client.received if r.response]
        self.assertEqual(answers, [Ack(tags=(42,))])

        self.assertEqual(self.federation.draining, ("10.0.0.9", 5300))
        self.assertEqual([child.stops for child in listeners], [1, 1])
        self.assertFalse(any(child.running for child in listeners))
        self.assertEqual([child.stops for child in others], [0, 0])
        self.assertTrue(all(child.running for child in others))
        self.assertTrue(self.aggregator.domain("a.test").running)

        lines = self.status(client)
        self.assertEqual(lines["state"], "draining")
        self.assertEqual(lines["redirect-to"], "10.0.0.9:5300")
        self.assertIs(client.state, PeerState.OPEN)

    def test_drainRedirectsPeers(self):
        """
        DRAIN sends REDIRECT with its host, port and text on every peer
        connection, but not on the admin connection.
        """
        peer = self.connectPeer()
        client = self.connectAdmin()
        self.ask(client, Drain(host="10.0.0.9", port=5300, text="upgrade"))
        redirects = [r for r in peer.received if isinstance(r, Redirect)]
        self.assertEqual(
            [(r.host, r.port, r.text) for r in redirects], [("10.0.0.9", 5300, "upgrade")]
        )
        self.assertFalse([r for r in client.received if isinstance(r, Redirect)])

    def test_dataRefused(self):
        """
        A Data record (MESSAGE) sent to the admin endpoint is refused with
        a permanent ERROR carrying its tag; it is not delivered to the
        hosted domain, and the connection goes on serving STATUS.
        """
        client = self.connectAdmin()
        answer = self.ask(client, message("bob@b.test", "alice@a.test"))
        self.assertIsInstance(answer, RemoteError)
        self.assertEqual(answer.code, ErrorCode.UNSUPPORTED)
        self.assertEqual(self.aggregator.domain("a.test").backend.messages, [])
        self.assertEqual(self.admin.counters["records-refused"], 1)
        self.assertIs(client.state, PeerState.OPEN)
        self.assertEqual(self.status(client)["state"], "serving")

    def test_notOnPeerConnections(self):
        """
        DRAIN and STATUS are refused as unsupported on the IMX listener's
        connections: a peer cannot drain the server or read its status.
        Only the admin protocol's state table serves them.
        """
        for protocol in (PeerProtocol, FederationProtocol):
            table = protocol.stateTables[PeerState.OPEN]
            self.assertNotIn(Drain, table)
            self.assertNotIn(Status, table)
        peer = self.connectPeer()
        answer = self.ask(peer, Drain(host="10.6.6.6", port=5275))
        self.assertIsInstance(answer, RemoteError)
        self.assertEqual(answer.code, ErrorCode.UNSUPPORTED)
        self.assertIsNone(self.federation.draining)
        answer = self.ask(peer, Status())
        self.assertIsInstance(answer, RemoteError)
        self.assertEqual(answer.code, ErrorCode.UNSUPPORTED)
        self.assertFalse([r for r in peer.received if isinstance(r, StatusResult)])

    def test_idle(self):
        """
        An admin connection left without requests is closed in order
        after L{ADMIN_IDLE} seconds, not after the peers' idle timeout.
        """
        client = self.connectAdmin()
        self.network.advance(ADMIN_IDLE - 10, step=10.0)
        self.assertFalse([r for r in client.received if isinstance(r, Close)])
        self.network.advance(20, step=10.0)
        self.assertTrue([r for r in client.received if isinstance(r, Close)])


class FakeSocket:
    """
    What L{imxctl.BlockingPeer} needs of a socket, joined in memory to a
    protocol: bytes sent are handed to the protocol at once, and C{recv}
    returns what the protocol wrote.
    """

    def __init__(self, protocol):
        self.protocol = protocol
        self.transport = StringTransport()
        self.closed = False
        protocol.makeConnection(self.transport)
        self._read = 0

    def sendall(self, data):
        self.protocol.dataReceived(data)

    def recv(self, size):
        data = self.transport.value()[self._read : self._read + size]
        self._read += len(data)
        return data

    def close(self):
        self.closed = True


class ImxctlTests(AdminTestsMixin, SynchronousTestCase):
    """
    L{imxctl.main} prints the answer, or one line of error and exits 1.
    """

    def setUp(self):
        super().setUp()
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.stdout = io.StringIO()
        self.stderr = io.StringIO()
        self.patch(sys, "stdout", self.stdout)
        self.patch(sys, "stderr", self.stderr)
        self.paths = []
        self.sockets = []

    def useAdmin(self):
        """
        Make imxctl's connections reach this test's admin factory in memory,
        recording the socket paths it asks for.
        """

        def unix(path, timeout=imxctl.TIMEOUT):
            self.paths.append(path)
            socket = FakeSocket(self.admin.buildProtocol(UNIXAddress(path)))
            self.sockets.append(socket)
            return imxctl.BlockingPeer(socket)

        self.patch(imxctl.BlockingPeer, "unix", staticmethod(unix))

    def write(self, name, text):
        path = os.path.join(self.base, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def assertOneError(self, argv, *parts):
        """
        Assert that imxctl with C{argv} exits 1, printing nothing on
        standard output and one line beginning with C{imxctl:} on standard
        error that contains every one of C{parts}.

        @return: that line.
        """
        self.assertEqual(imxctl.main(argv), 1)
        self.assertEqual(self.stdout.getvalue(), "")
        error = self.stderr.getvalue()
        self.assertTrue(error.endswith("\n"), repr(error))
        self.assertEqual(error.count("\n"), 1, repr(error))
        self.assertTrue(error.startswith("imxctl: "), repr(error))
        for part in parts:
            self.assertIn(part, error)
        return error

    def test_socketMissing(self):
        """
        A socket that does not exist gives one line of error naming it;
        the working directory is left as it was.
        """
        here = os.getcwd()
        path = os.path.join(self.base, "admin.sock")
        self.assertOneError(["-s", path, "status"], path, "cannot connect")
        self.assertEqual(os.getcwd(), here)

    def test_socketMissingDrain(self):
        """
        The same holds for C{drain}.
        """
        path = os.path.join(self.base, "admin.sock")
        self.assertOneError(["-s", path, "drain", "10.0.0.9", "5275"], path)

    def test_socketDirectoryMissing(self):
        """
        A socket path in a directory that does not exist gives one line of
        error naming it (and leaves the working directory as it was).
        """
        here = os.getcwd()
        path = os.path.join(self.base, "nodir", "admin.sock")
        self.assertOneError(["-s", path, "status"], path)
        self.assertEqual(os.getcwd(), here)

    def test_notASocket(self):
        """
        A path that is a regular file, not a socket, gives one line of
        error naming it.
        """
        path = self.write("admin.sock", "")
        self.assertOneError(["-s", path, "status"], path)

    def test_serverGone(self):
        """
        A server that closes before imxctl writes gives L{AdminError}, not
        a broken pipe.
        """
        ours, theirs = socket.socketpair()
        theirs.close()
        self.addCleanup(ours.close)
        self.assertRaises(imxctl.AdminError, imxctl.BlockingPeer, ours)

    def test_configMissing(self):
        """
        A configuration file that does not exist gives one line of error
        naming it.
        """
        self.assertFalse(os.path.exists("missing.toml"))
        self.assertOneError(["-c", "missing.toml", "status"], "missing.toml", "not found")

    def test_configInvalid(self):
        """
        A configuration file that is not valid gives one line of error
        naming it.
        """
        path = self.write("imxd.toml", "[server\n")
        self.assertOneError(["-c", path, "status"], path)

    def test_configSocket(self):
        """
        With C{-c}, the socket is C{server.admin_socket} from the
        configuration, by default C{admin.sock} in the state directory,
        taken relative to the configuration file.
        """
        os.makedirs(os.path.join(self.base, "state"))
        path = self.write(
            "imxd.toml",
            '[server]\nstate_dir = "state"\n\n'
            '[[domain]]\nname = "a.test"\nbackend = "memory"\n',
        )
        socketPath = os.path.join(self.base, "state", "admin.sock")
        self.assertOneError(["-c", path, "status"], socketPath)
        self.useAdmin()
        self.stderr.seek(0)
        self.stderr.truncate(0)
        self.assertEqual(imxctl.main(["-c", path, "status"]), 0)
        self.assertEqual(self.paths, [socketPath])

    def test_usage(self):
        """
        Bad command lines are refused by the argument parser (exit status
        2): C{-c} with C{-s}, no command, a port that is not a number.
        """
        for argv in (
            ["-c", "x.toml", "-s", "y.sock", "status"],
            [],
            ["-s", "y.sock", "drain", "10.0.0.9", "port"],
            ["-s", "y.sock", "drain", "10.0.0.9"],
        ):
            error = self.assertRaises(SystemExit, imxctl.main, argv)
            self.assertEqual(error.code, 2)

    def test_status(self):
        """
        C{status} prints the server's STATUS lines, one per line, exits 0
        and closes the connection in order.
        """
        self.useAdmin()
        self.assertEqual(imxctl.main(["-s", "admin.sock", "status"]), 0)
        self.assertEqual(self.stderr.getvalue(), "")
        lines = self.stdout.getvalue().splitlines()
        self.assertIn("state=serving", lines)
        self.assertIn("domains=a.test", lines)
        self.assertEqual(self.paths, ["admin.sock"])
        (socket,) = self.sockets
        self.assertTrue(socket.closed)
        self.assertIs(socket.protocol.state, PeerState.CLOSED)

    def test_drain(self):
        """
        C{drain HOST PORT --text TEXT} drains the server and says so.
        """
        self.useAdmin()
        peer = self.connectPeer()
        argv = ["-s", "admin.sock", "drain", "10.0.0.9", "5300", "--text", "upgrade"]
        self.assertEqual(imxctl.main(argv), 0)
        self.assertEqual(self.stderr.getvalue(), "")
        self.assertEqual(
            self.stdout.getvalue(), "draining: peers redirected to 10.0.0.9:5300\n"
        )
        self.assertEqual(self.federation.draining, ("10.0.0.9", 5300))
        self.network.flush()
        redirects = [r for r in peer.received if isinstance(r, Redirect)]
        self.assertEqual([(r.host, r.port, r.text) for r in redirects], [("10.0.0.9", 5300, "upgrade")])

    def test_drainBadPort(self):
        """
        C{drain} with a port outside 1-65535 gives one line of error and
        does not drain the server.
        """
        self.useAdmin()
        for port in ("0", "65536"):
            self.stderr.seek(0)
            self.stderr.truncate(0)
            self.assertOneError(["-s", "admin.sock", "drain", "10.0.0.9", port], port)
        self.assertIsNone(self.federation.draining)
