"""
The typed records of IMX protocol v1 and the two functions that turn them
into bytes and back: L{encodeRecord} and L{decodeRecord}.

Each record class lists its fields once, as L{wireField}s; encoding and
decoding are driven by that list, so the classes below are the whole
schema.
"""

import attrs

from imxd.wire.accelerator import speedups
from imxd.wire.constants import FIELD_KINDS, FIELD_LENGTHS, Field, FieldKind, Flag, RecordType
from imxd.wire.errors import EncodeError, MalformedRecord, MustUnderstand
from imxd.wire.fields import (
    FAST_CODECS,
    FIELD_HEADER,
    decodeValue,
    encodeValue,
    isMustUnderstand,
)
from imxd.wire.framing import Frame, FrameDecoder, encodeFrame

_WIRE = "imxd.wire"

#: Record classes by type number.
RECORD_CLASSES = {}


@attrs.frozen
class FieldSpec:
    """
    How one attribute of a record class travels on the wire.
    """

    attribute: str
    field: Field
    required: bool
    repeated: bool
    lengths: tuple = attrs.field(default=None)

    def __attrs_post_init__(self):
        object.__setattr__(self, "lengths", FIELD_LENGTHS.get(self.field))

    @property
    def kind(self):
        """
        The field's L{FieldKind}.
        """
        return FIELD_KINDS[self.field]


def wireField(field, *, required=False, repeated=False):
    """
    Declare a record attribute carried in C{field}.

    Required fields have no default; optional ones default to C{None};
    repeated ones to an empty tuple (a required repeated field must hold at
    least one value).
    """
    metadata = {_WIRE: (field, required, repeated)}
    if repeated:
        return attrs.field(default=(), converter=tuple, metadata=metadata)
    if required:
        return attrs.field(metadata=metadata)
    return attrs.field(default=None, metadata=metadata)


@attrs.frozen(kw_only=True)
class Record:
    """
    Header values common to every record.

    @ivar tag: 0, or the request's tag (on a request and its response).
    @ivar response: whether the RESPONSE flag is set.
    @ivar mustUnderstand: whether the MUST_UNDERSTAND flag is set.
    @ivar _wire: the encoded body, once the record was decoded from it or
        encoded (a record is immutable, so its body is encoded once however
        often it is sent or stored); L{None} before.  Copies made with
        L{withTag} share it; C{attrs.evolve} drops it.
    """

    TYPE = None
    ALWAYS_RESPONSE = False
    FIELDS = ()
    #: The accelerator's schema of the class (L{fastCodecOf}), or L{None}.
    _FAST = None

    tag: int = 0
    response: bool = False
    mustUnderstand: bool = False
    _wire: bytes | None = attrs.field(default=None, init=False, eq=False, repr=False)

    def __attrs_post_init__(self):
        if self.ALWAYS_RESPONSE and not self.response:
            object.__setattr__(self, "response", True)

    @property
    def flags(self):
        """
        The header flags word this record is sent with.
        """
        flags = 0
        if self.response or self.ALWAYS_RESPONSE:
            flags |= Flag.RESPONSE
        if self.mustUnderstand:
            flags |= Flag.MUST_UNDERSTAND
        return flags


_RESPONSE = int(Flag.RESPONSE)
_MUST_UNDERSTAND = int(Flag.MUST_UNDERSTAND)

#: Length bounds of fields that have none: any length a u32 can say.
_ANY_LENGTH = (0, 0xFFFFFFFF)


#: How L{decodeRecord} decodes a field value: text and bytes in line (five
#: of a MESSAGE's fields; a call each cost 4 % of its decode), the rest by
#: their L{FAST_CODECS} function.
_AS_TEXT, _AS_BYTES, _BY_FUNCTION = range(3)
_DECODED_HOW = {FieldKind.STRING: _AS_TEXT, FieldKind.BYTES: _AS_BYTES}


def _codecsOf(specs):
    """
    @return: a record class's field encoders, in order, and its field
        decoders by identifier, each with what it needs at hand.
    """
    encoders = []
    decoders = {}
    for spec in specs:
        encode, decode = FAST_CODECS[spec.kind]
        low, high = spec.lengths or _ANY_LENGTH
        identifier = int(spec.field)
        encoders.append(
            (spec.attribute, identifier, encode, low, high, spec.repeated, spec.required, spec)
        )
        how = _DECODED_HOW.get(spec.kind, _BY_FUNCTION)
        decoders[identifier] = (spec.attribute, decode, low, high, spec.repeated, spec, how)
    return tuple(encoders), decoders



