"""
Tests for L{imxd.peer}: the connection life of L{PeerProtocol}, driven
through a L{StringTransport} and a L{Clock}.
"""

import attrs
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from imxd.peer import (
    CLOSE_GRACE,
    PeerFactory,
    PeerSettings,
    PeerState,
    RemoteError,
    negotiateVersion,
)
from imxd.wire import (
    MINIMUM_MAX_RECORD,
    PREAMBLE,
    Ack,
    Close,
    EncodeError,
    Error,
    ErrorCode,
    Field,
    Flag,
    FrameDecoder,
    Hello,
    Message,
    Ping,
    Pong,
    RecordType,
    Subscribe,
    UnknownRecord,
    decodeRecord,
    encodeRecord,
)
from imxd.wire.fields import FIELD_HEADER
from imxd.wire.framing import HEADER, HEADER_SIZE, encodeFrame

MESSAGE = Message(
    tag=7,
    sender="bob@b.example",
    recipient="alice@a.example",
    messageId="m-1",
    contentType="text/plain",
    body=b"hi",
)

SETTINGS = PeerSettings(
    handshakeTimeout=10.0, keepaliveInterval=60.0, idleTimeout=600.0
)


class RecordingTransport(StringTransport):
    """
    A L{StringTransport} that records C{setTcpNoDelay} and
    C{abortConnection}.
    """

    def __init__(self):
        super().__init__()
        self.noDelay = []
        self.aborted = False

    def setTcpNoDelay(self, enabled):
        self.noDelay.append(enabled)

    def abortConnection(self):
        self.aborted = True
        super().abortConnection()


def peerHello(**kwargs):
    """
    @return: a HELLO as a peer sends it.
    """
    values = dict(versionMin=1, versionMax=1, maxRecord=65536, software="peer")
    values.update(kwargs)
    return Hello(**values)


class PeerTestCase(SynchronousTestCase):
    """
    Connect a L{PeerProtocol} to a L{RecordingTransport} and read what it
    writes.
    """

    settings = SETTINGS

    def setUp(self):
        self.clock = Clock()
        self.factory = PeerFactory(
            self.clock, self.settings, capabilities=("dialback",)
        )
        self.proto = self.factory.buildProtocol(None)
        self.transport = RecordingTransport()
        self.proto.makeConnection(self.transport)
        self._reader = FrameDecoder(0xFFFFFFFF, expectPreamble=True)
        self._read = 0

    def written(self):
        """
        @return: the records written since the last call.
        """
        data = self.transport.value()
        new, self._read = data[self._read :], len(data)
        return [decodeRecord(frame) for frame in self._reader.feed(new)]

    def send(self, *records, preamble=False):
        """
        Deliver records from the peer.
        """
        data = b"".join(encodeRecord(r) for r in records)
        self.proto.dataReceived((PREAMBLE if preamble else b"") + data)

    def handshake(self, hello=None):
        """
        Deliver the peer's preamble and HELLO and discard our own HELLO.
        """
        self.send(hello or peerHello(), preamble=True)
        records = self.written()
        self.assertEqual([type(r) for r in records], [Hello])
        self.assertIs(self.proto.state, PeerState.OPEN)

    def assertRefused(self, code, tag=0):
        """
        Assert that exactly one ERROR with C{code} and C{tag} was written
        and the connection is being closed.
        """
        records = [r for r in self.written() if not isinstance(r, Hello)]
        self.assertEqual(len(records), 1, records)
        [error] = records
        self.assertIsInstance(error, Error)
        self.assertEqual(error.code, code)
        self.assertEqual(error.tag, tag)
        self.assertTrue(error.response)
        self.assertTrue(self.transport.disconnecting)
        self.assertIs(self.proto.state, PeerState.CLOSED)
        return error

    def assertAnsweredOpen(self, code, tag):
        """
        Assert that exactly one ERROR with C{code} and C{tag} was written
        and the connection stays open.
        """
        records = self.written()
        self.assertEqual(len(records), 1, records)
        [error] = records
        self.assertIsInstance(error, Error)
        self.assertEqual((error.code, error.tag), (code, tag))
        self.assertFalse(self.transport.disconnecting)
        self.assertIs(self.proto.state, PeerState.OPEN)
        return error


