"""
Tests for the codec's C accelerator (imxd/wire/_speedups.c): on every
valid record it gives what the Python codec gives, and it declines
(answers L{None}) everything else, so that the Python codec, the
reference, decides and explains.
"""

import os
import sys

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from imxd.wire import RECORD_CLASSES, EncodeError, FrameDecoder, WireError, encodeRecord
from imxd.wire.constants import Field
from imxd.wire.framing import Frame, encodeFrame
from imxd.store.seenfilter import Bloom
from imxd.wire import framing
from imxd.wire.records import (
    FAST_SCHEMAS,
    Ack,
    Message,
    Report,
    decodeReference,
    encodeBody,
    encodeReference,
    fastCodecOf,
    speedups,
)
from tests.test_wire import anyBytes, field, propertySettings, randomFramesOf, recordStrategy

#: `make test` sets this: there the accelerator must have been built.
REQUIRED = bool(os.environ.get("IMXD_REQUIRE_SPEEDUPS"))

#: Every valid record of every known class.
knownRecords = st.sampled_from(sorted(RECORD_CLASSES.values(), key=lambda c: c.TYPE)).flatmap(
    recordStrategy
)


def message(**changes):
    """
    @return: a valid L{Message}, with C{changes}.
    """
    values = dict(
        sender="alice@a.test",
        recipient="bob@b.test",
        messageId="m1",
        contentType="text/plain",
        body=b"hello",
        tag=7,
    )
    values.update(changes)
    return Message(**values)


class PresenceTests(SynchronousTestCase):
    """
    Whether the accelerator is there.
    """

    def test_builtWhereRequired(self):
        """
        Where the build environment must provide the accelerator (`make
        test`), it is loaded and every record class has its schema.
        """
        if not REQUIRED and speedups is None:
            raise self.skipTest("the C accelerator is not built here (an optional extra)")
        self.assertIsNotNone(speedups)
        for cls in RECORD_CLASSES.values():
            self.assertIsNotNone(cls._FAST, cls)


