"""
Field encoding: a record body is a sequence of fields, each a 6-byte
header (identifier u16, length u32) and a value whose encoding the field's
L{FieldKind} gives.
"""

import struct

from imxd.wire.constants import FIELD_MUST_UNDERSTAND, FieldKind
from imxd.wire.errors import EncodeError, InvalidUTF8, MalformedRecord

FIELD_HEADER = struct.Struct(">HI")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


def iterateFields(body, tag=0):
    """
    Split a record body into its fields.

    @param body: the record body.
    @param tag: the record's tag, carried by any error raised.
    @return: an iterator of C{(identifier, value)} pairs, C{value} the raw
        bytes, C{identifier} with its must-understand bit still set.
    @raise MalformedRecord: a field overruns the body.
    """
    offset = 0
    end = len(body)
    headerSize = FIELD_HEADER.size
    while offset < end:
        if end - offset < headerSize:
            raise MalformedRecord(
                f"{end - offset} stray bytes at the end of the record body", tag
            )
        identifier, length = FIELD_HEADER.unpack_from(body, offset)
        offset += headerSize
        if length > end - offset:
            raise MalformedRecord(
                f"field 0x{identifier:04x} announces {length} bytes but only "
                f"{end - offset} remain in the record",
                tag,
            )
        yield identifier, body[offset : offset + length]
        offset += length


def decodeValue(kind, raw, identifier, tag=0):
    """
    Decode one field value.

    @param kind: the field's L{FieldKind}.
    @param raw: the value's bytes.
    @param identifier: the field identifier, for error messages.
    @param tag: the record's tag, carried by any error raised.
    @return: an L{int}, L{str}, L{bytes} or L{tuple} of L{int}.
    @raise MalformedRecord: the value has the wrong width.
    @raise InvalidUTF8: a text value is not UTF-8 or contains U+0000.
    """
    if kind is FieldKind.STRING:
        if 0 in raw:  # an int: bytes.__contains__ with bytes formats and drops a TypeError first
            raise InvalidUTF8(f"field 0x{identifier:04x} contains U+0000", tag)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidUTF8(
                f"field 0x{identifier:04x} is not valid UTF-8 ({e.reason} at "
                f"byte {e.start})",
                tag,
            ) from None
    if kind is FieldKind.BYTES:
        return raw
    if kind is FieldKind.U32:
        if len(raw) != 4:
            raise MalformedRecord(
                f"field 0x{identifier:04x} is a u32 but has {len(raw)} bytes", tag
            )
        return _U32.unpack(raw)[0]
    if kind is FieldKind.U16:
        if len(raw) != 2:
            raise MalformedRecord(
                f"field 0x{identifier:04x} is a u16 but has {len(raw)} bytes", tag
            )
        return _U16.unpack(raw)[0]
    if len(raw) % 4:
        raise MalformedRecord(
            f"field 0x{identifier:04x} is a list of u32 but has {len(raw)} bytes",
            tag,
        )
    return struct.unpack(f">{len(raw) // 4}I", raw)


def encodeValue(kind, value, identifier):
    """
    Encode one field value.

    @return: the value's bytes.
    @raise EncodeError: the value does not fit the kind.
    """
    try:
        if kind is FieldKind.STRING:
            if "\x00" in value:
                raise EncodeError(f"field 0x{identifier:04x} contains U+0000")
            return value.encode("utf-8")
        if kind is FieldKind.BYTES:
            return bytes(value)
        if kind is FieldKind.U32:
            return _U32.pack(value)
        if kind is FieldKind.U16:
            return _U16.pack(value)
        return struct.pack(f">{len(value)}I", *value)
    except (struct.error, TypeError, AttributeError, UnicodeEncodeError) as e:
        raise EncodeError(
            f"field 0x{identifier:04x} cannot hold {value!r} as {kind.value}: {e}"
        ) from None


def encodeField(identifier, kind, value):
    """
    Encode one field: header and value.

    @return: the field's bytes.
    """
    raw = encodeValue(kind, value, identifier)
    return FIELD_HEADER.pack(identifier, len(raw)) + raw


def isMustUnderstand(identifier):
    """
    @return: whether a field identifier carries the must-understand bit.
    """
    return bool(identifier & FIELD_MUST_UNDERSTAND)


def _encodeString(value):
    if "\x00" in value:
        raise ValueError
    return value.encode("utf-8")


def _decodeString(raw):
    if 0 in raw:  # the octet 0 (an int is far cheaper to look for than b"\x00")
        raise ValueError
    return raw.decode("utf-8")


def _decodeU16(raw):
    return _U16.unpack(raw)[0]


def _decodeU32(raw):
    return _U32.unpack(raw)[0]


def _decodeTags(raw):
    if len(raw) % 4:
        raise ValueError
    return struct.unpack(f">{len(raw) // 4}I", raw)


def _encodeTags(value):
    return struct.pack(f">{len(value)}I", *value)


def _identity(raw):
    return raw


#: For each kind: a fast encoder (value -> bytes) and a fast decoder (bytes
#: -> value) for the values that are valid.  Either raises on anything
#: else, and the caller then asks L{encodeValue} or L{decodeValue}, which
#: give the error with its explanation.
FAST_CODECS = {
    FieldKind.STRING: (_encodeString, _decodeString),
    FieldKind.BYTES: (bytes, _identity),
    FieldKind.U16: (_U16.pack, _decodeU16),
    FieldKind.U32: (_U32.pack, _decodeU32),
    FieldKind.TAGS: (_encodeTags, _decodeTags),
}
