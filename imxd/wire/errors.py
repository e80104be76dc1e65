"""
The codec's own errors.  Every way that bytes can fail to be IMX raises a
L{WireError} carrying the ERROR code a peer should send back.
"""

from imxd.wire.constants import ErrorCode


class WireError(Exception):
    """
    Bytes that are not valid IMX v1.

    @ivar code: the L{ErrorCode} to report to the peer.
    @ivar tag: the tag of the record at fault, when known (else 0).
    @ivar fatal: whether the connection cannot continue (framing is lost).
    """

    code = ErrorCode.MALFORMED
    fatal = True

    def __init__(self, message, tag=0):
        super().__init__(message)
        self.tag = tag


class NotIMX(WireError):
    """
    The connection did not start with the IMX preamble.
    """

    code = ErrorCode.NOT_IMX


class RecordTooLarge(WireError):
    """
    A record header announced a body larger than the receiver accepts.
    """

    code = ErrorCode.RECORD_TOO_LARGE


class MalformedRecord(WireError):
    """
    A record whose framing was intact but whose body broke the encoding
    rules (field overruns the body, wrong width, missing or repeated field).
    The record is answered with ERROR and the connection closed.
    """

    code = ErrorCode.MALFORMED


class InvalidUTF8(MalformedRecord):
    """
    A text field that is not valid UTF-8 (or contains U+0000).
    """

    code = ErrorCode.INVALID_UTF8


class MustUnderstand(MalformedRecord):
    """
    A record or field flagged must-understand that this version does not
    know.
    """

    code = ErrorCode.MUST_UNDERSTAND
    fatal = False


class EncodeError(ValueError):
    """
    A record could not be encoded: a value is out of range or of the wrong
    type.  This is a bug in the caller, never a peer's fault.
    """