class AcceleratorTests(SynchronousTestCase):
    """
    The accelerator agrees with the Python codec.
    """

    def setUp(self):
        if speedups is None:
            raise self.skipTest("the C accelerator is not built here (an optional extra)")

    @propertySettings
    @given(record=knownRecords)
    def test_encodeAgrees(self, record):
        """
        A valid record's body encoded in C is the body the Python codec
        encodes.
        """
        self.assertEqual(record._FAST.encode(record), encodeBody(record))

    @propertySettings
    @given(record=knownRecords)
    def test_decodeAgrees(self, record):
        """
        A valid record's frame decodes in C to the record, keeping the body
        for re-sending, with the header values of the frame.
        """
        body = encodeBody(record)
        decoded = record._FAST.decode(record.flags, record.tag, body)
        self.assertEqual(decoded, record)
        self.assertIs(decoded._wire, body)
        self.assertEqual(decoded.response, record.response)
        self.assertEqual(decoded.mustUnderstand, record.mustUnderstand)

    @settings(propertySettings, max_examples=1000)
    @given(data=st.sampled_from(sorted(RECORD_CLASSES)).flatmap(randomFramesOf))
    def test_declinesOrAgrees(self, data):
        """
        For any frame of a known type, with random fields, the accelerator
        either declines or decodes what the Python codec decodes, body
        kept alike; whatever the Python codec refuses, it declines.
        """
        [frame] = FrameDecoder(1 << 20, expectPreamble=False).feed(data)
        fast = RECORD_CLASSES[frame.type]._FAST.decode(frame.flags, frame.tag, frame.body)
        try:
            reference = decodeReference(frame)
        except WireError:
            self.assertIsNone(fast)
            return
        if fast is not None:
            self.assertEqual(fast, reference)
            self.assertEqual(fast.response, reference.response)
            self.assertEqual(fast.mustUnderstand, reference.mustUnderstand)
            self.assertEqual(fast._wire, reference._wire)

    @propertySettings
    @given(record=knownRecords, tag=st.none() | st.integers(0, 0xFFFFFFFF))
    def test_frameAgrees(self, record, tag):
        """
        A valid record's frame built in C, with its own tag or another, is
        the frame the Python codec builds; the body is kept in the record.
        """
        data = record._FAST.frame(record, tag)
        self.assertEqual(data, encodeReference(record, tag))
        self.assertEqual(record._wire, data[12:])
        self.assertEqual(record._FAST.frame(record, tag), data)

    def test_frameDeclines(self):
        """
        A tag that is not a u32 and a body the encoder declines are left to
        the Python codec, which raises.
        """
        record = message()
        for tag in (-1, 1 << 32, "1"):
            self.assertIsNone(Message._FAST.frame(record, tag))
            self.assertRaises((EncodeError, TypeError), encodeRecord, record, tag)
        broken = message(sender="nul\x00")
        self.assertIsNone(Message._FAST.frame(broken, None))
        self.assertIsNone(broken._wire)

    @settings(propertySettings, max_examples=500)
    @given(data=anyBytes, chunk=st.integers(1, 64), limit=st.sampled_from([16, 65536]))
    def test_splitFramesAgrees(self, data, chunk, limit):
        """
        A byte stream fed in chunks is cut into the same frames, with the
        same error at the same point, with and without the accelerator.
        """

        def cut(accelerator):
            self.patch(framing, "speedups", accelerator)
            decoder = framing.FrameDecoder(limit, expectPreamble=False)
            frames = []
            try:
                for i in range(0, len(data), chunk):
                    frames.extend(decoder.feed(data[i : i + chunk]))
            except WireError as e:
                return frames, (type(e), str(e), e.tag), decoder.buffered()
            return frames, None, decoder.buffered()

        self.assertEqual(cut(speedups), cut(None))

    @settings(propertySettings, max_examples=500)
    @given(data=anyBytes, chunk=st.integers(1, 64))
    def test_splitRecordsAgrees(self, data, chunk):
        """
        Framing with the schemas gives, for each frame, either the frame
        (which the Python codec then decodes or refuses) or the record the
        Python codec decodes from it, with the same error at the same
        point.
        """

        def cut(schemas):
            decoder = framing.FrameDecoder(65536, expectPreamble=False, schemas=schemas)
            items = []
            try:
                for i in range(0, len(data), chunk):
                    items.extend(decoder.feed(data[i : i + chunk]))
            except WireError as e:
                return items, str(e)
            return items, None

        frames, error = cut(None)
        items, itsError = cut(FAST_SCHEMAS)
        self.assertEqual(itsError, error)
        self.assertEqual(len(items), len(frames))
        for item, frame in zip(items, frames):
            if type(item) is Frame:
                self.assertEqual(item, frame)
                continue
            reference = decodeReference(frame)
            self.assertEqual(item, reference)
            self.assertEqual((item.tag, item.response, item.mustUnderstand, item._wire),
                             (reference.tag, reference.response, reference.mustUnderstand, reference._wire))

    def test_splitFramesKeepsFrameType(self):
        """
        The frames cut in C are L{Frame}s, their fields named.
        """
        data = encodeRecord(message()) + encodeRecord(Ack(tags=(1, 2)))
        frames, consumed = speedups.splitFrames(Frame, bytearray(data + b"\x00"), 1 << 20)
        self.assertEqual(consumed, len(data))
        self.assertEqual([type(f) for f in frames], [Frame, Frame])
        self.assertEqual(frames[1].type, Ack.TYPE)
        self.assertEqual(frames[0].tag, 7)
        self.assertEqual(frames[0].body, encodeBody(message()))

    def test_declinesUnknownFields(self):
        """
        A field the class does not know is left to the Python codec, which
        skips it and does not keep the body (it must not be re-sent).
        """
        body = encodeBody(message()) + field(0x0777, b"x")
        self.assertIsNone(Message._FAST.decode(0, 1, body))
        self.assertIsNone(decodeReference(Frame(Message.TYPE, 0, 1, body))._wire)

    def test_mustUnderstandBitOnKnownField(self):
        """
        A known field sent with its must-understand bit decodes as the
        field, as the Python codec decodes it.
        """
        body = encodeBody(Ack(tags=(1,))).replace(
            int(Field.ACK_TAGS).to_bytes(2, "big"), (int(Field.ACK_TAGS) | 0x8000).to_bytes(2, "big")
        )
        decoded = Ack._FAST.decode(2, 0, body)
        self.assertEqual(decoded, decodeReference(Frame(Ack.TYPE, 2, 0, body)))
        self.assertEqual(decoded.tags, (1,))

    def test_declinesInvalidValues(self):
        """
        Values the Python codec refuses to encode are declined, and
        L{encodeRecord} raises the Python codec's error for them.
        """
        invalid = [
            message(body="text, not bytes"),
            message(sender="nul\x00inside"),
            message(messageId="x" * 129),
            message(recipient="\udc80"),
            message(attributes=("",)),
            Report(sender="a@a.test", recipient="b@b.test", messageId="m", code=1 << 40),
            Report(sender="a@a.test", recipient="b@b.test", messageId="m", code=-1),
            Ack(tags=(1 << 32,)),
            Ack(tags=("1",)),
        ]
        for record in invalid:
            self.assertIsNone(record._FAST.encode(record), record)
            self.assertRaises(EncodeError, encodeRecord, record)

    def test_declinesOtherTypes(self):
        """
        Values of another type that the Python codec still encodes (a
        bytearray body, a boolean code) are declined, and encoded by it.
        """
        record = message(body=bytearray(b"hello"))
        self.assertIsNone(Message._FAST.encode(record))
        self.assertEqual(encodeRecord(record), encodeRecord(message()))
        report = Report(sender="a@a.test", recipient="b@b.test", messageId="m", code=True)
        self.assertIsNone(Report._FAST.encode(report))
        self.assertEqual(
            encodeRecord(report),
            encodeRecord(Report(sender="a@a.test", recipient="b@b.test", messageId="m", code=1)),
        )

    def test_declinesSubclasses(self):
        """
        An instance of a subclass is declined: the schema knows only its
        own class.
        """

        class Special(Ack):
            pass

        self.assertIsNone(Ack._FAST.encode(Special(tags=(1,))))

    def test_manyRepeatedValues(self):
        """
        A body larger than the encoder's first buffer, with many repeated
        values, encodes and decodes alike.
        """
        record = Ack(tags=tuple(range(5000)))
        body = Ack._FAST.encode(record)
        self.assertEqual(body, encodeBody(record))
        self.assertEqual(Ack._FAST.decode(2, 0, body), record)

    def test_noReferencesLeak(self):
        """
        Decoding, declining and encoding leave the reference counts of what
        they touched as they were.
        """
        record = message()
        body = encodeBody(record)
        broken = body + b"\x00"
        before = [sys.getrefcount(x) for x in (Message, body, broken, record.sender)]
        stream = bytearray(encodeRecord(record) * 3 + encodeFrame(Message.TYPE, 0, 7, broken))
        for _ in range(1000):
            Message._FAST.decode(0, 7, body)
            Message._FAST.decode(0, 7, broken)
            Message._FAST.encode(record)
            Message._FAST.frame(record, None)
            Message._FAST.frame(record, 9)
            speedups.splitFrames(Frame, stream, 1 << 20)
            speedups.splitFrames(Frame, stream, 1 << 20, FAST_SCHEMAS)
        after = [sys.getrefcount(x) for x in (Message, body, broken, record.sender)]
        self.assertEqual(before, after)

    def test_schemaChecksItsArguments(self):
        """
        A schema is refused for an unknown kind, an identifier with the
        must-understand bit, or an attribute that is not a slot.
        """
        fields = fastCodecOf(Ack)
        self.assertIsNotNone(fields)
        for bad in [
            (("tags", 0x10, 9, 0, 10, True, True),),
            (("tags", 0x8010, 4, 0, 10, True, True),),
        ]:
            self.assertRaises(ValueError, speedups.Schema, Ack, bad, True)
        self.assertRaises(
            AttributeError, speedups.Schema, Ack, (("nothing", 1, 0, 0, 9, False, False),), True
        )
        self.assertRaises(
            TypeError, speedups.Schema, Ack, (("flags", 1, 0, 0, 9, False, False),), True
        )