class NegotiateVersionTests(SynchronousTestCase):
    """
    Tests for L{negotiateVersion}.
    """

    def test_same(self):
        """
        Equal ranges give their highest version.
        """
        self.assertEqual(negotiateVersion((1, 1), (1, 1)), 1)
        self.assertEqual(negotiateVersion((1, 3), (1, 3)), 3)

    def test_overlap(self):
        """
        Overlapping ranges give the highest version in both, whichever side
        is which.
        """
        self.assertEqual(negotiateVersion((1, 3), (2, 5)), 3)
        self.assertEqual(negotiateVersion((2, 5), (1, 3)), 3)
        self.assertEqual(negotiateVersion((1, 1), (0, 9)), 1)

    def test_touching(self):
        """
        Ranges that share a single version give it.
        """
        self.assertEqual(negotiateVersion((1, 2), (2, 4)), 2)
        self.assertEqual(negotiateVersion((2, 4), (1, 2)), 2)

    def test_disjoint(self):
        """
        Ranges that do not meet give C{None}.
        """
        self.assertIsNone(negotiateVersion((1, 1), (2, 3)))
        self.assertIsNone(negotiateVersion((2, 3), (1, 1)))

    def test_invertedRange(self):
        """
        A range whose minimum exceeds its maximum meets nothing.
        """
        self.assertIsNone(negotiateVersion((1, 5), (3, 2)))
        self.assertIsNone(negotiateVersion((1, 1), (1, 0)))