#: Field kinds as the accelerator numbers them.
_KIND_NUMBERS = {
    FieldKind.STRING: 0,
    FieldKind.BYTES: 1,
    FieldKind.U16: 2,
    FieldKind.U32: 3,
    FieldKind.TAGS: 4,
}


def fastCodecOf(cls):
    """
    @return: the accelerator's C{Schema} of a record class (its
        C{decode(flags, tag, body)} and C{encode(record)} answer L{None}
        for anything but a valid record), or L{None} without the
        accelerator.
    """
    if speedups is None:
        return None
    fields = tuple(
        (spec.attribute, int(spec.field), _KIND_NUMBERS[spec.kind])
        + (spec.lengths or _ANY_LENGTH)
        + (spec.repeated, spec.required)
        for spec in cls.FIELDS
    )
    return speedups.Schema(cls, fields, cls.ALWAYS_RESPONSE)


def record(recordType, alwaysResponse=False):
    """
    Class decorator: make an attrs record class for C{recordType} and
    register it for decoding.
    """

    def decorate(cls):
        cls = attrs.frozen(kw_only=True)(cls)
        cls.TYPE = recordType
        cls.ALWAYS_RESPONSE = alwaysResponse
        specs = []
        for attribute in attrs.fields(cls):
            wire = attribute.metadata.get(_WIRE)
            if wire is not None:
                specs.append(FieldSpec(attribute.name, *wire))
        cls.FIELDS = tuple(specs)
        # Each attribute's slot setter: decoding and withTag fill a new
        # record through these (object.__setattr__ costs twice as much).
        cls._SETTERS = {
            attribute.name: getattr(cls, attribute.name).__set__ for attribute in attrs.fields(cls)
        }
        # What decodeRecord fills for each wire field: the value decoded,
        # or the field's default.
        cls._FILL = tuple(
            (attribute.name, cls._SETTERS[attribute.name], attribute.default)
            for attribute in attrs.fields(cls)
            if _WIRE in attribute.metadata
        )
        cls._ENCODERS, cls._DECODERS = _codecsOf(specs)
        cls._REQUIRED = tuple(spec for spec in specs if spec.required)
        cls._FAST = fastCodecOf(cls)
        RECORD_CLASSES[recordType] = cls
        return cls

    return decorate


@attrs.frozen(kw_only=True)
class UnknownRecord(Record):
    """
    A record of a type this version does not know, kept undecoded.
    """

    type: int
    body: bytes = b""

    @property
    def isRequest(self):
        """
        Whether the sender expects an answer (tagged and not a response).
        """
        return self.tag != 0 and not self.response


# -- connection records -------------------------------------------------


@record(RecordType.HELLO)
class Hello(Record):
    """
    First record in each direction: the versions and capabilities spoken.
    """

    versionMin: int = wireField(Field.VERSION_MIN, required=True)
    versionMax: int = wireField(Field.VERSION_MAX, required=True)
    capabilities: tuple = wireField(Field.CAPABILITY, repeated=True)
    maxRecord: int = wireField(Field.MAX_RECORD, required=True)
    software: str = wireField(Field.SOFTWARE)
    toDomain: str = wireField(Field.TO_DOMAIN)


@record(RecordType.PING)
class Ping(Record):
    """
    Keepalive request; answered by L{Pong} with the same tag.
    """


@record(RecordType.PONG, alwaysResponse=True)
class Pong(Record):
    """
    Answer to L{Ping}.
    """


@record(RecordType.CLOSE)
class Close(Record):
    """
    Orderly close: the sender sends no further requests.
    """

    code: int = wireField(Field.CODE)
    text: str = wireField(Field.TEXT)


@record(RecordType.ERROR, alwaysResponse=True)
class Error(Record):
    """
    A refusal: of the request whose tag it carries, or (tag 0) of the
    connection or of untagged records.
    """

    code: int = wireField(Field.CODE, required=True)
    text: str = wireField(Field.TEXT)
    retryAfter: int = wireField(Field.RETRY_AFTER)
    fromDomain: str = wireField(Field.FROM_DOMAIN)
    toDomain: str = wireField(Field.TO_DOMAIN)


