"""
The numbers of IMX protocol v1: record types, field identifiers, header
flags, error codes and limits.  C{docs/protocol.md} is the normative text;
this module is its registry in code.
"""

import enum

#: Sent by both sides before any record (section "Connection preamble").
PREAMBLE = b"\x89IMX\r\n\x1a\n"

#: Protocol versions this implementation speaks.
VERSION_MIN = 1
VERSION_MAX = 1

#: Default TCP port for IMX when discovery names none.
DEFAULT_PORT = 5275

#: Every implementation accepts record bodies at least this large, and no
#: record larger than this is sent before the peer's HELLO has been read.
MINIMUM_MAX_RECORD = 16384

#: Bit set in a field identifier that asks the receiver to understand it.
FIELD_MUST_UNDERSTAND = 0x8000


class Flag(enum.IntFlag):
    """
    Bits of the record header's flags word.
    """

    MUST_UNDERSTAND = 0x0001
    RESPONSE = 0x0002


#: Flag bits defined by v1; the others are sent as zero and ignored.
KNOWN_FLAGS = Flag.MUST_UNDERSTAND | Flag.RESPONSE


class RecordType(enum.IntEnum):
    """
    The record types of protocol v1.
    """

    HELLO = 0x0001
    PING = 0x0002
    PONG = 0x0003
    CLOSE = 0x0004
    ERROR = 0x0005
    ACK = 0x0006
    REDIRECT = 0x0007
    STARTTLS = 0x0008
    STARTTLS_PROCEED = 0x0009

    DIALBACK_KEY = 0x0010
    DIALBACK_VERIFY = 0x0011
    DIALBACK_SECRET = 0x0012
    DIALBACK_RESULT = 0x0013

    MESSAGE = 0x0100
    SUBSCRIBE = 0x0110
    RENEW = 0x0111
    UNSUBSCRIBE = 0x0112
    SUBSCRIPTION_STATE = 0x0113
    NOTIFY = 0x0120
    USER_ATTRIBUTES_GET = 0x0130
    DOMAIN_ATTRIBUTES_GET = 0x0131
    ATTRIBUTES = 0x0132

    LINK_AUTH = 0x7E01
    PUBLISH = 0x7E02
    REPORT = 0x7E03
    DELIVERED = 0x7E04

    DRAIN = 0x7F01
    STATUS = 0x7F02
    STATUS_RESULT = 0x7F03


class FieldKind(enum.Enum):
    """
    How a field's value is encoded.
    """

    U16 = "u16"
    U32 = "u32"
    STRING = "string"
    BYTES = "bytes"
    TAGS = "tags"


class Field(enum.IntEnum):
    """
    The field identifiers of protocol v1 (without the must-understand bit).
    """

    VERSION_MIN = 0x0001
    VERSION_MAX = 0x0002
    CAPABILITY = 0x0003
    MAX_RECORD = 0x0004
    SOFTWARE = 0x0005
    CODE = 0x0006
    TEXT = 0x0007
    RETRY_AFTER = 0x0008
    ACK_TAGS = 0x0009
    HOST = 0x000A
    PORT = 0x000B
    ORIGIN = 0x000C

    FROM_DOMAIN = 0x0010
    TO_DOMAIN = 0x0011
    TOKEN = 0x0012
    SECRET = 0x0013

    FROM = 0x0020
    TO = 0x0021
    MESSAGE_ID = 0x0022
    CONTENT_TYPE = 0x0023
    BODY = 0x0024
    ATTRIBUTE = 0x0025
    NAME = 0x0026
    TARGET = 0x0027
    TTL = 0x0028
    EXPIRES = 0x0029
    STATE = 0x002A
    PRESENCE = 0x002B
    STATUS = 0x002C


