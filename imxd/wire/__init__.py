"""
The IMX v1 wire codec: pure functions from bytes to records and back.

See C{docs/protocol.md} for the normative specification.
"""

from imxd.wire.constants import (
    DEFAULT_PORT,
    MINIMUM_MAX_RECORD,
    PREAMBLE,
    VERSION_MAX,
    VERSION_MIN,
    ErrorCode,
    Field,
    FieldKind,
    Flag,
    RecordType,
    isTemporary,
)
from imxd.wire.errors import (
    EncodeError,
    InvalidUTF8,
    MalformedRecord,
    MustUnderstand,
    NotIMX,
    RecordTooLarge,
    WireError,
)
from imxd.wire.framing import HEADER_SIZE, Frame, FrameDecoder, encodeFrame
from imxd.wire.records import (
    ADMIN_TYPES,
    LINK_TYPES,
    DATA_TYPES,
    RECORD_CLASSES,
    Ack,
    Attributes,
    Close,
    DialbackKey,
    DialbackResult,
    DialbackSecret,
    DialbackVerify,
    Delivered,
    DomainAttributesGet,
    Drain,
    Error,
    Hello,
    LinkAuth,
    Message,
    Notify,
    Ping,
    Pong,
    Publish,
    Record,
    Redirect,
    Renew,
    Report,
    StartTLS,
    StartTLSProceed,
    Status,
    StatusResult,
    Subscribe,
    SubscriptionState,
    UnknownRecord,
    Unsubscribe,
    UserAttributesGet,
    decodeRecord,
    decodeRecords,
    encodeRecord,
    withTag,
)

__all__ = [name for name in dir() if not name.startswith("_")]