@record(RecordType.ACK, alwaysResponse=True)
class Ack(Record):
    """
    Success of every request whose tag it lists.
    """

    tags: tuple = wireField(Field.ACK_TAGS, required=True)


@record(RecordType.REDIRECT)
class Redirect(Record):
    """
    Reconnect to another address (4.4.4).
    """

    host: str = wireField(Field.HOST, required=True)
    port: int = wireField(Field.PORT, required=True)
    text: str = wireField(Field.TEXT)
    domains: tuple = wireField(Field.TO_DOMAIN, repeated=True)


@record(RecordType.STARTTLS)
class StartTLS(Record):
    """
    Request to upgrade the connection to TLS.
    """


@record(RecordType.STARTTLS_PROCEED, alwaysResponse=True)
class StartTLSProceed(Record):
    """
    Consent to L{StartTLS}; the TLS handshake follows at once.
    """


# -- dial-back records ---------------------------------------------------


@record(RecordType.DIALBACK_KEY)
class DialbackKey(Record):
    """
    Connection 1, originator to receiver: authenticate this domain pair.
    """

    fromDomain: str = wireField(Field.FROM_DOMAIN, required=True)
    toDomain: str = wireField(Field.TO_DOMAIN, required=True)
    token: bytes = wireField(Field.TOKEN, required=True)


@record(RecordType.DIALBACK_VERIFY)
class DialbackVerify(Record):
    """
    Connection 2, receiver to originator: the originator's token and the
    receiver's secret.
    """

    fromDomain: str = wireField(Field.FROM_DOMAIN, required=True)
    toDomain: str = wireField(Field.TO_DOMAIN, required=True)
    token: bytes = wireField(Field.TOKEN, required=True)
    secret: bytes = wireField(Field.SECRET, required=True)


@record(RecordType.DIALBACK_SECRET)
class DialbackSecret(Record):
    """
    Connection 1, originator to receiver: the secret echoed back.
    """

    fromDomain: str = wireField(Field.FROM_DOMAIN, required=True)
    toDomain: str = wireField(Field.TO_DOMAIN, required=True)
    secret: bytes = wireField(Field.SECRET, required=True)


@record(RecordType.DIALBACK_RESULT, alwaysResponse=True)
class DialbackResult(Record):
    """
    Answer to L{DialbackKey}: the pair is authenticated on this connection.
    """

    fromDomain: str = wireField(Field.FROM_DOMAIN, required=True)
    toDomain: str = wireField(Field.TO_DOMAIN, required=True)


# -- Data records ----------------------------------------------------------


@record(RecordType.MESSAGE)
class Message(Record):
    """
    An instant message: the envelope and the undecoded MIME body.
    """

    sender: str = wireField(Field.FROM, required=True)
    recipient: str = wireField(Field.TO, required=True)
    messageId: str = wireField(Field.MESSAGE_ID, required=True)
    contentType: str = wireField(Field.CONTENT_TYPE, required=True)
    body: bytes = wireField(Field.BODY, required=True)
    attributes: tuple = wireField(Field.ATTRIBUTE, repeated=True)


@record(RecordType.SUBSCRIBE)
class Subscribe(Record):
    """
    Ask for a presence subscription to C{publisher}.
    """

    subscriber: str = wireField(Field.FROM, required=True)
    publisher: str = wireField(Field.TO, required=True)
    expires: int = wireField(Field.EXPIRES)
    origin: str = wireField(Field.ORIGIN)


@record(RecordType.RENEW)
class Renew(Subscribe):
    """
    Extend a granted subscription (the fields of L{Subscribe}).
    """


@record(RecordType.UNSUBSCRIBE)
class Unsubscribe(Record):
    """
    Cancel a subscription (or a pending request).
    """

    subscriber: str = wireField(Field.FROM, required=True)
    publisher: str = wireField(Field.TO, required=True)


@record(RecordType.SUBSCRIPTION_STATE)
class SubscriptionState(Record):
    """
    The state of a subscription, sent by the publisher's server: as the
    response to SUBSCRIBE or RENEW, or later as a request of its own.
    """

    publisher: str = wireField(Field.FROM, required=True)
    subscriber: str = wireField(Field.TO, required=True)
    state: str = wireField(Field.STATE, required=True)
    expires: int = wireField(Field.EXPIRES)
    origin: str = wireField(Field.ORIGIN)


