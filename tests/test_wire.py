"""
Tests for the IMX v1 record codec in L{imxd.wire}: the known-answer vectors
published in C{docs/protocol.md}, the decoding rules for bad bodies, the
encoding checks, error codes, and property tests over arbitrary input.
"""

import re
from pathlib import Path

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from imxd.wire import (
    PREAMBLE,
    RECORD_CLASSES,
    Ack,
    Close,
    EncodeError,
    Error,
    ErrorCode,
    Field,
    FieldKind,
    Flag,
    FrameDecoder,
    Hello,
    InvalidUTF8,
    MalformedRecord,
    Message,
    MustUnderstand,
    Notify,
    Ping,
    Pong,
    RecordType,
    Redirect,
    UnknownRecord,
    WireError,
    decodeRecord,
    decodeRecords,
    encodeRecord,
    isTemporary,
)
from imxd.wire.constants import FIELD_KINDS, FIELD_LENGTHS, FIELD_MUST_UNDERSTAND
from imxd.wire.fields import FIELD_HEADER, iterateFields
from imxd.wire.framing import HEADER_SIZE, Frame, encodeFrame
from imxd.wire.records import withTag
from imxd.wire.vectors import VECTORS, vectorHexLines

#: The normative specification, which holds the vectors.
PROTOCOL_DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"

_VECTOR_BLOCK = re.compile(r"^```imx-vector[ \t]+(\S+)[ \t]*\n(.*?)^```", re.M | re.S)

U32_MAX = 0xFFFFFFFF

