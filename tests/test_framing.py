"""
Tests for L{imxd.wire.framing}: the record header, L{encodeFrame} and the
stream decoder L{FrameDecoder}.
"""

import struct

from twisted.trial.unittest import SynchronousTestCase

from imxd.wire import (
    PREAMBLE,
    ErrorCode,
    NotIMX,
    RecordTooLarge,
    RecordType,
    WireError,
    encodeRecord,
)
from imxd.wire.framing import HEADER, HEADER_SIZE, Frame, FrameDecoder, encodeFrame
from imxd.wire.vectors import VECTORS

#: Every test vector, encoded, in order.
RECORDS = [encodeRecord(record) for _name, record in VECTORS]

#: The frames that RECORDS hold, in order.
FRAMES = [
    Frame(*HEADER.unpack(data[:HEADER_SIZE])[1:], data[HEADER_SIZE:])
    for data in RECORDS
]

#: One MiB.
MIB = 1024 * 1024


def feedAll(decoder, chunks):
    """
    Feed C{chunks} to C{decoder} one after another.

    @return: every frame completed, in order.
    """
    frames = []
    for chunk in chunks:
        frames.extend(decoder.feed(chunk))
    return frames


class EncodeFrameTests(SynchronousTestCase):
    """
    Tests for L{encodeFrame} and the header layout.
    """

    def test_headerSize(self):
        """
        The record header is 12 bytes.
        """
        self.assertEqual(HEADER_SIZE, 12)
        self.assertEqual(HEADER.size, 12)

    def test_layout(self):
        """
        The header holds length (u32), type (u16), flags (u16) and tag (u32),
        all big-endian, followed by the body.
        """
        data = encodeFrame(0x0102, 0x0003, 0xDEADBEEF, b"abc")
        self.assertEqual(
            data, bytes.fromhex("00000003" "0102" "0003" "deadbeef") + b"abc"
        )

    def test_lengthCountsBodyOnly(self):
        """
        The length field counts the body, not the header.
        """
        body = bytes(range(256)) * 3
        data = encodeFrame(RecordType.MESSAGE, 0, 1, body)
        self.assertEqual(len(data), HEADER_SIZE + len(body))
        self.assertEqual(struct.unpack(">I", data[:4])[0], len(body))

    def test_emptyBody(self):
        """
        A record without a body is its header alone, with length 0.
        """
        self.assertEqual(
            encodeFrame(RecordType.PING, 0, 1, b""),
            bytes.fromhex("00000000 0002 0000 00000001"),
        )

    def test_maximumValues(self):
        """
        Type, flags and tag take their full unsigned range.
        """
        data = encodeFrame(0xFFFF, 0xFFFF, 0xFFFFFFFF, b"")
        self.assertEqual(data, bytes.fromhex("00000000 ffff ffff ffffffff"))

    def test_decodesBack(self):
        """
        L{FrameDecoder} turns the bytes from L{encodeFrame} back into the
        same L{Frame}.
        """
        data = encodeFrame(0x0120, 0x0002, 77, b"body")
        decoder = FrameDecoder(1024, expectPreamble=False)
        self.assertEqual(decoder.feed(data), [Frame(0x0120, 0x0002, 77, b"body")])
        self.assertEqual(decoder.buffered(), 0)

    def test_frameFields(self):
        """
        A L{Frame} names its parts type, flags, tag and body.
        """
        frame = Frame(1, 2, 3, b"x")
        self.assertEqual(
            (frame.type, frame.flags, frame.tag, frame.body), (1, 2, 3, b"x")
        )