class BloomTests(SynchronousTestCase):
    """
    The accelerator's C{Bloom} answers as the seen filter's Python
    L{Bloom} does.
    """

    def setUp(self):
        if speedups is None:
            raise self.skipTest("the C accelerator is not built here (an optional extra)")

    @settings(propertySettings, max_examples=200)
    @given(
        added=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=200),
        asked=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=200),
        words=st.sampled_from([1, 4, 64]),
    )
    def test_agrees(self, added, asked, words):
        """
        After the same hashes are added, both give the same answer for any
        hash, and never L{False} for one added.
        """
        fast, reference = speedups.Bloom(words), Bloom(words)
        for value in added:
            fast.add(value)
            reference.add(value)
        for value in added:
            self.assertTrue(fast.mayContain(value))
        for value in asked:
            self.assertEqual(fast.mayContain(value), reference.mayContain(value))

    def test_checksArguments(self):
        """
        A size that is not a power of two, a filter not initialised, and a
        hash that is not an integer, are refused.
        """
        for words in (0, 3, -4):
            self.assertRaises(ValueError, speedups.Bloom, words)
            self.assertRaises(ValueError, Bloom, words)
        bare = speedups.Bloom.__new__(speedups.Bloom)
        self.assertRaises(ValueError, bare.add, 1)
        self.assertRaises(ValueError, bare.mayContain, 1)
        bloom = speedups.Bloom(8)
        self.assertRaises(TypeError, bloom.add, "1")
        self.assertRaises(TypeError, bloom.mayContain, 1.5)