class HandshakeTests(PeerTestCase):
    """
    The preamble and HELLO exchange.
    """

    def test_sendsPreambleAndHello(self):
        """
        On connect the protocol writes the preamble and a HELLO announcing
        version 1, its capabilities, maximum record size and software.
        """
        data = self.transport.value()
        self.assertTrue(data.startswith(PREAMBLE))
        [hello] = self.written()
        self.assertEqual(
            hello,
            Hello(
                versionMin=1,
                versionMax=1,
                capabilities=("dialback",),
                maxRecord=SETTINGS.maxRecordSize,
                software=SETTINGS.software,
            ),
        )
        self.assertEqual(hello.tag, 0)
        self.assertFalse(hello.response or hello.mustUnderstand)
        self.assertIs(self.proto.state, PeerState.AWAITING_HELLO)
        self.assertIsNone(self.proto.version)

    def test_tcpNoDelay(self):
        """
        On connect the protocol asks for TCP_NODELAY.
        """
        self.assertEqual(self.transport.noDelay, [True])

    def test_transportWithoutNoDelay(self):
        """
        A transport without C{setTcpNoDelay} is used as it is.
        """
        proto = self.factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        self.assertTrue(transport.value().startswith(PREAMBLE))

    def test_open(self):
        """
        After the peer's preamble and HELLO the connection is OPEN with
        version 1, and the peer's HELLO and limit are kept.
        """
        hello = peerHello(maxRecord=20000, capabilities=("starttls",))
        self.handshake(hello)
        self.assertEqual(self.proto.version, 1)
        self.assertEqual(self.proto.peerHello, hello)
        self.assertEqual(self.proto.sendLimit, 20000)
        self.assertEqual(self.factory.counters["handshakes"], 1)
        self.assertFalse(self.transport.disconnecting)

    def test_openByteByByte(self):
        """
        The peer's preamble and HELLO delivered one byte at a time open the
        connection.
        """
        data = PREAMBLE + encodeRecord(peerHello())
        for i in range(len(data)):
            self.assertIs(self.proto.state, PeerState.AWAITING_HELLO)
            self.proto.dataReceived(data[i : i + 1])
        self.assertIs(self.proto.state, PeerState.OPEN)
        self.assertEqual(self.proto.version, 1)

    def test_overlappingRange(self):
        """
        A peer offering versions 1 to 5 is spoken to in version 1.
        """
        self.handshake(peerHello(versionMin=1, versionMax=5))
        self.assertEqual(self.proto.version, 1)

    def test_noCommonVersion(self):
        """
        A peer offering only versions 2 to 3 is refused with ERROR
        version-unsupported and the connection is closed.
        """
        self.send(peerHello(versionMin=2, versionMax=3), preamble=True)
        error = self.assertRefused(ErrorCode.VERSION_UNSUPPORTED)
        self.assertIn("1", error.text)
        self.assertIsNone(self.proto.version)

    def test_smallMaxRecord(self):
        """
        A HELLO announcing a maximum record below 16384 is refused with
        ERROR malformed.
        """
        self.send(peerHello(maxRecord=MINIMUM_MAX_RECORD - 1), preamble=True)
        self.assertRefused(ErrorCode.MALFORMED)

    def test_minimumMaxRecord(self):
        """
        A HELLO announcing exactly 16384 is accepted.
        """
        self.handshake(peerHello(maxRecord=MINIMUM_MAX_RECORD))
        self.assertEqual(self.proto.sendLimit, MINIMUM_MAX_RECORD)

    def test_notIMX(self):
        """
        An HTTP request instead of the preamble is refused with ERROR
        not-imx and the connection is closed.
        """
        self.proto.dataReceived(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        self.assertRefused(ErrorCode.NOT_IMX)
        self.assertEqual(self.factory.counters["connections-refused"], 1)

    def test_refusedConnectionAborted(self):
        """
        A refused connection whose last bytes do not drain is aborted after
        the grace period.
        """
        self.proto.dataReceived(b"GET / HTTP/1.1\r\n")
        self.clock.advance(CLOSE_GRACE - 0.01)
        self.assertFalse(self.transport.aborted)
        self.clock.advance(0.01)
        self.assertTrue(self.transport.aborted)

    def test_refusedConnectionLostInTime(self):
        """
        A refused connection that goes away within the grace period is not
        aborted.
        """
        self.proto.dataReceived(b"GET / HTTP/1.1\r\n")
        self.proto.connectionLost(Failure(ConnectionDone()))
        self.clock.advance(CLOSE_GRACE * 2)
        self.assertFalse(self.transport.aborted)

    def test_nothingAfterRefusal(self):
        """
        Bytes that arrive after the connection was refused are ignored.
        """
        self.proto.dataReceived(b"GET / HTTP/1.1\r\n")
        self.written()
        self.proto.dataReceived(PREAMBLE + encodeRecord(peerHello()))
        self.assertEqual(self.written(), [])
        self.assertIs(self.proto.state, PeerState.CLOSED)

    def test_recordTooLarge(self):
        """
        A header announcing 4 GiB is refused with ERROR record-too-large
        carrying its tag, and the connection is closed.
        """
        header = HEADER.pack(0xFFFFFFFF, RecordType.MESSAGE, 0, 9)
        self.proto.dataReceived(PREAMBLE + header)
        self.assertRefused(ErrorCode.RECORD_TOO_LARGE, tag=9)
        self.proto.dataReceived(b"\0" * 65536)
        self.assertEqual(self.written(), [])

    def test_recordTooLargeAfterHello(self):
        """
        A record above our announced maximum is refused on an open
        connection too.
        """
        self.handshake()
        self.proto.dataReceived(
            HEADER.pack(SETTINGS.maxRecordSize + 1, RecordType.MESSAGE, 0, 3)
        )
        self.assertRefused(ErrorCode.RECORD_TOO_LARGE, tag=3)

    def test_handshakeTimeout(self):
        """
        Without the peer's HELLO within the handshake timeout the connection
        is refused with ERROR timeout and closed.
        """
        self.written()
        self.clock.advance(SETTINGS.handshakeTimeout - 0.01)
        self.assertEqual(self.written(), [])
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.01)
        self.assertRefused(ErrorCode.TIMEOUT)

    def test_handshakeTimeoutPartialHello(self):
        """
        A HELLO still incomplete at the handshake timeout does not save the
        connection.
        """
        data = PREAMBLE + encodeRecord(peerHello())
        self.proto.dataReceived(data[:-1])
        self.clock.advance(SETTINGS.handshakeTimeout)
        self.assertRefused(ErrorCode.TIMEOUT)

    def test_noTimeoutAfterHello(self):
        """
        Once HELLO is done the handshake timeout no longer applies.
        """
        self.handshake()
        self.clock.advance(SETTINGS.handshakeTimeout * 2)
        self.assertEqual(self.written(), [])
        self.assertFalse(self.transport.disconnecting)

    def test_dataBeforeHello(self):
        """
        A Data record before HELLO is refused with ERROR bad-sequence
        carrying its tag, and the connection is closed.
        """
        self.send(MESSAGE, preamble=True)
        self.assertRefused(ErrorCode.BAD_SEQUENCE, tag=7)

    def test_pingBeforeHello(self):
        """
        A PING before HELLO is refused with ERROR bad-sequence.
        """
        self.send(Ping(tag=4), preamble=True)
        self.assertRefused(ErrorCode.BAD_SEQUENCE, tag=4)

    def test_closeBeforeHello(self):
        """
        CLOSE before HELLO is answered with CLOSE and the connection closes.
        """
        self.send(Close(), preamble=True)
        records = [r for r in self.written() if not isinstance(r, Hello)]
        self.assertEqual(records, [Close()])
        self.assertTrue(self.transport.disconnecting)

    def test_errorBeforeHello(self):
        """
        An untagged ERROR before HELLO is noted and does not close the
        connection by itself.
        """
        self.send(Error(code=ErrorCode.SHUTTING_DOWN), preamble=True)
        self.assertEqual(self.factory.counters["errors-received"], 1)
        self.assertIs(self.proto.state, PeerState.AWAITING_HELLO)

    def test_secondHello(self):
        """
        A second HELLO is refused with ERROR bad-sequence and the connection
        is closed.
        """
        self.handshake()
        self.send(peerHello())
        self.assertRefused(ErrorCode.BAD_SEQUENCE)

    def test_helloAndDataInOneSegment(self):
        """
        Records that follow HELLO in the same segment are handled in the
        OPEN state.
        """
        data = PREAMBLE + encodeRecord(peerHello()) + encodeRecord(Ping(tag=5))
        self.proto.dataReceived(data)
        records = self.written()
        self.assertEqual(records[1:], [Pong(tag=5, response=True)])
        self.assertIs(self.proto.state, PeerState.OPEN)

    def test_sendLimitBeforeHello(self):
        """
        Before the peer's HELLO nothing larger than 16384 bytes of body is
        sent; afterwards the peer's limit applies.
        """
        big = attrs.evolve(MESSAGE, body=b"x" * MINIMUM_MAX_RECORD)
        self.assertRaises(EncodeError, self.proto.sendRecord, big)
        self.handshake(peerHello(maxRecord=65536))
        self.proto.sendRecord(big)
        self.assertEqual(self.written(), [big])
        huge = attrs.evolve(MESSAGE, body=b"x" * 65536)
        self.assertRaises(EncodeError, self.proto.sendRecord, huge)

    def test_factoryTracksConnections(self):
        """
        The factory knows its live connections.
        """
        self.assertIn(self.proto, self.factory.connections)
        self.assertEqual(self.factory.counters["connections-opened"], 1)
        self.proto.connectionLost(Failure(ConnectionDone()))
        self.assertNotIn(self.proto, self.factory.connections)
        self.assertIs(self.proto.state, PeerState.CLOSED)