#: The encoding of each field.
FIELD_KINDS = {
    Field.VERSION_MIN: FieldKind.U16,
    Field.VERSION_MAX: FieldKind.U16,
    Field.CAPABILITY: FieldKind.STRING,
    Field.MAX_RECORD: FieldKind.U32,
    Field.SOFTWARE: FieldKind.STRING,
    Field.CODE: FieldKind.U16,
    Field.TEXT: FieldKind.STRING,
    Field.RETRY_AFTER: FieldKind.U32,
    Field.ACK_TAGS: FieldKind.TAGS,
    Field.HOST: FieldKind.STRING,
    Field.PORT: FieldKind.U16,
    Field.ORIGIN: FieldKind.STRING,
    Field.FROM_DOMAIN: FieldKind.STRING,
    Field.TO_DOMAIN: FieldKind.STRING,
    Field.TOKEN: FieldKind.BYTES,
    Field.SECRET: FieldKind.BYTES,
    Field.FROM: FieldKind.STRING,
    Field.TO: FieldKind.STRING,
    Field.MESSAGE_ID: FieldKind.STRING,
    Field.CONTENT_TYPE: FieldKind.STRING,
    Field.BODY: FieldKind.BYTES,
    Field.ATTRIBUTE: FieldKind.STRING,
    Field.NAME: FieldKind.STRING,
    Field.TARGET: FieldKind.STRING,
    Field.TTL: FieldKind.U32,
    Field.EXPIRES: FieldKind.U32,
    Field.STATE: FieldKind.STRING,
    Field.PRESENCE: FieldKind.STRING,
    Field.STATUS: FieldKind.STRING,
}

#: Octet length bounds (inclusive) of string and bytes fields; a value
#: outside them makes the record malformed.  Other fields: any length up to
#: the record limit.
FIELD_LENGTHS = {
    Field.CAPABILITY: (1, 64),
    Field.SOFTWARE: (0, 256),
    Field.TEXT: (0, 4096),
    Field.HOST: (1, 253),
    Field.ORIGIN: (1, 64),
    Field.FROM_DOMAIN: (1, 253),
    Field.TO_DOMAIN: (1, 253),
    Field.TOKEN: (1, 1024),
    Field.SECRET: (16, 64),
    Field.FROM: (1, 256),
    Field.TO: (1, 256),
    Field.MESSAGE_ID: (1, 128),
    Field.CONTENT_TYPE: (1, 128),
    Field.ATTRIBUTE: (1, 4096),
    Field.NAME: (1, 64),
    Field.TARGET: (1, 256),
    Field.STATE: (1, 64),
    Field.PRESENCE: (1, 64),
    Field.STATUS: (0, 1024),
}


class ErrorCode(enum.IntEnum):
    """
    ERROR codes.  4xx codes are temporary (the same request may succeed
    later or elsewhere); 5xx codes are permanent (retrying the same request
    will fail the same way).
    """

    TEMPORARY_FAILURE = 400
    SHUTTING_DOWN = 401
    RATE_LIMITED = 402
    RESOURCE_LIMIT = 403
    RECIPIENT_UNAVAILABLE = 404
    DIALBACK_TIMEOUT = 405
    INTERNAL_ERROR = 406
    TIMEOUT = 407

    MALFORMED = 500
    UNSUPPORTED = 501
    MUST_UNDERSTAND = 502
    BAD_SEQUENCE = 503
    VERSION_UNSUPPORTED = 504
    RECORD_TOO_LARGE = 505
    INVALID_UTF8 = 506
    NOT_IMX = 507
    NOT_AUTHENTICATED = 510
    DIALBACK_FAILED = 511
    RELAY_DENIED = 512
    UNKNOWN_DOMAIN = 513
    UNKNOWN_USER = 514
    SENDER_MISMATCH = 515
    BLOCKED = 516
    MEDIA_TYPE_REFUSED = 517
    MESSAGE_TOO_LARGE = 518
    SUBSCRIPTION_DENIED = 519
    NOT_SUBSCRIBED = 520
    TLS_REQUIRED = 530
    TLS_FAILED = 531

    @property
    def token(self):
        """
        The lower-case hyphenated name used in logs and docs.
        """
        return self.name.lower().replace("_", "-")

    @property
    def temporary(self):
        """
        Whether the failure is temporary (the request may be retried).
        """
        return isTemporary(self)


def isTemporary(code):
    """
    Classify any ERROR code, including ones this version does not know.

    @param code: an ERROR code.
    @type code: L{int}
    @return: C{True} for 400-499, C{False} otherwise.
    """
    return 400 <= code <= 499