#: Property tests: moderate counts so that the module runs in seconds.
propertySettings = settings(
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

#: The vector record of each record class.
VECTOR_BY_CLASS = {type(record): record for _name, record in VECTORS}


def docVectors():
    """
    Parse the C{imx-vector} blocks out of C{docs/protocol.md}.

    @return: a list of C{(name, bytes)} in document order.
    """
    text = PROTOCOL_DOC.read_text(encoding="utf-8")
    return [
        (name, bytes.fromhex("".join(body.split())))
        for name, body in _VECTOR_BLOCK.findall(text)
    ]


def frameOf(data):
    """
    Cut exactly one record out of C{data} (no preamble).

    @return: its L{Frame}.
    """
    decoder = FrameDecoder(U32_MAX, expectPreamble=False)
    frames = decoder.feed(data)
    if len(frames) != 1 or decoder.buffered():
        raise AssertionError(
            f"{len(frames)} frames and {decoder.buffered()} stray bytes in {data!r}"
        )
    return frames[0]


def roundTrip(record):
    """
    @return: C{record} encoded, framed and decoded again.
    """
    return decodeRecord(frameOf(encodeRecord(record)))


def asSent(record):
    """
    @return: C{record} as the receiver sees it: records of response-only
        classes always carry the RESPONSE flag.
    """
    if record.ALWAYS_RESPONSE:
        return attrs.evolve(record, response=True)
    return record


def field(identifier, value):
    """
    @return: one encoded field with a raw value.
    """
    return FIELD_HEADER.pack(identifier, len(value)) + value


def bodyOf(record):
    """
    @return: the encoded body of C{record}.
    """
    return encodeRecord(record)[HEADER_SIZE:]


def withBody(record, body):
    """
    @return: a L{Frame} with C{record}'s header values and another body.
    """
    return Frame(record.TYPE, int(record.flags), record.tag, body)


def reversedFields(record):
    """
    @return: a L{Frame} of C{record} with its fields in reverse order.
    """
    body = bodyOf(record)
    fields = []
    offset = 0
    while offset < len(body):
        _ident, length = FIELD_HEADER.unpack_from(body, offset)
        end = offset + FIELD_HEADER.size + length
        fields.append(body[offset:end])
        offset = end
    return withBody(record, b"".join(reversed(fields)))


def removeField(body, identifier):
    """
    @return: C{body} without the fields numbered C{identifier}.
    """
    out = []
    offset = 0
    while offset < len(body):
        ident, length = FIELD_HEADER.unpack_from(body, offset)
        end = offset + FIELD_HEADER.size + length
        if ident != identifier:
            out.append(body[offset:end])
        offset = end
    return b"".join(out)


class VectorTests(SynchronousTestCase):
    """
    The known-answer vectors in C{docs/protocol.md} agree with the codec.
    """

    def test_docExists(self):
        """
        The specification is at C{docs/protocol.md}.
        """
        self.assertTrue(PROTOCOL_DOC.is_file(), f"{PROTOCOL_DOC} is missing")

    def test_oneBlockPerRecordType(self):
        """
        The document has exactly one vector block for every record type and
        none for anything else.
        """
        names = [name for name, _data in docVectors()]
        self.assertEqual(sorted(names), sorted(t.name for t in RecordType))
        self.assertEqual(len(names), len(set(names)))

    def test_vectorsCoverEveryType(self):
        """
        C{VECTORS} holds one record of every record type, under its name.
        """
        self.assertEqual(
            sorted(name for name, _record in VECTORS),
            sorted(t.name for t in RecordType),
        )
        for name, record in VECTORS:
            self.assertEqual(record.TYPE, RecordType[name], name)

    def test_encodeMatchesDocument(self):
        """
        Each vector record encodes to exactly the bytes the document shows.
        """
        documented = dict(docVectors())
        for name, record in VECTORS:
            self.assertIn(name, documented)
            self.assertEqual(
                encodeRecord(record).hex(" "), documented[name].hex(" "), name
            )

    def test_documentDecodes(self):
        """
        The document's bytes for each vector decode to the vector record.
        """
        documented = dict(docVectors())
        for name, record in VECTORS:
            decoded = decodeRecord(frameOf(documented[name]))
            self.assertEqual(decoded, record, name)
            self.assertEqual(decoded.TYPE, RecordType[name])

    def test_documentDecodesAsOneStream(self):
        """
        All the document's vectors, after the preamble, decode in order as
        one stream.
        """
        stream = PREAMBLE + b"".join(data for _name, data in docVectors())
        records = decodeRecords(stream, U32_MAX, expectPreamble=True)
        self.assertEqual(
            [type(r) for r in records],
            [RECORD_CLASSES[RecordType[n]] for n, _d in docVectors()],
        )

    def test_hexLines(self):
        """
        The printed layout puts the 12-byte header on the first line and one
        field per following line.
        """
        lines = vectorHexLines(Close(text="idle"))
        self.assertEqual(
            lines, ["00 00 00 0a 00 04 00 00 00 00 00 00", "00 07 00 00 00 04 69 64 6c 65"]
        )


class RegistryTests(SynchronousTestCase):
    """
    The registries in code agree with themselves and with the document.
    """

    def test_everyTypeHasAClass(self):
        """
        Every record type has a record class, registered under its number.
        """
        self.assertEqual(set(RECORD_CLASSES), set(RecordType))
        for recordType, cls in RECORD_CLASSES.items():
            self.assertEqual(cls.TYPE, recordType)

    def test_everyFieldHasAKind(self):
        """
        Every field identifier has a kind and fits in 15 bits.
        """
        self.assertEqual(set(FIELD_KINDS), set(Field))
        for f in Field:
            self.assertFalse(f & FIELD_MUST_UNDERSTAND, f.name)

    def test_lengthBoundsOnlyForVariableKinds(self):
        """
        Length bounds are given only for string and bytes fields.
        """
        for f, (low, high) in FIELD_LENGTHS.items():
            self.assertIn(FIELD_KINDS[f], (FieldKind.STRING, FieldKind.BYTES), f.name)
            self.assertLessEqual(low, high)

    def test_noDuplicateFieldsInAClass(self):
        """
        No record class carries the same field in two attributes.
        """
        for cls in RECORD_CLASSES.values():
            fields = [spec.field for spec in cls.FIELDS]
            self.assertEqual(len(fields), len(set(fields)), cls.__name__)

    def test_errorTokensInDocument(self):
        """
        The document's ERROR table lists every code with its token.
        """
        text = PROTOCOL_DOC.read_text(encoding="utf-8")
        table = dict(
            (int(code), token)
            for code, token in re.findall(r"^\|\s*(\d{3})\s*\|\s*([a-z0-9-]+)\s*\|", text, re.M)
        )
        for code in ErrorCode:
            self.assertEqual(table.get(int(code)), code.token, code.name)

    def test_fieldRegistryInDocument(self):
        """
        The document's field registry lists every field with its number and
        kind.
        """
        text = PROTOCOL_DOC.read_text(encoding="utf-8")
        table = {
            name: (int(number, 16), kind)
            for number, name, kind in re.findall(
                r"^\|\s*0x([0-9a-fA-F]{4})\s*\|\s*([A-Z_]+)\s*\|\s*([a-z0-9]+)\s*\|",
                text,
                re.M,
            )
        }
        for f in Field:
            self.assertEqual(table.get(f.name), (int(f), FIELD_KINDS[f].value), f.name)

    def test_recordFieldsInDocument(self):
        """
        The document's table of fields per record matches each class's
        fields: order, and required, optional or repeatable.
        """
        text = PROTOCOL_DOC.read_text(encoding="utf-8")
        section = text.split("### 17.3", 1)[1].split("\n## ", 1)[0]
        documented = {}
        for names, fields in re.findall(r"^\|\s*([A-Z_, ]+?)\s*\|\s*(.+?)\s*\|$", section, re.M):
            specs = []
            if fields != "none":
                for item in fields.split(","):
                    name, marker = item.split()[:2]
                    specs.append((name, marker))
            for name in names.split(","):
                documented[name.strip()] = specs
        for recordType in RecordType:
            cls = RECORD_CLASSES[recordType]
            ours = [
                (spec.field.name, "*" if spec.repeated else "R" if spec.required else "O")
                for spec in cls.FIELDS
            ]
            self.assertEqual(documented.get(recordType.name), ours, recordType.name)


class RoundTripTests(SynchronousTestCase):
    """
    Records decode to what was encoded.
    """

    def test_everyVector(self):
        """
        Every vector record survives encoding and decoding.
        """
        for name, record in VECTORS:
            self.assertEqual(roundTrip(record), record, name)

    def test_everyClassWithOptionalFields(self):
        """
        Every record class, with each optional and repeated field set and
        with each left out, survives encoding and decoding.
        """
        samples = {
            FieldKind.U16: 0xFFFF,
            FieldKind.U32: U32_MAX,
            FieldKind.STRING: "v\u00e9\U0001f600",
            FieldKind.BYTES: bytes(range(20)),
            FieldKind.TAGS: (1, U32_MAX),
        }
        for cls in RECORD_CLASSES.values():
            base = VECTOR_BY_CLASS[cls]
            full = {}
            empty = {}
            for spec in cls.FIELDS:
                value = samples[spec.kind]
                if spec.repeated:
                    full[spec.attribute] = (value, value)
                    empty[spec.attribute] = (value,) if spec.required else ()
                else:
                    full[spec.attribute] = value
                    if not spec.required:
                        empty[spec.attribute] = None
            for record in (attrs.evolve(base, **full), attrs.evolve(base, **empty)):
                record = asSent(record)
                self.assertEqual(roundTrip(record), record, cls.__name__)

    def test_headerValues(self):
        """
        Tag and both flags survive encoding and decoding.
        """
        record = Close(tag=U32_MAX, response=True, mustUnderstand=True, code=400)
        self.assertEqual(roundTrip(record), record)
        self.assertEqual(
            frameOf(encodeRecord(record)).flags, Flag.RESPONSE | Flag.MUST_UNDERSTAND
        )

    def test_unknownRecord(self):
        """
        A record of an unknown type is kept undecoded and re-encodes to the
        same bytes.
        """
        data = encodeFrame(0x0200, Flag.MUST_UNDERSTAND, 5, b"\x01\x02\x03")
        record = decodeRecord(frameOf(data))
        self.assertEqual(
            record,
            UnknownRecord(type=0x0200, body=b"\x01\x02\x03", tag=5, mustUnderstand=True),
        )
        self.assertEqual(encodeRecord(record), data)

    def test_fieldsInAnyOrder(self):
        """
        Fields may arrive in any order.
        """
        record = VECTOR_BY_CLASS[Message]
        self.assertEqual(decodeRecord(reversedFields(record)), record)

    def test_lengthBounds(self):
        """
        String and bytes values at their length bounds round-trip; one
        octet outside fails to encode, and received outside them makes the
        record malformed.
        """
        for cls in RECORD_CLASSES.values():
            base = asSent(VECTOR_BY_CLASS[cls])
            for spec in cls.FIELDS:
                if spec.lengths is None:
                    continue
                low, high = spec.lengths

                def make(n, spec=spec):
                    return "a" * n if spec.kind is FieldKind.STRING else b"a" * n

                def put(value, spec=spec):
                    return attrs.evolve(
                        base, **{spec.attribute: (value,) if spec.repeated else value}
                    )

                label = f"{cls.__name__}.{spec.attribute}"
                for n in (low, high):
                    self.assertEqual(roundTrip(put(make(n))), put(make(n)), label)
                self.assertRaises(EncodeError, encodeRecord, put(make(high + 1)))
                if low:
                    self.assertRaises(EncodeError, encodeRecord, put(make(low - 1)))
                # Over the bound on the wire:
                good = bodyOf(put(make(high)))
                marker = field(spec.field, b"a" * high)
                self.assertIn(marker, good, label)
                bad = good.replace(marker, field(spec.field, b"a" * (high + 1)), 1)
                e = self.assertRaises(
                    MalformedRecord, decodeRecord, withBody(put(make(high)), bad)
                )
                self.assertEqual(e.code, ErrorCode.MALFORMED, label)
                self.assertEqual(e.tag, base.tag, label)


class EncodedOnceTests(SynchronousTestCase):
    """
    A record keeps its encoded body: one decoded is sent on as it came,
    one built is encoded once however often it is sent.
    """

    def reordered(self):
        """
        @return: the MESSAGE vector and a frame of it with its fields in
            reverse order.
        """
        record = VECTOR_BY_CLASS[Message]
        return record, reversedFields(record)

    def test_decodedSentAsItCame(self):
        """
        A decoded record encodes to the body it was decoded from, under any
        tag, and still equals the record its values make.
        """
        record, frame = self.reordered()
        decoded = decodeRecord(frame)
        self.assertEqual(decoded, record)
        self.assertEqual(encodeRecord(decoded)[HEADER_SIZE:], frame.body)
        self.assertEqual(encodeRecord(decoded, tag=99), encodeFrame(Message.TYPE, frame.flags, 99, frame.body))
        copy = withTag(decoded, 7)
        self.assertEqual(encodeRecord(copy), encodeFrame(Message.TYPE, frame.flags, 7, frame.body))

    def test_changedCopyEncodedAgain(self):
        """
        A copy with other values (C{attrs.evolve}) is encoded from its
        values, not from the body of the original.
        """
        record, frame = self.reordered()
        changed = attrs.evolve(decodeRecord(frame), body=b"other")
        self.assertEqual(roundTrip(changed).body, b"other")
        self.assertEqual(encodeRecord(changed), encodeRecord(attrs.evolve(record, body=b"other")))

    def test_unknownFieldNotForwarded(self):
        """
        A record that arrived with a field this version skips is encoded
        from its values, without that field.
        """
        record = VECTOR_BY_CLASS[Message]
        extra = field(0x7ABC, b"whatever")
        decoded = decodeRecord(withBody(record, bodyOf(record) + extra))
        self.assertNotIn(extra, encodeRecord(decoded))
        self.assertEqual(encodeRecord(decoded), encodeRecord(record))

    def test_builtEncodedOnce(self):
        """
        A record built from values is encoded the first time it is sent
        and keeps those bytes.
        """
        record = Message(
            tag=3, messageId="x-1", sender="a@a.test", recipient="b@b.test",
            contentType="text/plain", body=b"hi",
        )
        first = encodeRecord(record)
        self.assertIsNone(attrs.evolve(record)._wire)
        self.assertEqual(record._wire, first[HEADER_SIZE:])
        self.assertEqual(encodeRecord(record), first)


class DecodeTests(SynchronousTestCase):
    """
    L{decodeRecord} applies the field rules of the specification.
    """

    def test_unknownFieldSkipped(self):
        """
        An unknown field without the must-understand bit is skipped,
        wherever it is.
        """
        record = VECTOR_BY_CLASS[Message]
        body = bodyOf(record)
        extra = field(0x7ABC, b"whatever")
        for new in (extra + body, body + extra, body[:6 + 13] + extra + body[6 + 13 :]):
            self.assertEqual(decodeRecord(withBody(record, new)), record)

    def test_unknownFieldInEmptyRecord(self):
        """
        A record type without fields skips an unknown field.
        """
        self.assertEqual(
            decodeRecord(Frame(RecordType.PING, 0, 1, field(0x0100, b""))), Ping(tag=1)
        )

    def test_knownFieldOfAnotherRecord(self):
        """
        A field defined elsewhere but not for this record type is skipped
        like an unknown one.
        """
        self.assertEqual(
            decodeRecord(Frame(RecordType.PING, 0, 1, field(Field.BODY, b"x"))),
            Ping(tag=1),
        )

    def test_unknownMustUnderstandField(self):
        """
        An unknown field with bit 0x8000 set raises L{MustUnderstand} with
        the record's tag; the error is not fatal to the connection.
        """
        record = VECTOR_BY_CLASS[Message]
        frame = withBody(record, bodyOf(record) + field(0x8000 | 0x7ABC, b"x"))
        e = self.assertRaises(MustUnderstand, decodeRecord, frame)
        self.assertEqual(e.code, ErrorCode.MUST_UNDERSTAND)
        self.assertEqual(e.tag, 7)
        self.assertFalse(e.fatal)
        self.assertIsInstance(e, WireError)

    def test_knownFieldWithMustUnderstandBit(self):
        """
        A known field whose identifier carries bit 0x8000 is decoded as
        usual.
        """
        frame = Frame(RecordType.CLOSE, 0, 0, field(0x8000 | Field.TEXT, b"bye"))
        self.assertEqual(decodeRecord(frame), Close(text="bye"))

    def test_missingRequiredField(self):
        """
        A record without one of its required fields raises
        L{MalformedRecord} with its tag.
        """
        for cls in RECORD_CLASSES.values():
            record = VECTOR_BY_CLASS[cls]
            for spec in cls.FIELDS:
                if not spec.required:
                    continue
                frame = withBody(record, removeField(bodyOf(record), spec.field))
                e = self.assertRaises(MalformedRecord, decodeRecord, frame)
                self.assertEqual(e.code, ErrorCode.MALFORMED)
                self.assertEqual(e.tag, record.tag)

    def test_repeatedNonRepeatableField(self):
        """
        A non-repeatable field that appears twice raises L{MalformedRecord}.
        """
        record = VECTOR_BY_CLASS[Message]
        frame = withBody(record, bodyOf(record) + field(Field.MESSAGE_ID, b"m-2"))
        e = self.assertRaises(MalformedRecord, decodeRecord, frame)
        self.assertEqual(e.tag, 7)

    def test_requiredRepeatedFieldAbsent(self):
        """
        A NOTIFY without any TO is malformed, and cannot be encoded.
        """
        body = encodeRecord(VECTOR_BY_CLASS[Notify])[HEADER_SIZE:]
        withoutTo = b"".join(
            FIELD_HEADER.pack(identifier, len(raw)) + raw
            for identifier, raw in iterateFields(body)
            if identifier != Field.TO
        )
        frame = Frame(RecordType.NOTIFY, 0, 13, withoutTo)
        error = self.assertRaises(MalformedRecord, decodeRecord, frame)
        self.assertEqual(error.tag, 13)
        self.assertRaises(
            EncodeError, encodeRecord, attrs.evolve(VECTOR_BY_CLASS[Notify], subscribers=())
        )

    def test_repeatedOptionalField(self):
        """
        An optional field that appears twice raises L{MalformedRecord}.
        """
        frame = Frame(
            RecordType.CLOSE, 0, 3, field(Field.TEXT, b"a") + field(Field.TEXT, b"a")
        )
        self.assertRaises(MalformedRecord, decodeRecord, frame)

    def test_repeatableFieldKeepsOrder(self):
        """
        A repeatable field may appear many times; its values keep their
        order, even when other fields come between them.
        """
        body = (
            field(Field.FROM, b"alice@a.example")
            + field(Field.TO, b"z@b.example")
            + field(Field.PRESENCE, b"away")
            + field(Field.TO, b"a@b.example")
        )
        record = decodeRecord(Frame(RecordType.NOTIFY, 0, 1, body))
        self.assertEqual(record.subscribers, ("z@b.example", "a@b.example"))

    def test_wrongIntegerWidth(self):
        """
        A u16, u32 or tags value of the wrong width raises
        L{MalformedRecord}.
        """
        code = field(Field.CODE, b"\x01\x90")
        cases = [
            (RecordType.CLOSE, field(Field.CODE, b"\x01\x90\x00")),
            (RecordType.CLOSE, field(Field.CODE, b"\x01")),
            (RecordType.CLOSE, field(Field.CODE, b"")),
            (RecordType.ERROR, code + field(Field.RETRY_AFTER, b"\x00\x01")),
            (RecordType.ERROR, code + field(Field.RETRY_AFTER, b"\x00" * 8)),
            (RecordType.ACK, field(Field.ACK_TAGS, b"\x00" * 5)),
            (RecordType.ACK, field(Field.ACK_TAGS, b"\x00" * 3)),
        ]
        for recordType, body in cases:
            e = self.assertRaises(
                MalformedRecord, decodeRecord, Frame(recordType, 0, 4, body)
            )
            self.assertEqual(e.tag, 4)

    def test_emptyAckTags(self):
        """
        An empty ACK_TAGS value is a list of no tags.
        """
        self.assertEqual(
            decodeRecord(Frame(RecordType.ACK, 0, 0, field(Field.ACK_TAGS, b""))),
            Ack(tags=(), response=True),
        )

    def test_fieldOverrunsBody(self):
        """
        A field whose length runs past the end of the body raises
        L{MalformedRecord}.
        """
        body = FIELD_HEADER.pack(Field.TEXT, 10) + b"abc"
        e = self.assertRaises(MalformedRecord, decodeRecord, Frame(RecordType.CLOSE, 0, 6, body))
        self.assertEqual(e.tag, 6)

    def test_hugeFieldLength(self):
        """
        A field announcing 0xFFFFFFFF bytes in a short body raises
        L{MalformedRecord}.
        """
        body = FIELD_HEADER.pack(0x7ABC, U32_MAX)
        self.assertRaises(MalformedRecord, decodeRecord, Frame(RecordType.PING, 0, 1, body))

    def test_strayBytes(self):
        """
        Fewer than six bytes left after the last field raise
        L{MalformedRecord}.
        """
        for n in range(1, FIELD_HEADER.size):
            body = field(Field.TEXT, b"a") + b"\x00" * n
            self.assertRaises(
                MalformedRecord, decodeRecord, Frame(RecordType.CLOSE, 0, 1, body)
            )

    def test_invalidUTF8(self):
        """
        Text that is not valid UTF-8 raises L{InvalidUTF8} with the record's
        tag.
        """
        for raw in (
            b"\xff",
            b"a\x80",
            b"\xc0\x80",  # overlong NUL
            b"\xc1\xbf",  # overlong
            b"\xe0\x80\xaf",  # overlong
            b"\xed\xa0\x80",  # surrogate
            b"\xf4\x90\x80\x80",  # above U+10FFFF
            b"\xe2\x82",  # truncated
        ):
            frame = Frame(RecordType.CLOSE, 0, 11, field(Field.TEXT, raw))
            e = self.assertRaises(InvalidUTF8, decodeRecord, frame)
            self.assertEqual(e.code, ErrorCode.INVALID_UTF8, raw)
            self.assertEqual(e.tag, 11, raw)

    def test_nulInText(self):
        """
        U+0000 in text raises L{InvalidUTF8} with the record's tag.
        """
        for raw in (b"\x00", b"a\x00b", b"ab\x00"):
            frame = Frame(RecordType.CLOSE, 0, 12, field(Field.TEXT, raw))
            e = self.assertRaises(InvalidUTF8, decodeRecord, frame)
            self.assertEqual(e.tag, 12)

    def test_nulInBytes(self):
        """
        Bytes values may hold any octet, NUL included.
        """
        record = Message(
            sender="a@b",
            recipient="c@d",
            messageId="m",
            contentType="x/y",
            body=b"\x00\xff\x00",
        )
        self.assertEqual(roundTrip(record), record)

    def test_utf8Accepted(self):
        """
        Valid UTF-8 of every width decodes, with no normalisation and a
        leading U+FEFF kept as it is.
        """
        text = "\ufeffe\u0301\u00e9\u20ac\U0010ffff"
        frame = Frame(RecordType.CLOSE, 0, 0, field(Field.TEXT, text.encode("utf-8")))
        self.assertEqual(decodeRecord(frame).text, text)

    def test_malformedIsFatal(self):
        """
        Malformed records and invalid UTF-8 are fatal (the connection
        closes, section 4); an unknown must-understand field is not.
        """
        self.assertTrue(MalformedRecord.fatal)
        self.assertTrue(InvalidUTF8.fatal)
        self.assertFalse(MustUnderstand.fatal)

    def test_unknownRecordType(self):
        """
        A record of an unknown type decodes to L{UnknownRecord}, which tells
        whether the sender expects an answer.
        """
        cases = [
            (0, 0, False),
            (5, 0, True),
            (5, Flag.RESPONSE, False),
            (0, Flag.RESPONSE, False),
            (5, Flag.MUST_UNDERSTAND, True),
        ]
        for tag, flags, isRequest in cases:
            record = decodeRecord(Frame(0x0250, flags, tag, b"\x00\x01"))
            self.assertIsInstance(record, UnknownRecord)
            self.assertEqual(record.type, 0x0250)
            self.assertEqual(record.body, b"\x00\x01")
            self.assertEqual(record.tag, tag)
            self.assertEqual(record.response, bool(flags & Flag.RESPONSE))
            self.assertEqual(record.mustUnderstand, bool(flags & Flag.MUST_UNDERSTAND))
            self.assertEqual(record.isRequest, isRequest, (tag, flags))

    def test_unknownRecordBodyNotParsed(self):
        """
        The body of an unknown record is not parsed, so it may be anything.
        """
        record = decodeRecord(Frame(0x0999, 0, 0, b"\xff\xff\xff"))
        self.assertEqual(record.body, b"\xff\xff\xff")

    def test_alwaysResponse(self):
        """
        Records of response-only classes decode with C{response} true even
        when the flag is clear, and are always sent with it.
        """
        classes = [cls for cls in RECORD_CLASSES.values() if cls.ALWAYS_RESPONSE]
        self.assertIn(Pong, classes)
        self.assertIn(Error, classes)
        self.assertIn(Ack, classes)
        for cls in classes:
            record = VECTOR_BY_CLASS[cls]
            self.assertTrue(record.flags & Flag.RESPONSE, cls.__name__)
            frame = Frame(cls.TYPE, 0, record.tag, bodyOf(record))
            decoded = decodeRecord(frame)
            self.assertTrue(decoded.response, cls.__name__)
            self.assertEqual(decoded, attrs.evolve(record, response=True))

    def test_responseOnlyRecordsEqualTheirDecoding(self):
        """
        A record of a response-only class built without C{response=True}
        equals its own decoding: C{Pong(tag=1)} is what arrives when
        C{Pong(tag=1)} is sent.
        """
        for cls in RECORD_CLASSES.values():
            if cls.ALWAYS_RESPONSE:
                record = attrs.evolve(VECTOR_BY_CLASS[cls], response=False)
                self.assertEqual(roundTrip(record), record, cls.__name__)

    def test_otherClassesKeepResponseFlag(self):
        """
        Other classes decode C{response} from the flag.
        """
        record = VECTOR_BY_CLASS[Close]
        self.assertFalse(roundTrip(record).response)
        self.assertTrue(roundTrip(attrs.evolve(record, response=True)).response)

    def test_reservedFlagsIgnored(self):
        """
        Reserved flag bits are ignored.
        """
        frame = Frame(RecordType.PING, 0xFFFC, 1, b"")
        self.assertEqual(decodeRecord(frame), Ping(tag=1))

    def test_decodeRecordsUnfinished(self):
        """
        L{decodeRecords} refuses bytes that end inside a record.
        """
        data = encodeRecord(VECTOR_BY_CLASS[Message])
        self.assertRaises(MalformedRecord, decodeRecords, data[:-1], 65536)
        self.assertEqual(len(decodeRecords(data * 2, 65536)), 2)


class EncodeTests(SynchronousTestCase):
    """
    L{encodeRecord} refuses what cannot be sent.
    """

    def test_fieldOrder(self):
        """
        Fields are sent in the order the class declares them.
        """
        body = bodyOf(VECTOR_BY_CLASS[Hello])
        identifiers = []
        offset = 0
        while offset < len(body):
            ident, length = FIELD_HEADER.unpack_from(body, offset)
            identifiers.append(ident)
            offset += FIELD_HEADER.size + length
        self.assertEqual(
            identifiers,
            [Field.VERSION_MIN, Field.VERSION_MAX, Field.CAPABILITY,
             Field.CAPABILITY, Field.MAX_RECORD, Field.SOFTWARE],
        )

    def test_missingRequired(self):
        """
        A required field left as C{None} raises L{EncodeError}.
        """
        self.assertRaises(
            EncodeError, encodeRecord, Hello(versionMin=1, versionMax=1, maxRecord=None)
        )
        self.assertRaises(EncodeError, encodeRecord, Error(code=None))

    def test_u16OutOfRange(self):
        """
        A u16 value outside 0..65535 raises L{EncodeError}.
        """
        for port in (-1, 0x10000):
            self.assertRaises(
                EncodeError, encodeRecord, Redirect(host="h", port=port)
            )

    def test_u32OutOfRange(self):
        """
        A u32 value outside 0..2**32-1 raises L{EncodeError}, in a plain
        field or in a list of tags.
        """
        for value in (-1, 2**32):
            self.assertRaises(
                EncodeError,
                encodeRecord,
                Hello(versionMin=1, versionMax=1, maxRecord=value),
            )
            self.assertRaises(EncodeError, encodeRecord, Ack(tags=(1, value)))

    def test_tagOutOfRange(self):
        """
        A tag outside 0..2**32-1 raises L{EncodeError}.
        """
        for tag in (-1, 2**32):
            self.assertRaises(EncodeError, encodeRecord, Ping(tag=tag))
            self.assertRaises(EncodeError, encodeRecord, UnknownRecord(type=0x200, tag=tag))

    def test_unknownTypeOutOfRange(self):
        """
        An L{UnknownRecord} whose type does not fit in a u16 raises
        L{EncodeError}.
        """
        for recordType in (-1, 0x10000):
            self.assertRaises(EncodeError, encodeRecord, UnknownRecord(type=recordType))

    def test_nulInString(self):
        """
        U+0000 in a string raises L{EncodeError}.
        """
        self.assertRaises(EncodeError, encodeRecord, Close(text="a\x00b"))

    def test_surrogateInString(self):
        """
        A lone surrogate in a string raises L{EncodeError}.
        """
        self.assertRaises(EncodeError, encodeRecord, Close(text="a\ud800b"))

    def test_wrongType(self):
        """
        A value of the wrong Python type raises L{EncodeError}.
        """
        self.assertRaises(EncodeError, encodeRecord, Close(text=5))
        self.assertRaises(EncodeError, encodeRecord, Close(code="400"))
        self.assertRaises(EncodeError, encodeRecord, Ack(tags=("a",)))

    def test_isValueError(self):
        """
        L{EncodeError} is a L{ValueError}, not a L{WireError}: it is the
        caller's bug, not the peer's.
        """
        self.assertTrue(issubclass(EncodeError, ValueError))
        self.assertFalse(issubclass(EncodeError, WireError))


class ErrorCodeTests(SynchronousTestCase):
    """
    Tests for L{ErrorCode} and L{isTemporary}.
    """

    def test_isTemporary(self):
        """
        Codes 400-499 are temporary; every other code, known or not, is
        permanent.
        """
        for code in (400, 401, 450, 499):
            self.assertTrue(isTemporary(code), code)
        for code in (0, 200, 399, 500, 531, 599, 600, 999, 65535):
            self.assertFalse(isTemporary(code), code)

    def test_temporaryProperty(self):
        """
        Every 4xx member is temporary and every 5xx member permanent.
        """
        for code in ErrorCode:
            self.assertEqual(code.temporary, 400 <= code < 500, code.name)
            self.assertIn(code // 100, (4, 5))

    def test_token(self):
        """
        The token is the lower-case hyphenated name.
        """
        self.assertEqual(ErrorCode.RELAY_DENIED.token, "relay-denied")
        self.assertEqual(ErrorCode.NOT_IMX.token, "not-imx")
        self.assertEqual(ErrorCode.INVALID_UTF8.token, "invalid-utf8")
        self.assertEqual(ErrorCode.VERSION_UNSUPPORTED.token, "version-unsupported")
        self.assertEqual(ErrorCode.TIMEOUT.token, "timeout")

    def test_numbers(self):
        """
        A few codes have the numbers the specification gives them.
        """
        self.assertEqual(ErrorCode.MALFORMED, 500)
        self.assertEqual(ErrorCode.MUST_UNDERSTAND, 502)
        self.assertEqual(ErrorCode.BAD_SEQUENCE, 503)
        self.assertEqual(ErrorCode.RECORD_TOO_LARGE, 505)
        self.assertEqual(ErrorCode.NOT_AUTHENTICATED, 510)

    def test_wireErrorCodes(self):
        """
        Each codec error carries the code to send back.
        """
        self.assertEqual(WireError("x").code, ErrorCode.MALFORMED)
        self.assertEqual(MalformedRecord("x").code, ErrorCode.MALFORMED)
        self.assertEqual(InvalidUTF8("x").code, ErrorCode.INVALID_UTF8)
        self.assertEqual(MustUnderstand("x").code, ErrorCode.MUST_UNDERSTAND)
        self.assertEqual(MalformedRecord("x", 9).tag, 9)
        self.assertEqual(MalformedRecord("x").tag, 0)


# -- property tests -----------------------------------------------------------

#: Text that a string field can carry: no U+0000, no surrogates.
_text = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")


def valueStrategy(spec):
    """
    @return: a strategy for one value of the field C{spec} describes,
        respecting its length bounds.
    """
    low, high = spec.lengths or (0, 64)
    kind = spec.kind
    if kind is FieldKind.U16:
        return st.integers(0, 0xFFFF)
    if kind is FieldKind.U32:
        return st.integers(0, U32_MAX)
    if kind is FieldKind.TAGS:
        return st.lists(st.integers(0, U32_MAX), max_size=6).map(tuple)
    if kind is FieldKind.BYTES:
        return st.binary(min_size=low, max_size=min(high, 64))
    # At most 4 octets a character: 16 characters fit every bound (>= 64).
    assert high >= 64
    return st.text(_text, min_size=low, max_size=16)


def recordStrategy(cls):
    """
    @return: a strategy for arbitrary valid instances of C{cls}, derived
        from its fields.
    """
    kwargs = {
        "tag": st.integers(0, U32_MAX),
        "response": st.just(True) if cls.ALWAYS_RESPONSE else st.booleans(),
        "mustUnderstand": st.booleans(),
    }
    for spec in cls.FIELDS:
        value = valueStrategy(spec)
        if spec.repeated:
            kwargs[spec.attribute] = st.lists(
                value, min_size=1 if spec.required else 0, max_size=4
            ).map(tuple)
        elif spec.required:
            kwargs[spec.attribute] = value
        else:
            kwargs[spec.attribute] = st.none() | value
    return st.builds(cls, **kwargs)


_unknownTypes = st.integers(0, 0xFFFF).filter(lambda t: t not in RECORD_CLASSES)

unknownRecords = st.builds(
    UnknownRecord,
    type=_unknownTypes,
    body=st.binary(max_size=64),
    tag=st.integers(0, U32_MAX),
    response=st.booleans(),
    mustUnderstand=st.booleans(),
)

anyRecord = (
    st.sampled_from(sorted(RECORD_CLASSES.values(), key=lambda c: c.TYPE)).flatmap(
        recordStrategy
    )
    | unknownRecords
)

#: Field values: the right width for some kinds, and anything.
_rawValues = st.one_of(
    st.binary(min_size=2, max_size=2),
    st.binary(min_size=4, max_size=4),
    st.binary(max_size=12),
    st.text(_text, min_size=1, max_size=8).map(lambda s: s.encode("utf-8")),
)

_tails = st.sampled_from([b""] * 8 + [b"\x00", b"\x00\x07\x00\x00\x00\x05ab"])


def randomFramesOf(recordType):
    """
    @return: a strategy for frames of C{recordType} whose bodies are random
        sequences of fields: mostly the type's own fields (with and without
        the must-understand bit), some other known or unknown ones.
    """
    cls = RECORD_CLASSES.get(recordType)
    own = [spec.field for spec in cls.FIELDS] if cls is not None else []
    identifiers = [
        st.sampled_from(list(Field)),
        st.integers(0, 0xFFFF),
    ]
    if own:
        identifiers = [
            st.sampled_from(own),
            st.sampled_from(own),
            st.sampled_from(own).map(lambda f: f | FIELD_MUST_UNDERSTAND),
        ] + identifiers
    body = st.builds(
        lambda fields, tail: b"".join(field(i, v) for i, v in fields) + tail,
        st.lists(st.tuples(st.one_of(identifiers), _rawValues), max_size=8),
        _tails,
    )
    return st.builds(
        encodeFrame,
        st.just(recordType),
        st.integers(0, 0xFFFF),
        st.integers(0, U32_MAX),
        body,
    )


#: Frames with plausible headers and random bodies.
randomFrames = (st.sampled_from(list(RecordType)) | st.integers(0, 0xFFFF)).flatmap(
    randomFramesOf
)

#: Byte strings: random, and sequences of plausible frames.
anyBytes = st.one_of(
    st.binary(max_size=200),
    st.lists(randomFrames, max_size=4).map(b"".join),
)


def decodeStream(data, expectPreamble, maxRecordSize=65536, chunk=None):
    """
    Feed C{data} to a L{FrameDecoder} and decode every frame, checking that
    nothing but L{WireError} is raised and that what decodes re-encodes.

    @return: the records that decoded.
    """
    decoder = FrameDecoder(maxRecordSize, expectPreamble=expectPreamble)
    chunk = chunk or max(len(data), 1)
    frames = []
    try:
        for i in range(0, len(data), chunk):
            frames.extend(decoder.feed(data[i : i + chunk]))
    except WireError:
        pass
    records = []
    for frame in frames:
        try:
            record = decodeRecord(frame)
        except WireError:
            continue
        # What decodes is valid: it encodes, and decodes to itself again.
        assert roundTrip(record) == record, record
        records.append(record)
    return records


class PropertyTests(SynchronousTestCase):
    """
    Properties of the codec over generated input.
    """

    @settings(propertySettings, max_examples=200)
    @given(data=anyBytes, preamble=st.booleans(), chunk=st.integers(1, 64))
    def test_arbitraryBytes(self, data, preamble, chunk):
        """
        Any byte string, with or without the preamble, fed whole or in
        chunks, either decodes or raises L{WireError}.
        """
        if preamble:
            decodeStream(PREAMBLE + data, True, chunk=chunk)
        decodeStream(data, False, chunk=chunk)
        decodeStream(data, True, chunk=chunk)
        decodeStream(data, False, maxRecordSize=16)

    @propertySettings
    @given(data=st.sampled_from(sorted(RECORD_CLASSES)).flatmap(randomFramesOf))
    def test_randomFieldsOfEveryType(self, data):
        """
        A record of any known type with random fields either decodes or
        raises L{WireError}.
        """
        decodeStream(data, False)

    @propertySettings
    @given(record=anyRecord)
    def test_roundTrip(self, record):
        """
        Every valid record of every class decodes to itself.
        """
        self.assertEqual(roundTrip(record), record)

    @settings(propertySettings, max_examples=100)
    @given(records=st.lists(anyRecord, min_size=1, max_size=5), chunk=st.integers(1, 40))
    def test_streamRoundTrip(self, records, chunk):
        """
        A stream of valid records, cut into chunks of any size, decodes to
        the same records.
        """
        data = PREAMBLE + b"".join(encodeRecord(r) for r in records)
        self.assertEqual(decodeStream(data, True, U32_MAX, chunk), records)

    @propertySettings
    @given(
        vector=st.sampled_from([encodeRecord(r) for _n, r in VECTORS]),
        mutations=st.lists(
            st.tuples(
                st.sampled_from(["flip", "insert", "delete"]),
                st.integers(0, 10**6),
                st.integers(0, 255),
            ),
            min_size=1,
            max_size=4,
        ),
    )
    def test_mutatedVectors(self, vector, mutations):
        """
        A vector with bytes flipped, inserted or deleted either decodes or
        raises L{WireError}.
        """
        data = bytearray(vector)
        for operation, position, value in mutations:
            if operation == "insert":
                data.insert(position % (len(data) + 1), value)
            elif not data:
                continue
            elif operation == "flip":
                data[position % len(data)] ^= value or 1
            else:
                del data[position % len(data)]
        decodeStream(bytes(data), False)
        decodeStream(PREAMBLE + bytes(data), True, chunk=7)
