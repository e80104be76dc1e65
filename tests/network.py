"""
An in-memory federation for unit tests: several imxd servers (each a real
L{Federation} over a real L{Aggregator} with memory backends), a fake DNS
and connections made of L{twisted.test.iosim} transports, all on one
L{Clock}.  Nothing touches the network or the global reactor.  The
transports run real TLS (pyOpenSSL memory BIOs) when a protocol calls
C{startTLS}, as the reactor's TCP transports do.
"""

from __future__ import annotations

import itertools

import attrs

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import ISSLTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.internet.task import Clock
from twisted.names import dns, error
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import alsoProvides

from imxd.aggregator import Aggregator
from imxd.config import LimitsConfig, QueueConfig, parseConfig
from imxd.dialback import DialbackSecrets, DialbackTokens
from imxd.discovery import Discovery
from imxd.federation import Federation
from imxd.peer import PeerProtocol, PeerSettings
from imxd.wire import Message

#: How many pump rounds L{Network.flush} runs at most.
MAX_ROUNDS = 10000


class FakeResolver:
    """
    Answers SRV look-ups from a table: C{{name: [(priority, weight, port,
    target), ...]}}; a name not in the table does not exist.
    """

    def __init__(self):
        self.records = {}
        self.lookups = []

    def lookupService(self, name, timeout=None):
        self.lookups.append(name)
        if name not in self.records:
            return defer.fail(error.DNSNameError(name))
        answers = [
            dns.RRHeader(
                name,
                dns.SRV,
                ttl=300,
                payload=dns.Record_SRV(priority, weight, port, target, ttl=300),
            )
            for priority, weight, port, target in self.records[name]
        ]
        return defer.succeed((answers, [], []))


class TLSTransport(iosim.FakeTransport):
    """
    An iosim transport whose C{startTLS} puts real TLS between the bytes
    and the protocol, the way L{twisted.internet._newtls} does for TCP.
    """

    TLS = False

    def __init__(self, protocol, isServer, hostAddress, peerAddress, clock):
        super().__init__(protocol, isServer, hostAddress, peerAddress)
        self.clock = clock

    def startTLS(self, contextFactory, beNormal=True):
        client = (not self.isServer) if beNormal else self.isServer
        factory = TLSMemoryBIOFactory(contextFactory, client, None, clock=self.clock)
        tlsProtocol = factory.protocol(factory, self.protocol, False)
        self.protocol = tlsProtocol
        self.getHandle = tlsProtocol.getHandle
        self.getPeerCertificate = tlsProtocol.getPeerCertificate
        alsoProvides(self, ISSLTransport)
        self.TLS = True
        tlsProtocol.makeConnection(_PlainSide(self))

    def write(self, data):
        if self.TLS:
            self.protocol.write(data)
        else:
            super().write(data)

    def loseConnection(self):
        if self.TLS:
            self.protocol.loseConnection()
        else:
            super().loseConnection()

    def abortConnection(self):
        if self.TLS:
            self.protocol.abortConnection()
        else:
            super().abortConnection()


class _PlainSide:
    """
    What the TLS layer writes to: the transport's own byte stream.
    """

    def __init__(self, transport):
        self._transport = transport

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def write(self, data):
        iosim.FakeTransport.write(self._transport, data)

    def writeSequence(self, data):
        self.write(b"".join(data))

    def loseConnection(self):
        iosim.FakeTransport.loseConnection(self._transport)

    def abortConnection(self):
        iosim.FakeTransport.abortConnection(self._transport)