class OpenConnectionTests(PeerTestCase):
    """
    Records on an OPEN connection.
    """

    def setUp(self):
        super().setUp()
        self.handshake()

    def test_dataNotAuthenticated(self):
        """
        A Data record is refused with ERROR not-authenticated carrying its
        tag, and the connection stays open.
        """
        self.send(MESSAGE)
        self.assertAnsweredOpen(ErrorCode.NOT_AUTHENTICATED, 7)
        self.assertEqual(self.factory.counters["records-refused"], 1)

    def test_everyDataTypeNotAuthenticated(self):
        """
        Every Data request is refused as not authenticated.
        """
        self.send(Subscribe(tag=3, subscriber="b@b.example", publisher="a@a.example"))
        self.assertAnsweredOpen(ErrorCode.NOT_AUTHENTICATED, 3)

    def test_ping(self):
        """
        PING is answered by PONG with the same tag and the RESPONSE flag.
        """
        self.send(Ping(tag=0xFFFFFFFF))
        [pong] = self.written()
        self.assertIsInstance(pong, Pong)
        self.assertEqual(pong.tag, 0xFFFFFFFF)
        self.assertTrue(pong.response)

    def test_severalPings(self):
        """
        Several PINGs in one segment are each answered, in order.
        """
        self.send(Ping(tag=1), Ping(tag=2), Ping(tag=3))
        self.assertEqual([r.tag for r in self.written()], [1, 2, 3])

    def test_close(self):
        """
        CLOSE from the peer is answered with CLOSE and the connection is
        closed.
        """
        self.send(Close(text="bye"))
        self.assertEqual(self.written(), [Close()])
        self.assertTrue(self.transport.disconnecting)
        self.assertIs(self.proto.state, PeerState.CLOSED)

    def test_unknownOneWay(self):
        """
        An unknown record with tag 0 is ignored and counted.
        """
        self.send(UnknownRecord(type=0x0250, body=b"\x01\x02"))
        self.assertEqual(self.written(), [])
        self.assertEqual(self.factory.counters["unknown-records-ignored"], 1)
        self.assertFalse(self.transport.disconnecting)

    def test_unknownRequest(self):
        """
        An unknown tagged request is answered with ERROR unsupported
        carrying its tag.
        """
        self.send(UnknownRecord(type=0x0250, tag=77))
        self.assertAnsweredOpen(ErrorCode.UNSUPPORTED, 77)

    def test_unknownMustUnderstand(self):
        """
        An unknown record with the MUST_UNDERSTAND flag is answered with
        ERROR must-understand carrying its tag, tagged or not.
        """
        for tag in (0, 78):
            self.send(UnknownRecord(type=0x0250, tag=tag, mustUnderstand=True))
            self.assertAnsweredOpen(ErrorCode.MUST_UNDERSTAND, tag)

    def test_unknownResponseUnmatched(self):
        """
        An unknown response that matches no request is ignored and counted.
        """
        self.send(UnknownRecord(type=0x0250, tag=5, response=True))
        self.assertEqual(self.written(), [])
        self.assertEqual(self.factory.counters["unmatched-responses"], 1)

    def test_adminRecordRefused(self):
        """
        An admin record on a peer connection is answered with ERROR
        unsupported carrying its tag.
        """
        self.send(UnknownRecord(type=RecordType.STATUS, tag=12))
        self.assertAnsweredOpen(ErrorCode.UNSUPPORTED, 12)

    def test_unknownMustUnderstandField(self):
        """
        A known record carrying an unknown must-understand field is answered
        with ERROR must-understand carrying its tag; the connection stays
        open.
        """
        body = encodeRecord(MESSAGE)[HEADER_SIZE:]
        body += FIELD_HEADER.pack(0x8000 | 0x7ABC, 1) + b"x"
        self.proto.dataReceived(encodeFrame(RecordType.MESSAGE, 0, 7, body))
        self.assertAnsweredOpen(ErrorCode.MUST_UNDERSTAND, 7)
        self.send(Ping(tag=1))
        self.assertEqual(self.written(), [Pong(tag=1, response=True)])

    def test_malformed(self):
        """
        A record without a required field is refused with ERROR malformed
        carrying its tag, and the connection is closed.
        """
        body = FIELD_HEADER.pack(Field.FROM, 3) + b"a@b"
        self.proto.dataReceived(encodeFrame(RecordType.MESSAGE, 0, 8, body))
        self.assertRefused(ErrorCode.MALFORMED, tag=8)

    def test_invalidUTF8(self):
        """
        Text that is not UTF-8 is refused with ERROR invalid-utf8 carrying
        the record's tag, and the connection is closed.
        """
        body = FIELD_HEADER.pack(Field.TEXT, 1) + b"\xff"
        self.proto.dataReceived(encodeFrame(RecordType.CLOSE, 0, 9, body))
        self.assertRefused(ErrorCode.INVALID_UTF8, tag=9)

    def test_untaggedError(self):
        """
        An untagged ERROR is counted and leaves the connection open.
        """
        self.send(Error(code=ErrorCode.INTERNAL_ERROR, text="oops"))
        self.assertEqual(self.written(), [])
        self.assertEqual(self.factory.counters["errors-received"], 1)
        self.assertFalse(self.transport.disconnecting)