class ReassemblyTests(SynchronousTestCase):
    """
    L{FrameDecoder} cuts a stream into frames however the stream is split.
    """

    def test_severalRecordsInOneFeed(self):
        """
        One feed holding several records yields all of them, in order.
        """
        decoder = FrameDecoder(65536)
        frames = decoder.feed(PREAMBLE + b"".join(RECORDS))
        self.assertEqual(frames, FRAMES)
        self.assertEqual(decoder.buffered(), 0)

    def test_oneByteAtATime(self):
        """
        The stream fed one byte at a time yields the same frames as fed at
        once.
        """
        decoder = FrameDecoder(65536)
        stream = PREAMBLE + b"".join(RECORDS)
        frames = feedAll(decoder, [stream[i : i + 1] for i in range(len(stream))])
        self.assertEqual(frames, FRAMES)
        self.assertEqual(decoder.buffered(), 0)

    def test_everySplitPoint(self):
        """
        The stream split in two at any byte boundary yields the same frames.
        """
        stream = PREAMBLE + b"".join(RECORDS[:6])
        for i in range(len(stream) + 1):
            decoder = FrameDecoder(65536)
            frames = feedAll(decoder, [stream[:i], stream[i:]])
            self.assertEqual(frames, FRAMES[:6], f"split at {i}")
            self.assertEqual(decoder.buffered(), 0)

    def test_recordCompletesOnlyWithItsLastByte(self):
        """
        A record is returned by the feed that supplies its last byte, and
        not before; until then its bytes are counted by C{buffered()}.
        """
        data = RECORDS[0]
        decoder = FrameDecoder(65536, expectPreamble=False)
        self.assertEqual(decoder.feed(data[:-1]), [])
        self.assertEqual(decoder.buffered(), len(data) - 1)
        self.assertEqual(decoder.feed(data[-1:]), [FRAMES[0]])
        self.assertEqual(decoder.buffered(), 0)

    def test_partialHeaderBuffered(self):
        """
        Fewer than 12 bytes of a header wait in the buffer.
        """
        decoder = FrameDecoder(65536, expectPreamble=False)
        self.assertEqual(decoder.feed(RECORDS[1][:5]), [])
        self.assertEqual(decoder.buffered(), 5)

    def test_emptyFeed(self):
        """
        Feeding no bytes yields no frames and changes nothing.
        """
        decoder = FrameDecoder(65536)
        self.assertEqual(decoder.feed(b""), [])
        self.assertEqual(decoder.feed(PREAMBLE), [])
        self.assertEqual(decoder.feed(b""), [])
        self.assertEqual(decoder.buffered(), 0)

    def test_withoutPreamble(self):
        """
        With C{expectPreamble=False} the stream starts with a record.
        """
        decoder = FrameDecoder(65536, expectPreamble=False)
        self.assertEqual(decoder.feed(b"".join(RECORDS)), FRAMES)

    def test_bodyAtLimit(self):
        """
        A body exactly as large as the limit is accepted.
        """
        decoder = FrameDecoder(100, expectPreamble=False)
        data = encodeFrame(RecordType.MESSAGE, 0, 1, b"x" * 100)
        self.assertEqual(
            decoder.feed(data), [Frame(RecordType.MESSAGE, 0, 1, b"x" * 100)]
        )


class PreambleTests(SynchronousTestCase):
    """
    L{FrameDecoder} requires the preamble when told to.
    """

    def test_preambleValue(self):
        """
        The preamble is the eight bytes 89 'IMX' CR LF 1A LF.
        """
        self.assertEqual(PREAMBLE, b"\x89IMX\r\n\x1a\n")

    def test_httpRequest(self):
        """
        An HTTP request instead of the preamble raises L{NotIMX}.
        """
        decoder = FrameDecoder(65536)
        e = self.assertRaises(NotIMX, decoder.feed, b"GET / HTTP/1.1\r\n")
        self.assertEqual(e.code, ErrorCode.NOT_IMX)
        self.assertTrue(e.fatal)

    def test_wrongFirstByteAlone(self):
        """
        A wrong first byte raises L{NotIMX} at once, without waiting for the
        rest of the preamble.
        """
        decoder = FrameDecoder(65536)
        self.assertRaises(NotIMX, decoder.feed, b"G")

    def test_splitPreamble(self):
        """
        A preamble split across several feeds is accepted.
        """
        decoder = FrameDecoder(65536)
        self.assertEqual(decoder.feed(PREAMBLE[:1]), [])
        self.assertEqual(decoder.feed(PREAMBLE[1:3]), [])
        self.assertEqual(decoder.feed(PREAMBLE[3:7]), [])
        self.assertEqual(decoder.feed(PREAMBLE[7:] + RECORDS[1]), [FRAMES[1]])

    def test_preambleOneByteAtATime(self):
        """
        The preamble fed byte by byte is accepted and yields no frame.
        """
        decoder = FrameDecoder(65536)
        for i in range(len(PREAMBLE)):
            self.assertEqual(decoder.feed(PREAMBLE[i : i + 1]), [])
        self.assertEqual(decoder.buffered(), 0)
        self.assertEqual(decoder.feed(RECORDS[1]), [FRAMES[1]])

    def test_wrongByteAfterPartialPreamble(self):
        """
        A byte that differs from the preamble after a correct partial
        preamble raises L{NotIMX}.
        """
        decoder = FrameDecoder(65536)
        decoder.feed(PREAMBLE[:5])
        self.assertRaises(NotIMX, decoder.feed, b"X" + PREAMBLE[6:])

    def test_wrongLastPreambleByte(self):
        """
        A difference in the preamble's last byte raises L{NotIMX}.
        """
        decoder = FrameDecoder(65536)
        self.assertRaises(NotIMX, decoder.feed, PREAMBLE[:-1] + b"\r" + RECORDS[1])

    def test_everyPreambleByteChecked(self):
        """
        Changing any one byte of the preamble raises L{NotIMX}.
        """
        for i in range(len(PREAMBLE)):
            bad = bytearray(PREAMBLE)
            bad[i] ^= 0x20
            decoder = FrameDecoder(65536)
            self.assertRaises(NotIMX, decoder.feed, bytes(bad))

    def test_recordWithoutPreamble(self):
        """
        A record sent without the preamble is refused when the preamble is
        expected.
        """
        decoder = FrameDecoder(65536)
        self.assertRaises(NotIMX, decoder.feed, RECORDS[0])

    def test_preambleNotExpected(self):
        """
        With C{expectPreamble=False} the preamble bytes are read as a record
        header, not skipped.
        """
        decoder = FrameDecoder(65536, expectPreamble=False)
        # 0x89494d58 announces about 2.3 GB: too large.
        self.assertRaises(RecordTooLarge, decoder.feed, PREAMBLE + RECORDS[1])

    def test_failsForever(self):
        """
        After L{NotIMX} every further feed raises again, even of valid
        bytes.
        """
        decoder = FrameDecoder(65536)
        first = self.assertRaises(NotIMX, decoder.feed, b"HELO")
        second = self.assertRaises(NotIMX, decoder.feed, PREAMBLE)
        self.assertRaises(NotIMX, decoder.feed, b"")
        self.assertIs(first, second)