@record(RecordType.NOTIFY)
class Notify(Record):
    """
    A presence change of C{publisher} for subscribers of one domain.
    """

    publisher: str = wireField(Field.FROM, required=True)
    subscribers: tuple = wireField(Field.TO, repeated=True, required=True)
    presence: str = wireField(Field.PRESENCE, required=True)
    status: str = wireField(Field.STATUS)
    attributes: tuple = wireField(Field.ATTRIBUTE, repeated=True)


@record(RecordType.USER_ATTRIBUTES_GET)
class UserAttributesGet(Record):
    """
    Ask for named attributes of a user (all visible ones if none named).
    """

    requester: str = wireField(Field.FROM, required=True)
    target: str = wireField(Field.TARGET, required=True)
    names: tuple = wireField(Field.NAME, repeated=True)
    origin: str = wireField(Field.ORIGIN)


@record(RecordType.DOMAIN_ATTRIBUTES_GET)
class DomainAttributesGet(UserAttributesGet):
    """
    Ask for named attributes of a domain (all if none named); C{requester}
    may be an address or a domain, C{target} is a domain.
    """


@record(RecordType.ATTRIBUTES, alwaysResponse=True)
class Attributes(Record):
    """
    Answer to an attribute request: C{name=value} strings.
    """

    target: str = wireField(Field.TARGET, required=True)
    attributes: tuple = wireField(Field.ATTRIBUTE, repeated=True)
    ttl: int = wireField(Field.TTL)


# -- backend link records (link connections only) --------------------------


@record(RecordType.LINK_AUTH)
class LinkAuth(Record):
    """
    Link: the backend proves it serves C{domain} with the domain's secret.
    """

    domain: str = wireField(Field.TO_DOMAIN, required=True)
    secret: bytes = wireField(Field.SECRET, required=True)


@record(RecordType.PUBLISH)
class Publish(Record):
    """
    Link: a user's presence changed; imxd notifies every subscriber.
    """

    user: str = wireField(Field.FROM, required=True)
    presence: str = wireField(Field.PRESENCE, required=True)
    status: str = wireField(Field.STATUS)
    attributes: tuple = wireField(Field.ATTRIBUTE, repeated=True)


@record(RecordType.REPORT)
class Report(Record):
    """
    Link: what became of a message the backend sent: delivered (no CODE)
    or failed for good (the CODE and TEXT of the refusal).
    """

    sender: str = wireField(Field.FROM, required=True)
    recipient: str = wireField(Field.TO, required=True)
    messageId: str = wireField(Field.MESSAGE_ID, required=True)
    code: int = wireField(Field.CODE)
    text: str = wireField(Field.TEXT)


@record(RecordType.DELIVERED, alwaysResponse=True)
class Delivered(Record):
    """
    Link: the answer to every MESSAGE whose tag it lists: accepted, and
    already delivered (C{report-answer}; protocol.md section 19.3).
    """

    tags: tuple = wireField(Field.ACK_TAGS, required=True)


# -- admin records (admin endpoint only) -----------------------------------


@record(RecordType.DRAIN)
class Drain(Record):
    """
    Admin: redirect every peer to C{host}:C{port} and stop taking work.
    """

    host: str = wireField(Field.HOST, required=True)
    port: int = wireField(Field.PORT, required=True)
    text: str = wireField(Field.TEXT)


@record(RecordType.STATUS)
class Status(Record):
    """
    Admin: ask for the server's status.
    """


@record(RecordType.STATUS_RESULT, alwaysResponse=True)
class StatusResult(Record):
    """
    Admin: the server's status as C{name=value} strings.
    """

    attributes: tuple = wireField(Field.ATTRIBUTE, repeated=True)


#: Data record types (section 12): requests that need an authenticated pair.
DATA_TYPES = frozenset(
    {
        RecordType.MESSAGE,
        RecordType.SUBSCRIBE,
        RecordType.RENEW,
        RecordType.UNSUBSCRIBE,
        RecordType.SUBSCRIPTION_STATE,
        RecordType.NOTIFY,
        RecordType.USER_ATTRIBUTES_GET,
        RecordType.DOMAIN_ATTRIBUTES_GET,
    }
)