class Network:
    """
    Servers by C{(host, port)}, joined by in-memory connections.
    """

    def __init__(self):
        self.clock = Clock()
        self.resolver = FakeResolver()
        self.servers = {}
        self.pumps = []
        self._ports = itertools.count(40000)

    def server(
        self,
        host,
        domains,
        port=5275,
        secret=None,
        limits=None,
        tls=None,
        database=None,
        queue=None,
        connect=None,
        randomness=None,
        writeBehind=0.0,
        **timeouts,
    ):
        """
        Start an imxd server at C{host:port} hosting C{domains} and publish
        C{_imx._tcp} SRV records for them.

        @param domains: domain names (memory backends), or whole
            C{[[domain]]} tables.
        @param tls: an L{imxd.tls.TLSPolicy}, or L{None} for no TLS.
        @param database: an L{imxd.store.Database} (a file one survives a
            "restart"), or L{None} for a fresh one in memory.
        @param queue: an L{imxd.config.QueueConfig}, or L{None} for the
            defaults.
        @param connect: the pool's connector, or L{None} for the network's.
        @param randomness: the outbox's jitter source, or L{None}.
        @param writeBehind: the queue's C{write_behind}, whatever C{queue}
            says: by default 0, so that a message submitted is written with
            the clock's next 0-delay call, as most tests expect.
        @return: its L{Federation}.
        """
        tables = [d if isinstance(d, dict) else {"name": d, "backend": "memory"} for d in domains]
        domains = [table["name"] for table in tables]
        config = parseConfig({"domain": tables}, "test.toml", ".")
        aggregator = Aggregator(config)
        settings = PeerSettings(
            hostedDomains=aggregator.hostedDomains(),
            handshakeTimeout=timeouts.get("handshake", 10.0),
            keepaliveInterval=timeouts.get("keepalive", 60.0),
            idleTimeout=timeouts.get("idle", 600.0),
        )
        federation = Federation(
            self.clock,
            settings,
            aggregator,
            DialbackTokens(secret or host.encode() * 4, f"node-{host}"),
            DialbackSecrets(lifetime=timeouts.get("dialback", 15.0)),
            Discovery(self.resolver, self.clock),
            connect if connect is not None else self.connector(host),
            limits or LimitsConfig(),
            dialbackTimeout=timeouts.get("dialback", 15.0),
            tls=tls,
            database=database,
            queue=attrs.evolve(queue or QueueConfig(), writeBehind=writeBehind),
        )
        if randomness is not None:
            federation.outbox.random = randomness
        aggregator.attachFederation(federation)
        aggregator.startService()
        federation.host = host
        self.servers[(host, port)] = federation
        for domain in domains:
            self.publish(domain, (0, 0, port, f"imx.{host}"))
        return federation

    def stop(self, server, port=5275):
        """
        Stop a server started by L{server}: its services (the backends,
        the outbox), its connections (the other side sees them lost), its
        database; and take it off the network.

        @raise AssertionError: stopping did not finish at once, or failed.
        """
        stopped = []
        defer.maybeDeferred(server.aggregator.stopService).addBoth(stopped.append)
        if len(stopped) != 1 or isinstance(stopped[0], Failure):
            raise AssertionError(f"stopping {server.host} gave {stopped!r}")
        for connection in list(server.connections):
            connection.transport.abortConnection()
        self.flush()
        self.servers.pop((server.host, port), None)
        server.database.close()

    def domain(self, address):
        """
        @return: the hosted domain of C{address} (an address or a domain),
            on whichever server hosts it.
        @raise KeyError: no server hosts it.
        """
        name = address.rsplit("@", 1)[-1]
        for server in self.servers.values():
            found = server.aggregator.domain(name)
            if found is not None:
                return found
        raise KeyError(address)

    def publish(self, domain, *records):
        """
        Replace the SRV records of C{domain}: C{(priority, weight, port,
        target)} tuples; the target C{imx.<ip>} names the server at C{ip}.
        """
        self.resolver.records[f"_imx._tcp.{domain}"] = list(records)

    def connector(self, fromHost):
        """
        @return: the C{connect(host, port, protocol)} of the server at
            C{fromHost}: target names C{imx.<ip>} resolve to C{<ip>}.
        """

        def connect(host, port, protocol):
            ip = host[len("imx.") :] if host.startswith("imx.") else host
            server = self.servers.get((ip, port))
            if server is None:
                return defer.fail(ConnectionRefusedError(f"{ip}:{port}"))
            self.connect(server, protocol, fromHost, ip, port)
            return defer.succeed(protocol)

        return connect

    def connect(self, server, protocol, fromHost, ip, port):
        """
        Join C{protocol} (the client) to a new connection of C{server}.
        """
        clientAddress = IPv4Address("TCP", fromHost, next(self._ports))
        serverAddress = IPv4Address("TCP", ip, port)
        serverProtocol = server.buildProtocol(clientAddress)
        return self.join(serverProtocol, protocol, serverAddress, clientAddress)

    def join(self, serverProtocol, protocol, serverAddress, clientAddress):
        """
        Join two protocols by an in-memory connection pumped by L{flush}.

        @return: C{serverProtocol}.
        """
        pump = iosim.connect(
            serverProtocol,
            TLSTransport(serverProtocol, True, serverAddress, clientAddress, self.clock),
            protocol,
            TLSTransport(protocol, False, clientAddress, serverAddress, self.clock),
            greet=False,
            clock=self.clock,
        )
        self.pumps.append(pump)
        return serverProtocol

    def answer(self, protocol, record):
        """
        Send a request from C{protocol}, let the network run, and return
        its answer: a record, or the L{RemoteError} of an ERROR.

        @raise AssertionError: no answer came.
        """
        answer = protocol.request(record)
        self.flush()
        results = []
        answer.addBoth(results.append)
        if len(results) != 1:
            raise AssertionError(f"no answer to {type(record).__name__}")
        result = results[0]
        return result.value if hasattr(result, "value") else result

    def flush(self):
        """
        Move bytes on every connection until none moves.
        """
        for _ in range(MAX_ROUNDS):
            # What is due now (the stores' grouped commits) runs first.
            moved = bool(self.clock.getDelayedCalls()) and any(
                call.getTime() <= self.clock.seconds() for call in self.clock.getDelayedCalls()
            )
            self.clock.advance(0)
            for pump in list(self.pumps):
                moved = pump.pump() or moved
            if not moved:
                return
        raise AssertionError("the network never went quiet")

    def advance(self, seconds, step=1.0):
        """
        Let C{seconds} pass in steps, moving bytes after each.
        """
        remaining = seconds
        while remaining > 0:
            self.clock.advance(min(step, remaining))
            remaining -= step
            self.flush()


