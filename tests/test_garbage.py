"""
Integration tests: a real C{twistd imxd} process faced with input that is
not IMX.  Each bad connection gets an ERROR record and a close within two
seconds, and the server goes on accepting and answering valid peers.
"""

from __future__ import annotations

import os
import random
import socket
import time

from twisted.trial.unittest import SynchronousTestCase

from imxd.wire import (
    HEADER_SIZE,
    PREAMBLE,
    Error,
    ErrorCode,
    Hello,
    Ping,
    Pong,
    decodeRecords,
    encodeRecord,
)
from tests.support import GOOD, LaunchTestsMixin, freePort

#: The promise made to operators: bad input is refused this fast.
REFUSAL_DEADLINE = 2.0

HELLO = encodeRecord(Hello(versionMin=1, versionMax=1, maxRecord=65536))


def exchange(port: int, data: bytes, deadline: float = REFUSAL_DEADLINE):
    """
    Connect, send C{data}, and read until the server closes or the deadline
    passes.

    @return: C{(received bytes, whether the server closed, seconds taken)}.
    """
    started = time.monotonic()
    received = bytearray()
    closed = False
    with socket.create_connection(("127.0.0.1", port), timeout=deadline) as s:
        try:
            s.sendall(data)
        except OSError:
            pass
        while time.monotonic() - started < deadline:
            s.settimeout(max(0.01, deadline - (time.monotonic() - started)))
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            received += chunk
    return bytes(received), closed, time.monotonic() - started


class GarbageTests(LaunchTestsMixin, SynchronousTestCase):
    """
    One server, many kinds of garbage, then a valid peer.
    """

    def setUp(self) -> None:
        super().setUp()
        self.port = freePort()
        config = GOOD.format(port=self.port).replace(
            "[[domain]]", "[server.timeouts]\nhandshake = 1.0\n\n[[domain]]", 1
        )
        self.process = self.startServer(config, self.port)

    def assertRefused(self, data: bytes, code: ErrorCode) -> None:
        """
        Sending C{data} yields the server's preamble and HELLO, then ERROR
        C{code}, then a close, all within the deadline.
        """
        received, closed, took = exchange(self.port, data)
        self.assertTrue(closed, f"not closed within {REFUSAL_DEADLINE} s")
        self.assertLess(took, REFUSAL_DEADLINE)
        records = decodeRecords(received, 1 << 20, expectPreamble=True)
        self.assertIsInstance(records[0], Hello)
        self.assertIsInstance(records[-1], Error)
        self.assertEqual(records[-1].code, code)

    def assertStillServing(self) -> None:
        """
        A valid peer gets HELLO and an answer to PING.
        """
        received, closed, _ = exchange(
            self.port, PREAMBLE + HELLO + encodeRecord(Ping(tag=9)), deadline=1.0
        )
        self.assertFalse(closed)
        records = decodeRecords(received, 1 << 20, expectPreamble=True)
        self.assertEqual([type(r) for r in records], [Hello, Pong])
        self.assertEqual(records[1].tag, 9)
        self.assertIsNone(self.process.poll())

    def test_httpRequest(self) -> None:
        """
        An HTTP request is refused as not IMX.
        """
        self.assertRefused(
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", ErrorCode.NOT_IMX
        )
        self.assertStillServing()

    def test_randomBytes(self) -> None:
        """
        Random bytes are refused as not IMX.
        """
        rng = random.Random(2)
        for _ in range(5):
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4096)))
            if data.startswith(PREAMBLE[:1]):
                data = b"\x00" + data
            self.assertRefused(data, ErrorCode.NOT_IMX)
        self.assertStillServing()

    def test_hugeLength(self) -> None:
        """
        A header announcing a 4 GiB record is refused before its body is
        read, with the record's tag.
        """
        header = (0xFFFFFFFF).to_bytes(4, "big") + bytes([0, 1, 0, 0, 0, 0, 0, 4])
        self.assertEqual(len(header), HEADER_SIZE)
        received, closed, took = exchange(self.port, PREAMBLE + header + os.urandom(512))
        self.assertTrue(closed)
        error = decodeRecords(received, 1 << 20, expectPreamble=True)[-1]
        self.assertEqual((error.code, error.tag), (ErrorCode.RECORD_TOO_LARGE, 4))
        self.assertStillServing()

    def test_silentPeer(self) -> None:
        """
        A peer that connects and says nothing is refused when the handshake
        timeout (1 s here) passes.
        """
        self.assertRefused(b"", ErrorCode.TIMEOUT)
        self.assertStillServing()

    def test_dataBeforeHello(self) -> None:
        """
        A record other than HELLO first is refused as out of sequence.
        """
        self.assertRefused(PREAMBLE + encodeRecord(Ping(tag=1)), ErrorCode.BAD_SEQUENCE)
        self.assertStillServing()

    def test_manyBadConnections(self) -> None:
        """
        Fifty bad connections in a row leave the server answering.
        """
        for i in range(50):
            exchange(self.port, b"x" * (i + 1), deadline=1.0)
        self.assertStillServing()