#: Record types that only a backend link connection carries.
LINK_TYPES = frozenset(
    {RecordType.LINK_AUTH, RecordType.PUBLISH, RecordType.REPORT, RecordType.DELIVERED}
)

#: Record types that only the admin endpoint accepts.
ADMIN_TYPES = frozenset(
    {RecordType.DRAIN, RecordType.STATUS, RecordType.STATUS_RESULT}
)


#: The accelerator's schema of every record class, by type (empty without
#: the accelerator): what a L{FrameDecoder} decodes with as it frames.
FAST_SCHEMAS = {t: cls._FAST for t, cls in RECORD_CLASSES.items() if cls._FAST is not None}


def encodeBody(record):
    """
    Encode a record's fields, in the order its class declares them.

    @return: the record body.
    @raise EncodeError: a required field is missing or a value does not fit.
    """
    parts = []
    append = parts.append
    for attribute, identifier, encode, low, high, repeated, required, spec in record._ENCODERS:
        value = getattr(record, attribute)
        if repeated:
            if not value:
                if required:
                    _missing(record, attribute)
                continue
            items = value
        elif value is None:
            if required:
                _missing(record, attribute)
            continue
        else:
            items = (value,)
        for item in items:
            try:
                raw = encode(item)
            except Exception:
                raw = encodeValue(spec.kind, item, identifier)
            size = len(raw)
            if not low <= size <= high:
                raise EncodeError(
                    f"field {spec.field.name} of {size} octets is outside {low}..{high}"
                )
            append(FIELD_HEADER.pack(identifier, size))
            append(raw)
    return b"".join(parts)


def _missing(record, attribute):
    raise EncodeError(f"{type(record).__name__}.{attribute} is required")


def encodeRecord(record, tag=None):
    """
    Encode a record, header included.

    @param record: a L{Record} (or L{UnknownRecord}).
    @param tag: the tag to send it with, or L{None} for its own.
    @return: the bytes to write.
    @raise EncodeError: the record cannot be encoded.
    """
    fast = record._FAST
    if fast is not None:
        data = fast.frame(record, tag)
        if data is not None:
            return data
    return encodeReference(record, tag)


def encodeReference(record, tag=None):
    """
    L{encodeRecord} in Python alone: the reference that the accelerator
    must agree with, and the path of every record it declines.
    """
    if tag is None:
        tag = record.tag
    if not 0 <= tag <= 0xFFFFFFFF:
        raise EncodeError(f"tag {tag!r} is not a u32")
    flags = (record.response or record.ALWAYS_RESPONSE) << 1 | record.mustUnderstand
    if isinstance(record, UnknownRecord):
        if not 0 <= record.type <= 0xFFFF:
            raise EncodeError(f"record type {record.type!r} is not a u16")
        return encodeFrame(record.type, flags, tag, record.body)
    body = record._wire
    if body is None:
        body = encodeBody(record)
        _setWire(record, body)
    return encodeFrame(record.TYPE, flags, tag, body)


def withTag(record, tag):
    """
    @return: a copy of C{record} with another tag: what C{attrs.evolve}
        gives, without running the constructor again (the values were
        checked when the record was made).
    """
    copy = _new(type(record))
    for name, setter in record._SETTERS.items():
        setter(copy, getattr(record, name))
    _setTag(copy, tag)
    return copy


_new = object.__new__
_setTag = Record.tag.__set__
_setResponse = Record.response.__set__
_setMustUnderstand = Record.mustUnderstand.__set__
_setWire = Record._wire.__set__


def decodeRecord(frame):
    """
    Decode a framed record into its typed form.

    Unknown fields are skipped unless their must-understand bit is set.
    A record of an unknown type is returned as L{UnknownRecord}: whether to
    ignore or refuse it is the connection's decision.

    @param frame: a L{Frame}.
    @return: a L{Record}.
    @raise MalformedRecord: the body breaks the encoding rules.
    @raise MustUnderstand: it holds an unknown must-understand field.
    """
    recordType, flags, tag, body = frame
    fast = FAST_SCHEMAS.get(recordType)
    if fast is not None:
        decoded = fast.decode(flags, tag, body)
        if decoded is not None:
            return decoded
    return decodeReference(frame)


