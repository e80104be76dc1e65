"""
Test support for the backend link: a link client joined to imxd's link
listener by an in-memory connection, either synchronous (every write is
read by the other side at once, so answers are there when a call returns)
or through a L{tests.network.Network}'s pumps.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import implementer

from imxd.backend.link import LinkBackend, LinkFactory
from imxd.link import LinkClient, LinkHandler
from imxd.wire import Message

#: A secret of the right length for tests.
SECRET = b"0123456789abcdef-test"


class RecordingHandler(LinkHandler):
    """
    A link handler that records what imxd hands it and answers from
    tables.
    """

    def __init__(self):
        self.messages = []
        self.notifications = []
        self.reports = []
        self.changes = []
        self.requests = []
        self.decision = "granted"
        self.attributes = {}
        self.refuseWith = None

    def deliverMessage(self, message):
        if self.refuseWith is not None:
            raise self.refuseWith
        self.messages.append(message)

    def deliverNotification(self, notification):
        self.notifications.append(notification)

    def decideSubscription(self, subscriber, publisher):
        self.requests.append((subscriber, publisher))
        return self.decision

    def subscriptionChanged(self, subscriber, publisher, state):
        self.changes.append((subscriber, publisher, state))

    def userAttributes(self, user, requester):
        return dict(self.attributes.get(user, {}))

    def deliveryReport(self, report):
        self.reports.append(report)


class SynchronousTransport:
    """
    One end of an in-memory connection whose writes the other end reads at
    once.
    """

    disconnecting = False

    def __init__(self, host, peer):
        self.host, self.peer = host, peer
        self.protocol = None
        self.other = None
        self.paused = False
        self.producer = None
        self.open = False
        self._early = []

    def write(self, data):
        if self.disconnecting or self.other.disconnecting:
            return
        if not self.open:
            self._early.append(data)
            return
        self.other.protocol.dataReceived(data)

    def start(self):
        """
        Both ends are connected: deliver what was written before.
        """
        self.open = True
        early, self._early = self._early, []
        for data in early:
            self.write(data)

    def writeSequence(self, data):
        self.write(b"".join(data))

    def loseConnection(self):
        self.abortConnection()

    def abortConnection(self):
        if self.disconnecting:
            return
        self.disconnecting = self.other.disconnecting = True
        from twisted.internet.error import ConnectionDone

        from twisted.python.failure import Failure

        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.other.protocol.connectionLost(Failure(ConnectionDone()))

    def getPeer(self):
        return self.peer

    def getHost(self):
        return self.host

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False

    def stopProducing(self):
        pass

    def setTcpNoDelay(self, enabled):
        pass


def joinSynchronously(serverProtocol, clientProtocol):
    """
    Connect two protocols by L{SynchronousTransport}s and start them.
    """
    serverAddress = IPv4Address("TCP", "127.0.0.1", 5280)
    clientAddress = IPv4Address("TCP", "127.0.0.1", 40000)
    serverSide = SynchronousTransport(serverAddress, clientAddress)
    clientSide = SynchronousTransport(clientAddress, serverAddress)
    serverSide.other, clientSide.other = clientSide, serverSide
    serverSide.protocol, clientSide.protocol = serverProtocol, clientProtocol
    serverProtocol.makeConnection(serverSide)
    clientProtocol.makeConnection(clientSide)
    serverSide.start()
    clientSide.start()
    return serverProtocol


@implementer(IStreamClientEndpoint)
class CallableEndpoint:
    """
    A client endpoint that connects by calling C{connect(protocol)}, which
    joins the protocol to a server however the test likes.
    """

    def __init__(self, connect):
        self._connect = connect
        self.attempts = 0

    def connect(self, factory):
        self.attempts += 1
        protocol = factory.buildProtocol(None)
        try:
            self._connect(protocol)
        except Exception as e:
            return defer.fail(e)
        return defer.succeed(protocol)


def linkedBackend(domain, clock, handler=None, secret=SECRET):
    """
    A L{LinkBackend} for C{domain} with a L{LinkClient} joined to it
    synchronously (the client not started as a service: the connection is
    made at once).

    @return: C{(backend, client, serverProtocol)}.
    """
    backend = LinkBackend(domain, "tcp:5280", secret)
    factory = LinkFactory(clock, [backend])
    client = LinkClient(clock, CallableEndpoint(lambda p: None), {domain: secret},
                        handler or RecordingHandler())
    server = joinSynchronously(factory.buildProtocol(None), client.factory.buildProtocol(None))
    return backend, client, server


def message(sender, recipient, messageId, body=b"hello"):
    """
    @return: a plain-text L{Message}.
    """
    return Message(
        sender=sender,
        recipient=recipient,
        messageId=messageId,
        contentType="text/plain",
        body=body,
    )