class RequestTests(PeerTestCase):
    """
    Tests for L{PeerProtocol.request}.
    """

    def setUp(self):
        super().setUp()
        self.handshake()

    def test_tags(self):
        """
        Each request is sent with a fresh non-zero tag.
        """
        for _ in range(3):
            self.proto.request(Ping())
        self.assertEqual([r.tag for r in self.written()], [1, 2, 3])
        self.assertEqual(self.proto.pendingRequests(), 3)

    def test_tagsSkipPending(self):
        """
        Tags wrap around after 2**32-1, skipping 0 and tags still pending.
        """
        self.proto.request(Ping())  # tag 1 stays pending
        self.proto._tags = iter([0xFFFFFFFF, 0x100000000, 0x100000001, 2])
        self.proto.request(Ping())
        self.proto.request(Ping())
        self.assertEqual([r.tag for r in self.written()], [1, 0xFFFFFFFF, 2])

    def test_pong(self):
        """
        A request fires with the response carrying its tag.
        """
        d = self.proto.request(Ping())
        [ping] = self.written()
        self.assertNoResult(d)
        self.send(Pong(tag=ping.tag))
        self.assertEqual(self.successResultOf(d), Pong(tag=ping.tag, response=True))
        self.assertEqual(self.proto.pendingRequests(), 0)

    def test_ackSeveral(self):
        """
        One ACK listing several tags completes all of those requests and no
        other.
        """
        ds = [self.proto.request(MESSAGE) for _ in range(4)]
        tags = [r.tag for r in self.written()]
        self.send(Ack(tags=(tags[0], tags[2], tags[3])))
        for i in (0, 2, 3):
            self.assertIsInstance(self.successResultOf(ds[i]), Ack)
        self.assertNoResult(ds[1])
        self.assertEqual(self.proto.pendingRequests(), 1)

    def test_ackUnknownTag(self):
        """
        An ACK for a tag not pending is counted as unmatched.
        """
        self.send(Ack(tags=(999,)))
        self.assertEqual(self.factory.counters["unmatched-responses"], 1)

    def test_error(self):
        """
        ERROR with a request's tag fails it with L{RemoteError} carrying the
        code, text and retry delay.
        """
        d = self.proto.request(MESSAGE)
        [sent] = self.written()
        self.send(
            Error(tag=sent.tag, code=ErrorCode.RATE_LIMITED, text="slow", retryAfter=30)
        )
        e = self.failureResultOf(d, RemoteError).value
        self.assertEqual(e.code, ErrorCode.RATE_LIMITED)
        self.assertEqual(e.text, "slow")
        self.assertEqual(e.retryAfter, 30)
        self.assertTrue(e.temporary)
        self.assertFalse(self.transport.disconnecting)

    def test_permanentError(self):
        """
        A 5xx ERROR is permanent; so is a code outside 400-599.
        """
        for code in (ErrorCode.RELAY_DENIED, 650):
            d = self.proto.request(MESSAGE)
            [sent] = self.written()
            self.send(Error(tag=sent.tag, code=code))
            e = self.failureResultOf(d, RemoteError).value
            self.assertEqual(e.code, code)
            self.assertFalse(e.temporary)

    def test_unknownTemporaryError(self):
        """
        An unknown 4xx ERROR is temporary.
        """
        d = self.proto.request(MESSAGE)
        [sent] = self.written()
        self.send(Error(tag=sent.tag, code=488))
        self.assertTrue(self.failureResultOf(d, RemoteError).value.temporary)

    def test_connectionLost(self):
        """
        Requests still pending when the connection is lost fail with the
        reason.
        """
        d1 = self.proto.request(MESSAGE)
        d2 = self.proto.request(Ping())
        self.proto.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(d1, ConnectionLost)
        self.failureResultOf(d2, ConnectionLost)
        self.assertEqual(self.proto.pendingRequests(), 0)

    def test_connectionLostDefaultReason(self):
        """
        C{connectionLost()} without a reason fails pending requests with
        L{ConnectionDone}.
        """
        d = self.proto.request(MESSAGE)
        self.proto.connectionLost()
        self.failureResultOf(d, ConnectionDone)
        self.assertNotIn(self.proto, self.factory.connections)

    def test_requestThen(self):
        """
        C{requestThen} tells its functions, with their arguments, what
        L{request}'s Deferred would fire with: the ACK, an ERROR as
        L{RemoteError}, or the loss of the connection.
        """
        told = []

        def answered(answer, name):
            told.append((name, answer))

        def failed(failure, name):
            told.append((name, failure.value))

        for name in ("acked", "refused", "lost"):
            self.proto.requestThen(MESSAGE, answered, failed, (name,))
        acked, refused, _lost = self.written()
        self.assertEqual(self.proto.pendingRequests(), 3)
        self.send(Ack(tags=(acked.tag,)))
        self.send(Error(tag=refused.tag, code=ErrorCode.RATE_LIMITED))
        self.proto.connectionLost(Failure(ConnectionLost()))
        self.assertEqual([name for name, _ in told], ["acked", "refused", "lost"])
        self.assertIsInstance(told[0][1], Ack)
        self.assertEqual(told[1][1].code, ErrorCode.RATE_LIMITED)
        self.assertIsInstance(told[2][1], ConnectionLost)
        self.assertEqual(self.proto.pendingRequests(), 0)

    def test_requestsWaitForGatheredAcks(self):
        """
        A request written while ACKs are gathered (outside a read) goes
        after them, when they are sent on the next turn; responses do not
        wait.
        """
        self.proto.acknowledge(5)
        self.proto.request(Ping())
        self.proto.sendRecord(Pong(tag=9))
        self.assertEqual([type(r) for r in self.written()], [Pong])
        self.clock.advance(0)
        ack, ping = self.written()
        self.assertEqual((type(ack), ack.tags, type(ping)), (Ack, (5,), Ping))

    def test_closeAfterHeldRequests(self):
        """
        CLOSE goes after the ACKs gathered and the requests held behind
        them: nothing follows it.
        """
        self.proto.acknowledge(5)
        self.proto.request(Ping())
        self.proto.close()
        self.clock.advance(0)
        self.assertEqual([type(r) for r in self.written()], [Ack, Ping, Close])

    def test_unmatchedResponse(self):
        """
        A response whose tag names no pending request is counted and
        ignored.
        """
        self.send(Pong(tag=42))
        self.assertEqual(self.factory.counters["unmatched-responses"], 1)
        self.assertEqual(self.written(), [])