def decodeReference(frame):
    """
    L{decodeRecord} in Python alone: the reference that the accelerator
    must agree with, and the path of every record it declines.
    """
    recordType, flags, tag, body = frame
    response = bool(flags & _RESPONSE)
    mustUnderstand = bool(flags & _MUST_UNDERSTAND)
    cls = RECORD_CLASSES.get(recordType)
    if cls is None:
        return UnknownRecord(
            type=recordType,
            body=body,
            tag=tag,
            response=response,
            mustUnderstand=mustUnderstand,
        )
    byId = cls._DECODERS
    values = {}
    repeatedValues = None
    unknown = False
    offset = 0
    end = len(body)
    unpack = FIELD_HEADER.unpack_from
    while offset < end:
        if end - offset < 6:
            raise MalformedRecord(f"{end - offset} stray bytes at the end of the record body", tag)
        identifier, length = unpack(body, offset)
        start = offset + 6
        offset = start + length
        if offset > end:
            raise MalformedRecord(
                f"field 0x{identifier:04x} announces {length} bytes but only "
                f"{end - start} remain in the record",
                tag,
            )
        decoder = byId.get(identifier)
        if decoder is None:
            decoder = byId.get(identifier & 0x7FFF)
            if decoder is None:
                if isMustUnderstand(identifier):
                    raise MustUnderstand(
                        f"{cls.__name__} carries unknown must-understand field "
                        f"0x{identifier:04x}",
                        tag,
                    )
                unknown = True
                continue
        name, decode, low, high, repeated, spec, how = decoder
        if length < low or length > high:
            raise MalformedRecord(
                f"{cls.__name__} field {spec.field.name} has {length} octets; "
                f"{low} to {high} are allowed",
                tag,
            )
        raw = body[start:offset]
        if how == _AS_TEXT and 0 not in raw:  # the octet 0: an int is far cheaper to look for
            try:
                value = raw.decode()
            except UnicodeDecodeError:
                value = decodeValue(spec.kind, raw, identifier, tag)
        elif how == _AS_BYTES:
            value = raw
        else:
            try:
                value = decode(raw)
            except Exception:
                value = decodeValue(spec.kind, raw, identifier, tag)
        if repeated:
            if repeatedValues is None:
                repeatedValues = {}
            repeatedValues.setdefault(name, []).append(value)
        elif name in values:
            raise MalformedRecord(
                f"{cls.__name__} repeats field 0x{spec.field:04x}", tag
            )
        else:
            values[name] = value
    if repeatedValues is not None:
        for name, items in repeatedValues.items():
            values[name] = tuple(items)
    for spec in cls._REQUIRED:
        if spec.attribute not in values:
            raise MalformedRecord(
                f"{cls.__name__} lacks required field "
                f"0x{spec.field:04x} ({spec.field.name})",
                tag,
            )
    # Built without running the attrs constructor: the values were checked
    # above, and only the defaults and the header remain to be filled in.
    decoded = _new(cls)
    get = values.get
    for name, setter, default in cls._FILL:
        setter(decoded, get(name, default))
    _setTag(decoded, tag)
    _setResponse(decoded, response or cls.ALWAYS_RESPONSE)
    _setMustUnderstand(decoded, mustUnderstand)
    _setWire(decoded, None if unknown else body)
    return decoded


def decodeRecords(data, maxRecordSize, expectPreamble=False):
    """
    Decode a complete byte string of records (a convenience for tests and
    tools; connections use L{imxd.wire.framing.FrameDecoder} directly).

    @return: the records, in order.
    @raise WireError: the bytes are not valid IMX, or end mid-record.
    """
    decoder = FrameDecoder(maxRecordSize, expectPreamble=expectPreamble)
    records = [decodeRecord(frame) for frame in decoder.feed(data)]
    if decoder.buffered():
        raise MalformedRecord(
            f"{decoder.buffered()} bytes of an unfinished record at the end"
        )
    return records


__all__ = [
    "Frame",
    "Record",
    "UnknownRecord",
    "RECORD_CLASSES",
    "ADMIN_TYPES",
    "LINK_TYPES",
    "DATA_TYPES",
    "encodeRecord",
    "withTag",
    "decodeRecord",
    "decodeRecords",
]
