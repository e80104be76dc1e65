"""
Record framing: the preamble, the 12-byte record header, and a stream
decoder that cuts a byte stream into frames.  Pure: no I/O, no clock.
"""

import struct
from typing import NamedTuple

from imxd.wire.accelerator import speedups
from imxd.wire.constants import PREAMBLE
from imxd.wire.errors import NotIMX, RecordTooLarge

#: length (u32), type (u16), flags (u16), tag (u32), all big-endian.
HEADER = struct.Struct(">IHHI")
HEADER_SIZE = HEADER.size


class Frame(NamedTuple):
    """
    One record as framed on the wire, its body not yet decoded.
    """

    type: int
    flags: int
    tag: int
    body: bytes


def encodeFrame(recordType, flags, tag, body):
    """
    Prefix a record body with its header.

    @return: the record's bytes.
    @rtype: L{bytes}
    """
    return HEADER.pack(len(body), recordType, flags, tag) + body


class FrameDecoder:
    """
    Cut an incoming byte stream into L{Frame}s.

    A header that announces a body larger than C{maxRecordSize} raises
    L{RecordTooLarge} as soon as the header is complete, before any of the
    body is buffered.  When C{expectPreamble} is true the stream must start
    with L{PREAMBLE}; the first byte that differs raises L{NotIMX}.  After
    either error the decoder stays failed: framing is lost.
    """

    def __init__(self, maxRecordSize, expectPreamble=True, schemas=None):
        """
        @param maxRecordSize: the largest body accepted, in bytes.
        @param expectPreamble: whether the stream starts with L{PREAMBLE}.
        @param schemas: the accelerator's record schemas by type
            (L{imxd.wire.records.FAST_SCHEMAS}), or L{None}: with them (and
            the accelerator), L{feed} gives each record its schema decodes
            already decoded, in place of its frame.
        """
        self.maxRecordSize = maxRecordSize
        self._schemas = schemas
        self._preambleSeen = 0 if expectPreamble else len(PREAMBLE)
        self._buffer = bytearray()
        self._failure = None

    def buffered(self):
        """
        @return: how many received bytes are waiting for the rest of their
            record.
        """
        return len(self._buffer)

    def feed(self, data):
        """
        Add received bytes.

        @param data: the bytes that arrived.
        @return: the frames completed by them, in order (with
            C{schemas}: some of them decoded already, as records).
        @rtype: L{list} of L{Frame}
        @raise WireError: the stream is not valid IMX framing.
        """
        if self._failure is not None:
            raise self._failure
        if self._preambleSeen < len(PREAMBLE):
            data = self._checkPreamble(data)
        buffer = self._buffer
        buffer += data
        limit = self.maxRecordSize
        if speedups is None:
            frames = []
            offset = 0
        else:
            # The complete records in C; what stops it is looked at below.
            frames, offset = speedups.splitFrames(Frame, buffer, limit, self._schemas)
        end = len(buffer)
        while end - offset >= HEADER_SIZE:
            length, recordType, flags, tag = HEADER.unpack_from(buffer, offset)
            if length > limit:
                self._failure = RecordTooLarge(
                    f"record of type 0x{recordType:04x} announces {length} "
                    f"bytes; the limit is {limit}",
                    tag,
                )
                del buffer[:]
                raise self._failure
            stop = offset + HEADER_SIZE + length
            if stop > end:
                break
            frames.append(
                Frame(recordType, flags, tag, bytes(buffer[offset + HEADER_SIZE : stop]))
            )
            offset = stop
        if offset:
            del buffer[:offset]
        return frames

    def _checkPreamble(self, data):
        """
        Match the start of the stream against L{PREAMBLE}.

        @return: what follows the preamble in C{data}.
        """
        want = PREAMBLE[self._preambleSeen :]
        got = data[: len(want)]
        if not want.startswith(got):
            self._failure = NotIMX(
                f"the connection does not start with the IMX preamble "
                f"(received {bytes(got[:16])!r})"
            )
            raise self._failure
        self._preambleSeen += len(got)
        return data[len(got) :]