class KeepaliveTests(PeerTestCase):
    """
    PING after silence, and the keepalive timeout.
    """

    def setUp(self):
        super().setUp()
        self.handshake()

    def test_pingAfterSilence(self):
        """
        After a keepalive interval of silence a PING request is sent.
        """
        self.clock.advance(59.9)
        self.assertEqual(self.written(), [])
        self.clock.advance(0.1)
        [ping] = self.written()
        self.assertIsInstance(ping, Ping)
        self.assertNotEqual(ping.tag, 0)
        self.assertFalse(ping.response)

    def test_timeout(self):
        """
        Silence for another interval after the PING is refused with ERROR
        timeout and the connection is closed.
        """
        self.clock.advance(60)
        self.written()
        self.clock.advance(59.9)
        self.assertEqual(self.written(), [])
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.1)
        self.assertRefused(ErrorCode.TIMEOUT)

    def test_pongKeepsAlive(self):
        """
        A peer that answers every PING stays connected.
        """
        for _ in range(5):
            self.clock.advance(60)
            [ping] = self.written()
            self.send(Pong(tag=ping.tag))
        self.assertFalse(self.transport.disconnecting)

    def test_anyBytesResetKeepalive(self):
        """
        Any bytes from the peer, even part of a record, postpone the PING.
        """
        self.clock.advance(59)
        self.proto.dataReceived(encodeRecord(Ping(tag=1))[:3])
        self.clock.advance(59)
        self.assertEqual(self.written(), [])
        self.clock.advance(1)
        [ping] = self.written()
        self.assertIsInstance(ping, Ping)

    def test_anyBytesAnswerPing(self):
        """
        Bytes other than PONG after our PING count as liveness: no timeout
        at the end of the second interval.
        """
        self.clock.advance(60)
        self.written()
        self.clock.advance(40)
        self.proto.dataReceived(encodeRecord(Ping(tag=1))[:3])
        self.clock.advance(20)
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.written(), [])
        self.clock.advance(40)
        [ping] = self.written()
        self.assertIsInstance(ping, Ping)