class RecordTooLargeTests(SynchronousTestCase):
    """
    L{FrameDecoder} refuses oversize records from their header alone.
    """

    def hugeHeader(self, tag=9):
        """
        @return: a header announcing 0xFFFFFFFF bytes of body.
        """
        return HEADER.pack(0xFFFFFFFF, RecordType.MESSAGE, 0, tag)

    def test_raisedWhenHeaderComplete(self):
        """
        L{RecordTooLarge} is raised by the feed that completes the header,
        and not before.
        """
        decoder = FrameDecoder(65536)
        header = self.hugeHeader()
        self.assertEqual(decoder.feed(PREAMBLE + header[:-1]), [])
        self.assertEqual(decoder.buffered(), HEADER_SIZE - 1)
        e = self.assertRaises(RecordTooLarge, decoder.feed, header[-1:])
        self.assertEqual(e.code, ErrorCode.RECORD_TOO_LARGE)
        self.assertEqual(e.tag, 9)
        self.assertTrue(e.fatal)
        self.assertEqual(decoder.buffered(), 0)

    def test_bodyNeverBuffered(self):
        """
        Fed with the header and a MiB of its body, the decoder raises
        L{RecordTooLarge} and keeps none of the body; further feeds raise
        again and buffer nothing.
        """
        decoder = FrameDecoder(65536)
        self.assertRaises(
            RecordTooLarge, decoder.feed, PREAMBLE + self.hugeHeader() + b"\0" * MIB
        )
        self.assertEqual(decoder.buffered(), 0)
        self.assertRaises(RecordTooLarge, decoder.feed, b"\0" * MIB)
        self.assertEqual(decoder.buffered(), 0)

    def test_afterGoodRecords(self):
        """
        An oversize header following good records in the same feed raises;
        the decoder keeps nothing.
        """
        decoder = FrameDecoder(65536, expectPreamble=False)
        self.assertRaises(
            RecordTooLarge, decoder.feed, RECORDS[1] + RECORDS[2] + self.hugeHeader()
        )
        self.assertEqual(decoder.buffered(), 0)

    def test_oneOverLimit(self):
        """
        A body one byte over the limit is refused, with the record's tag.
        """
        decoder = FrameDecoder(100, expectPreamble=False)
        e = self.assertRaises(
            RecordTooLarge, decoder.feed, HEADER.pack(101, RecordType.MESSAGE, 0, 4)
        )
        self.assertEqual(e.tag, 4)

    def test_failsForever(self):
        """
        After L{RecordTooLarge} every further feed raises the same error.
        """
        decoder = FrameDecoder(65536, expectPreamble=False)
        first = self.assertRaises(RecordTooLarge, decoder.feed, self.hugeHeader())
        second = self.assertRaises(RecordTooLarge, decoder.feed, RECORDS[1])
        self.assertIs(first, second)
        self.assertIsInstance(second, WireError)