class Stranger(PeerProtocol):
    """
    A peer that speaks raw IMX at a server and records what comes back:
    for sending forged and out-of-order records.
    """

    def __init__(self, factory):
        super().__init__(factory, originator=True)
        self.received = []

    def _dispatch(self, record):
        self.received.append(record)
        super()._dispatch(record)


def message(sender, recipient, messageId="m1", body=b"hello"):
    """
    @return: a MESSAGE record.
    """
    return Message(
        sender=sender,
        recipient=recipient,
        messageId=messageId,
        contentType="text/plain; charset=utf-8",
        body=body,
    )


def linkTable(domain, secret):
    """
    @return: the C{[[domain]]} table of a domain served by the C{link}
        backend with C{secret}.
    """
    return {
        "name": domain,
        "backend": "link",
        "backend_options": {"listen": "tcp:5280", "secret": secret.decode()},
    }


def linkClient(network, server, domains, handler, secrets, **options):
    """
    Start a L{imxd.link.LinkClient} for C{domains} hosted on C{server} (a
    L{Federation} from L{Network.server}), connected through the network's
    pumps and reconnecting on its clock.

    @param secrets: the secret of each domain, by domain (a wrong one tests
        refusals).
    @param options: further keyword arguments of L{LinkClient}.
    @return: the started client; C{client.endpoint.attempts} counts its
        connection attempts.
    """
    from imxd.backend.link import LinkFactory
    from imxd.link import LinkClient
    from tests.linking import CallableEndpoint

    factory = LinkFactory(
        network.clock, [server.aggregator.domain(domain).backend for domain in domains]
    )

    def connect(protocol):
        serverAddress = IPv4Address("TCP", server.host, 5280)
        clientAddress = IPv4Address("TCP", "127.0.0.1", next(network._ports))
        network.join(factory.buildProtocol(clientAddress), protocol, serverAddress, clientAddress)

    endpoint = CallableEndpoint(connect)
    client = LinkClient(network.clock, endpoint, secrets, handler, **options)
    client.endpoint = endpoint
    client.startService()
    network.flush()
    return client