class IdleTests(PeerTestCase):
    """
    The idle close and the orderly close.
    """

    def setUp(self):
        super().setUp()
        self.handshake()

    def runWithPings(self, seconds, peerPingEvery=None):
        """
        Advance the clock one second at a time for C{seconds}, answering
        every PING with PONG, and (if C{peerPingEvery}) sending a PING of
        our own every so many seconds.

        @return: the records other than PING and PONG written meanwhile.
        """
        others = []
        for step in range(int(seconds)):
            self.clock.advance(1)
            if peerPingEvery and step % peerPingEvery == 0:
                self.send(Ping(tag=100000 + step))
            for record in self.written():
                if isinstance(record, Ping):
                    self.send(Pong(tag=record.tag))
                elif not isinstance(record, Pong):
                    others.append(record)
        return others

    def test_idleCloseDespitePings(self):
        """
        PING and PONG do not count as activity: the connection is closed
        with CLOSE at the idle timeout even while they flow.
        """
        self.assertEqual(self.runWithPings(599), [])
        self.assertIs(self.proto.state, PeerState.OPEN)
        others = self.runWithPings(1)
        self.assertEqual(others, [Close(text="idle")])
        self.assertIs(self.proto.state, PeerState.CLOSING)
        self.assertEqual(self.factory.counters["idle-closes"], 1)

    def test_idleCloseDespitePeerPings(self):
        """
        PINGs from the peer, answered with PONG, do not count as activity
        either.
        """
        self.assertEqual(self.runWithPings(599, peerPingEvery=7), [])
        self.assertEqual(self.runWithPings(1, peerPingEvery=1), [Close(text="idle")])

    def test_keepaliveSent(self):
        """
        While idle, PINGs are sent every keepalive interval.
        """
        pings = 0
        for _ in range(300):
            self.clock.advance(1)
            for record in self.written():
                self.assertIsInstance(record, Ping)
                pings += 1
                self.send(Pong(tag=record.tag))
        self.assertEqual(pings, 5)

    def test_noteActivity(self):
        """
        L{PeerProtocol.noteActivity} restarts the idle clock.
        """
        self.assertEqual(self.runWithPings(500), [])
        self.proto.noteActivity()
        self.assertEqual(self.runWithPings(599), [])
        self.assertEqual(self.runWithPings(1), [Close(text="idle")])

    def test_closeAnswered(self):
        """
        After the idle CLOSE, the peer's CLOSE disconnects at once, without
        a second CLOSE and without abort.
        """
        self.runWithPings(600)
        self.send(Close())
        self.assertEqual(self.written(), [])
        self.assertTrue(self.transport.disconnecting)
        self.assertFalse(self.transport.aborted)
        self.proto.connectionLost(Failure(ConnectionDone()))
        self.clock.advance(CLOSE_GRACE * 2)
        self.assertFalse(self.transport.aborted)

    def test_closeNotAnswered(self):
        """
        After the idle CLOSE, a peer that does not answer is aborted after
        the grace period.
        """
        self.runWithPings(600)
        self.clock.advance(CLOSE_GRACE - 0.01)
        self.assertFalse(self.transport.aborted)
        self.clock.advance(0.01)
        self.assertTrue(self.transport.aborted)

    def test_closingRefusesData(self):
        """
        After our CLOSE, Data requests are answered with ERROR
        shutting-down; responses are still accepted.
        """
        d = self.proto.request(MESSAGE)
        [sent] = self.written()
        self.proto.close("bye")
        self.assertEqual(self.written(), [Close(text="bye")])
        self.send(attrs.evolve(MESSAGE, tag=99))
        [error] = self.written()
        self.assertEqual((error.code, error.tag), (ErrorCode.SHUTTING_DOWN, 99))
        self.send(Ack(tags=(sent.tag,)))
        self.successResultOf(d)

    def test_closeTwice(self):
        """
        Closing twice sends CLOSE once.
        """
        self.proto.close()
        self.proto.close()
        self.assertEqual(self.written(), [Close()])


class FlagTests(SynchronousTestCase):
    """
    The header flags that the protocol sends.
    """

    def test_pongFlags(self):
        """
        PONG is sent with the RESPONSE flag only.
        """
        self.assertEqual(Pong(tag=1).flags, Flag.RESPONSE)
