"""
Fuzz tests of the receiving side of the IMX peer protocol.

1. L{ReceiverMachine}: a hypothesis state machine that plays a hostile
   peer against a real receiving server held in memory (a L{Federation}
   over an L{Aggregator} with memory backends, from L{tests.network}), on
   a L{Clock}.  It writes valid records of every type with random field
   values, random record types and field tables, mutated, truncated and
   lying frames, random bytes, oversize headers, Data before
   authentication, dial-back records with junk, STARTTLS (with and without
   TLS offered), CLOSE and PING, split at random points across
   C{dataReceived} calls, and lets time pass so that timers fire.  After
   every step it checks that nothing escaped or was logged as a failure,
   that the state is a L{PeerState}, that a closed connection is being
   dropped and takes no more records, that the server only ever wrote
   valid IMX, that no request got more than one answer (exactly one, when
   the connection is still open at the end), and that no Data reached a
   backend.

2. L{LiveFuzzTests}: a bounded run of more than 100,000 random or mutated
   records (it aims at 200,000), over many sequential connections,
   against a real C{twistd -n imxd} on 127.0.0.61, which must still be
   running and answering a valid peer afterwards.  Marked C{slow}; it
   prints its figures (run with C{pytest -s}) and keeps them in
   L{LIVE_FIGURES}.

3. Two regression tests for a defect the machine found: the keepalive
   PING was still sent after CLOSE, and a peer that sent CLOSE and stopped
   reading was never dropped.

The machine runs derandomized (the same examples every time).  Set
C{FUZZ_NOSHRINK=1} to skip shrinking when exploring a failure by hand.
"""

from __future__ import annotations

import gc
import os
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import traceback

import attrs
import pytest
import trustme
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from imxd.imxctl import BlockingPeer
from imxd.peer import CLOSE_GRACE, PeerState
from imxd.tls import CertificateStore, TLSPolicy
from imxd.wire import (
    HEADER_SIZE,
    PREAMBLE,
    RECORD_CLASSES,
    Ack,
    Close,
    DialbackKey,
    DialbackSecret,
    DialbackVerify,
    Error,
    Field,
    FieldKind,
    Frame,
    FrameDecoder,
    Hello,
    Ping,
    Pong,
    RecordType,
    Redirect,
    StartTLS,
    Status,
    StatusResult,
    UnknownRecord,
    WireError,
    decodeRecord,
    encodeRecord,
)
from imxd.wire.constants import FIELD_KINDS, FIELD_LENGTHS
from imxd.wire.errors import MustUnderstand
from imxd.wire.fields import FIELD_HEADER
from imxd.wire.framing import HEADER
from imxd.wire.records import DATA_TYPES
from tests.live import DNSServer, freePort
from tests.network import Network
from tests.support import TWISTD, WAIT

#: The receiving server's hosted domains, and the one the second
#: in-memory server hosts (so that dial-back's Connection 2 really runs).
HOSTED = ("alpha.test", "beta.test")
ELSEWHERE = "evil.test"

#: The record limit of the servers under test.
MAX_RECORD = 65536

#: Where the fuzzing peer connects from.
STRANGER = IPv4Address("TCP", "10.6.6.6", 40666)


# -- strategies ---------------------------------------------------------------

_NO_NUL = st.characters(codec="utf-8", exclude_characters="\x00")
TEXT = st.text(alphabet=_NO_NUL, max_size=24)

DOMAINS = st.one_of(
    st.sampled_from(
        [
            "alpha.test",
            "beta.test",
            "ALPHA.Test",
            "beta.test.",
            ELSEWHERE,
            "nowhere.test",
            "bücher.test",
            "xn--bcher-kva.test",
            "xn--zz.test",
            "localhost",
            "-bad-.test",
            "a..test",
            ".",
            "10.0.0.1",
            "[::1]",
            "a" * 64 + ".test",
            ".".join(["abcdefghi"] * 26),
        ]
    ),
    TEXT,
)
LOCAL_PARTS = st.one_of(
    st.sampled_from(["bob", "alice", "Ann", "postmaster", "ǅ", "a b", "x" * 70, ""]),
    TEXT,
)
ADDRESSES = st.one_of(
    st.builds(
        lambda local, domain: f"{local}@{domain}",
        st.sampled_from(["bob", "Alice", "carol.x", "ǅ"]),
        st.sampled_from(["alpha.test", "BETA.test", ELSEWHERE, "nowhere.test", "bücher.test"]),
    ),
    st.builds(lambda local, domain: f"{local}@{domain}", LOCAL_PARTS, DOMAINS),
    st.builds(lambda a, b, c: f"{a}@{b}@{c}", LOCAL_PARTS, LOCAL_PARTS, DOMAINS),
    DOMAINS,
)

#: String values by field, where a field has a vocabulary of its own.
_STRINGS = {
    Field.FROM: ADDRESSES,
    Field.TO: ADDRESSES,
    Field.TARGET: ADDRESSES,
    Field.FROM_DOMAIN: DOMAINS,
    Field.TO_DOMAIN: DOMAINS,
    Field.HOST: DOMAINS,
    Field.CAPABILITY: st.one_of(
        st.sampled_from(["dialback", "starttls", "tls-cert-auth", "redirect", "X"]), TEXT
    ),
    Field.STATE: st.one_of(
        st.sampled_from(["pending", "granted", "denied", "cancelled", "expired"]), TEXT
    ),
    Field.PRESENCE: st.one_of(
        st.sampled_from(["online", "away", "busy", "offline", "unknown"]), TEXT
    ),
    Field.CONTENT_TYPE: st.one_of(
        st.sampled_from(
            ["text/plain", "text/plain; charset=utf-8", "text/html-lite", "image/png", ";"]
        ),
        TEXT,
    ),
    Field.MESSAGE_ID: st.one_of(st.text(alphabet="abc-1!~ é\t", max_size=12), TEXT),
    Field.ATTRIBUTE: st.one_of(
        st.builds(
            lambda n, v: f"{n}={v}",
            st.sampled_from(["alias", "presence", "max-message-size", "Bad Name", ""]),
            TEXT,
        ),
        TEXT,
    ),
    Field.TEXT: st.one_of(TEXT, st.just("é" * 1100)),
}

U32 = st.one_of(
    st.sampled_from([0, 1, 2, 16383, 16384, 65536, 65537, 0xFFFFFFFF]),
    st.integers(0, 0xFFFFFFFF),
)
U16 = st.one_of(st.sampled_from([0, 1, 2, 400, 407, 500, 599, 0xFFFF]), st.integers(0, 0xFFFF))


def fit(text, lengths):
    """
    @return: C{text} cut or padded so that its UTF-8 length is within
        C{lengths} (C{(minimum, maximum)}, or L{None} for no bound).
    """
    if lengths is None:
        return text
    low, high = lengths
    raw = text.encode("utf-8")
    if len(raw) > high:
        text = raw[:high].decode("utf-8", "ignore")
    while len(text.encode("utf-8")) < low:
        text += "x"
    return text


def fieldValue(field):
    """
    @return: a strategy of values of C{field} that encode (within the
        field's length bounds).
    """
    kind = FIELD_KINDS[field]
    lengths = FIELD_LENGTHS.get(field)
    if kind is FieldKind.U16:
        return U16
    if kind is FieldKind.U32:
        return U32
    if kind is FieldKind.TAGS:
        return st.lists(U32, max_size=6).map(tuple)
    if kind is FieldKind.BYTES:
        low, high = lengths or (0, 300)
        return st.binary(min_size=low, max_size=min(high, 80))
    return _STRINGS.get(field, TEXT).map(lambda text: fit(text, lengths))


def recordFields(cls):
    """
    @return: a strategy of keyword arguments for the fields of C{cls}.
    """
    strategies = {}
    for spec in cls.FIELDS:
        value = fieldValue(spec.field)
        if spec.repeated:
            strategies[spec.attribute] = st.lists(
                value, min_size=1 if spec.required else 0, max_size=3
            ).map(tuple)
        elif spec.required:
            strategies[spec.attribute] = value
        else:
            strategies[spec.attribute] = st.one_of(st.none(), value)
    return st.fixed_dictionaries(strategies)


#: A tag: C{None} means a fresh one (chosen by the machine).
TAGS = st.one_of(st.none(), st.just(0), st.integers(1, 12), st.integers(0, 0xFFFFFFFF))

_CLASSES = sorted(set(RECORD_CLASSES.values()), key=lambda cls: cls.TYPE)


@st.composite
def records(draw, classes=_CLASSES):
    """
    A valid record of one of C{classes} with random field values, tag and
    flags, or (one in ten) of an unknown type.
    """
    if draw(st.integers(0, 9)) == 0:
        recordType = draw(
            st.one_of(
                st.integers(0, 0xFFFF),
                st.sampled_from([0x0000, 0x0014, 0x0101, 0x7E00, 0x7EFF, 0x7F00, 0xFFFF]),
            )
        )
        if recordType not in RECORD_CLASSES:
            return UnknownRecord(
                type=recordType,
                body=draw(st.binary(max_size=64)),
                tag=draw(TAGS) or 0,
                response=draw(st.booleans()),
                mustUnderstand=draw(st.booleans()),
            )
    cls = draw(st.sampled_from(classes))
    fields = draw(recordFields(cls))
    return cls(
        tag=_fresh(draw(TAGS)),
        response=draw(st.booleans()) and draw(st.booleans()),
        mustUnderstand=draw(st.booleans()) and draw(st.booleans()),
        **fields,
    )


#: Stands for "a fresh tag" in records drawn before the machine numbers
#: them (a u32 that no other strategy draws on purpose).
_FRESH = 0xFFFFFFFE


def _fresh(tag):
    return _FRESH if tag is None else tag


#: Well-formed addresses, hosted here and elsewhere.
PLAUSIBLE = [
    "bob@evil.test", "Carol@EVIL.test", "ann@nowhere.test", "alice@alpha.test",
    "bob@beta.test", "evil.test", "x@bücher.test",
]
RECIPIENTS = ["alice@alpha.test", "Bob@BETA.test", "beta.test", "carol@evil.test"]
#: The envelope attributes of each Data record class: origin, recipient.
_ENVELOPE = {}
DATA_CLASSES = sorted((RECORD_CLASSES[t] for t in DATA_TYPES), key=lambda cls: cls.TYPE)
for _cls in DATA_CLASSES:
    _names = [spec.attribute for spec in _cls.FIELDS]
    _ENVELOPE[_cls] = (_names[0], _names[1])
HELLO_VARIANTS = st.builds(
    lambda fields, versions, maxRecord: Hello(
        versionMin=versions[0], versionMax=versions[1], maxRecord=maxRecord,
        capabilities=fields["capabilities"], software=fields["software"],
        toDomain=fields["toDomain"],
    ),
    recordFields(Hello),
    st.one_of(st.just((1, 1)), st.just((1, 5)), st.tuples(U16, U16)),
    st.one_of(st.sampled_from([16384, 65536, 1 << 20]), U32),
)
VALID_HELLOS = st.builds(
    lambda toDomain, caps, maxRecord: Hello(
        versionMin=1, versionMax=1, maxRecord=maxRecord, capabilities=caps,
        software="fuzz", toDomain=toDomain,
    ),
    st.sampled_from([None, None, "alpha.test", "beta.test", "ALPHA.TEST"]),
    st.sampled_from(
        [(), ("dialback",), ("dialback", "starttls"), ("starttls",), ("tls-cert-auth", "dialback")]
    ),
    st.sampled_from([16384, 65536, 0xFFFFFFFF]),
)

#: Cut points for splitting a byte string across C{dataReceived} calls.
CUTS = st.lists(st.integers(0, 1 << 20), max_size=4)

MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "delete", "insert", "truncate", "duplicate"]),
        st.integers(0, 1 << 20),
        st.integers(0, 255),
        st.binary(max_size=8),
    ),
    min_size=1,
    max_size=4,
)


def mutate(data, mutations):
    """
    @return: C{data} with C{mutations} applied.
    """
    data = bytearray(data)
    for operation, where, byte, extra in mutations:
        if not data:
            data += extra
            continue
        position = where % len(data)
        if operation == "flip":
            data[position] ^= 1 << (byte % 8)
        elif operation == "set":
            data[position] = byte
        elif operation == "delete":
            del data[position : position + 1 + byte % 8]
        elif operation == "insert":
            data[position:position] = extra
        elif operation == "truncate":
            del data[position:]
        else:
            data[position:position] = data[position : position + 1 + byte]
    return bytes(data)


def split(data, cuts):
    """
    @return: C{data} cut at C{cuts} (taken modulo its length).
    """
    if not data:
        return [data]
    points = sorted({cut % len(data) for cut in cuts} - {0})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return pieces


def rawFrame(recordType, flags, tag, fields):
    """
    @return: a frame built from a random field table (identifiers with or
        without the must-understand bit, values of any length).
    """
    body = b"".join(FIELD_HEADER.pack(i, len(v)) + v for i, v in fields)
    return HEADER.pack(len(body), recordType, flags, tag) + body


FIELD_IDS = st.one_of(
    st.sampled_from([int(f) for f in Field]),
    st.sampled_from([int(f) | 0x8000 for f in Field]),
    st.integers(0, 0xFFFF),
)
FIELD_VALUES = st.one_of(
    st.binary(max_size=40),
    st.sampled_from(
        [b"", b"\x00", b"\x00\x01", b"\x00\x00\x40\x00", b"\xff\xfe", b"\xc0\xaf", b"\xed\xa0\x80",
         b"alpha.test", b"bob@alpha.test", b"evil.test", b"\xf4\x90\x80\x80"]
    ),
)
RAW_FIELDS = st.lists(st.tuples(FIELD_IDS, FIELD_VALUES), max_size=6)
RECORD_TYPES = st.one_of(
    st.sampled_from([int(t) for t in RecordType]), st.integers(0, 0xFFFF)
)


JUNK = st.one_of(
    st.tuples(
        st.just("raw"), RECORD_TYPES, st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF),
        RAW_FIELDS,
    ),
    st.tuples(st.just("mutated"), records(), MUTATIONS),
    st.tuples(st.just("truncated"), records(), st.integers(0, 1 << 16)),
    st.tuples(st.just("lying"), records(), st.integers(-40, 40)),
    st.tuples(
        st.just("oversize"),
        st.one_of(st.integers(MAX_RECORD + 1, 0xFFFFFFFF), st.just(MAX_RECORD + 1)),
        RECORD_TYPES,
        st.integers(0, 0xFFFFFFFF),
        st.binary(max_size=64),
    ),
    st.tuples(st.just("bytes"), st.binary(min_size=1, max_size=200)),
)


# -- the certificates for a server that offers STARTTLS ---------------------

_TLS = {}


def tlsPolicy():
    """
    @return: a L{TLSPolicy} with certificates for both hosted domains:
        C{alpha.test} offers TLS, C{beta.test} requires it.  Made once.
    """
    if "policy" not in _TLS:
        directory = tempfile.mkdtemp(prefix="imxd-fuzz-")
        ca = trustme.CA()
        ca.cert_pem.write_to_path(os.path.join(directory, "ca.pem"))
        certificates = {}
        for domain in HOSTED:
            leaf = ca.issue_cert(domain)
            cert = os.path.join(directory, f"{domain}.pem")
            key = os.path.join(directory, f"{domain}.key")
            leaf.cert_chain_pems[0].write_to_path(cert)
            leaf.private_key_pem.write_to_path(key)
            certificates[domain] = (cert, key)
        _TLS["policy"] = TLSPolicy(
            CertificateStore(certificates, os.path.join(directory, "ca.pem")),
            {"alpha.test": "offered", "beta.test": "required"},
        )
        shutil.rmtree(directory, ignore_errors=True)
    return _TLS["policy"]


class FakeHandle:
    """
    What C{transport.getHandle()} gives inside our pretend TLS: a
    connection without a client certificate.
    """

    def get_protocol_version_name(self):
        return "TLSv1.3"

    def get_cipher_name(self):
        return "FUZZ"

    def get_peer_certificate(self):
        return None

    def get_peer_cert_chain(self):
        return None


class FuzzTransport(StringTransport):
    """
    A L{StringTransport} that remembers C{startTLS} (after which the bytes
    the protocol writes are TLS plaintext, starting again with the
    preamble) and aborts.
    """

    def __init__(self):
        super().__init__(
            hostAddress=IPv4Address("TCP", "10.0.0.1", 5275), peerAddress=STRANGER
        )
        self.tlsStartedAt = None
        self.aborted = False
        self.lateWrites = []

    def setTcpNoDelay(self, enabled):
        pass

    def write(self, data):
        protocol = getattr(self, "protocol", None)
        if protocol is not None and protocol.state is PeerState.CLOSED:
            # Where it came from, for the failure message.
            self.lateWrites.append((data, "".join(traceback.format_stack(limit=12))))
        super().write(data)

    def startTLS(self, contextFactory, beNormal=True):
        assert self.tlsStartedAt is None, "startTLS twice"
        self.tlsStartedAt = len(self.value())

    def getHandle(self):
        return FakeHandle()

    def abortConnection(self):
        self.aborted = True
        super().abortConnection()


# -- the state machine ----------------------------------------------------------


class ReceiverMachine(RuleBasedStateMachine):
    """
    A hostile peer against one inbound connection of a real receiving
    server.
    """

    def __init__(self):
        super().__init__()
        self.failures = []
        globalLogPublisher.addObserver(self._observe)
        self.proto = None
        self.lost = False
        self.tlsDone = False
        self.nextTag = 1000
        self.allowed = {}
        self.expected = {}
        self.answers = {}
        self.serverPings = []
        self.delivered = []
        self.dispatchedClosed = []
        self.closedOutput = None
        self.closeSent = False
        self.requested = False
        self.codes = set()

    def _observe(self, event):
        if "log_failure" in event or event.get("log_level") in (
            LogLevel.error,
            LogLevel.critical,
        ):
            self.failures.append(event)

    # -- set-up --------------------------------------------------------------

    @initialize(
        hostile=st.integers(0, 4),
        withTLS=st.booleans(),
        opening=st.integers(0, 9),
        hello=VALID_HELLOS,
        badHello=HELLO_VARIANTS,
        junk=st.binary(max_size=40),
        cuts=CUTS,
    )
    def connect(self, hostile, withTLS, opening, hello, badHello, junk, cuts):
        """
        Start the servers and connect; open with (mostly) preamble and a
        valid HELLO, or something worse.  A calm peer (two examples in five)
        sends only well-formed records, so that its connection lives long.
        """
        self.hostile = hostile >= 2
        if not self.hostile:
            opening = opening % 2
        self.network = Network()
        self.server = self.network.server(
            "10.0.0.1", list(HOSTED), tls=tlsPolicy() if withTLS else None
        )
        self.other = self.network.server("10.0.0.2", [ELSEWHERE])
        for server in (self.server, self.other):
            self._watchDeliveries(server)
        self.transport = FuzzTransport()
        self.proto = self.server.buildProtocol(STRANGER)
        original = self.proto._dispatch

        def dispatch(record):
            if self.proto.state is PeerState.CLOSED:
                self.dispatchedClosed.append(record)
            original(record)

        self.proto._dispatch = dispatch
        self._resetStreams()
        self.transport.protocol = self.proto
        self.proto.makeConnection(self.transport)
        if opening <= 5:
            data = PREAMBLE + encodeRecord(hello)
        elif opening == 6:
            data = PREAMBLE + encodeRecord(badHello)
        elif opening == 7:
            data = mutate(PREAMBLE + encodeRecord(hello), [("set", len(junk), 0, b"")] + [
                ("flip", b, b, b"") for b in junk[:3]
            ])
        elif opening == 8:
            data = PREAMBLE + junk
        else:
            data = b""
        self.feed(data, cuts)
        if withTLS and not self.hostile and hello.toDomain != "beta.test" and opening % 2:
            self.sendStartTLS(None, None)

    def _watchDeliveries(self, server):
        """
        Record every Data record the router hands to a hosted domain.
        """
        deliver = server.router.deliver

        def watched(record, origin, receiving):
            self.delivered.append((record, origin, receiving))
            return deliver(record, origin, receiving)

        server.router.deliver = watched

    def _resetStreams(self):
        """
        Both directions start again with the preamble (at connect, and
        inside TLS).
        """
        self.mirror = Mirror()
        self.reader = FrameDecoder(0xFFFFFFFF, expectPreamble=True)
        self.readFrom = len(self.transport.value())
        self.seenHello = False

    # -- helpers ---------------------------------------------------------------

    def canSend(self):
        """
        Whether bytes from the peer reach the protocol now: the connection
        is not lost, and no TLS handshake is running (its bytes would be
        TLS, not records).
        """
        return (
            self.proto is not None
            and not self.lost
            and (self.transport.tlsStartedAt is None or self.tlsDone)
        )

    def tagged(self, record):
        """
        @return: C{record} with a fresh tag if it asks for one.
        """
        if record.tag == _FRESH:
            self.nextTag += 1
            record = _withTag(record, self.nextTag)
        return record

    def feed(self, data, cuts=()):
        """
        Deliver C{data} in pieces, then let the in-memory network run.
        Nothing arrives on a lost connection or during a TLS handshake
        (every rule stays enabled, so that examples do not run out of
        rules once the connection is gone).
        """
        if not self.canSend():
            return
        for piece in split(data, cuts):
            if self.transport.tlsStartedAt is not None and not self.tlsDone:
                # The rest of the read would be TLS; the protocol has
                # already refused it if it was there (injection).
                break
            self.mirror.feed(piece, self)
            self.proto.dataReceived(piece)
        self.network.flush()
        self.settle()

    def settle(self):
        """
        Finish what the reactor finishes by itself: a connection the server
        dropped (C{loseConnection} towards a peer that reads, or
        C{abortConnection}) is lost.
        """
        if self.proto is not None and not self.lost and self.transport.disconnecting:
            self.loseConnection(ConnectionDone("closed"))

    def send(self, records, cuts=()):
        if not self.hostile:
            # A second HELLO and CLOSE end the connection.
            records = [
                Ping(tag=_FRESH) if isinstance(r, (Hello, Close, StartTLS)) else r
                for r in records
            ]
        self.requested = True
        self.feed(b"".join(encodeRecord(self.tagged(r)) for r in records), cuts)

    def advance(self, seconds):
        remaining = seconds
        while remaining > 0:
            step = min(remaining, 1.0 if seconds <= 20 else 10.0)
            self.network.clock.advance(step)
            remaining -= step
            self.network.flush()
            self.settle()

    # -- the peer's moves -------------------------------------------------------

    @rule(record=records(), cuts=CUTS)
    def sendRecord(self, record, cuts):
        """
        Any valid record (or an unknown type), random tag and flags.
        """
        self.send([record], cuts)

    @rule(batch=st.lists(records(), min_size=2, max_size=8), cuts=CUTS)
    def sendBatch(self, batch, cuts):
        """
        Several records in one stream, split anywhere.
        """
        self.send(batch, cuts)

    @rule(
        cls=st.sampled_from(DATA_CLASSES),
        data=st.data(),
        plausible=st.booleans(),
        sender=st.sampled_from(PLAUSIBLE),
        recipient=st.sampled_from(RECIPIENTS),
        cuts=CUTS,
    )
    def sendData(self, cls, data, plausible, sender, recipient, cuts):
        """
        Data before (and without) authentication: random fields, or a
        plausible envelope between well-formed addresses.
        """
        fields = data.draw(recordFields(cls))
        if plausible:
            origin, target = _ENVELOPE[cls]
            fields[origin] = sender
            fields[target] = (recipient,) if target == "subscribers" else recipient
            if "messageId" in fields:
                fields["messageId"] = f"m-{self.nextTag}"
        self.send([cls(tag=_FRESH, **fields)], cuts)

    @rule(
        fromDomain=st.one_of(st.sampled_from([ELSEWHERE, "nowhere.test", "Bücher.test"]), DOMAINS),
        toDomain=st.one_of(st.sampled_from(HOSTED), DOMAINS),
        token=st.binary(min_size=1, max_size=90),
        tag=TAGS,
        secret=st.one_of(st.none(), st.binary(min_size=16, max_size=64)),
    )
    def sendDialbackKey(self, fromDomain, toDomain, token, tag, secret):
        """
        DIALBACK_KEY with a junk token, perhaps followed by a guessed
        DIALBACK_SECRET for the same pair.
        """
        fromDomain, toDomain = fit(fromDomain, (1, 253)), fit(toDomain, (1, 253))
        batch = [
            DialbackKey(tag=_fresh(tag), fromDomain=fromDomain, toDomain=toDomain, token=token)
        ]
        if secret is not None:
            batch.append(DialbackSecret(fromDomain=fromDomain, toDomain=toDomain, secret=secret))
        self.send(batch)

    @rule(record=records(classes=[DialbackSecret, DialbackVerify, DialbackKey]))
    def sendDialbackJunk(self, record):
        """
        Any dial-back record with random fields.
        """
        self.send([record])

    @precondition(lambda self: self.hostile)
    @rule(junk=JUNK, cuts=CUTS)
    def sendJunk(self, junk, cuts):
        """
        Something that breaks the framing or the encoding rules: a frame
        with a random field table, a mutated, truncated or lying record, an
        oversize header, or random bytes.
        """
        kind, *args = junk
        if kind == "raw":
            data = rawFrame(*args)
        elif kind == "mutated":
            record, mutations = args
            data = mutate(encodeRecord(self.tagged(record)), mutations)
        elif kind == "truncated":
            record, keep = args
            data = encodeRecord(self.tagged(record))
            data = data[: keep % len(data)]
        elif kind == "lying":
            record, lie = args
            data = bytearray(encodeRecord(self.tagged(record)))
            data[:4] = struct.pack(">I", max(0, len(data) - HEADER_SIZE + lie))
            data = bytes(data)
        elif kind == "oversize":
            length, recordType, tag, body = args
            data = HEADER.pack(length, recordType, 0, tag) + body
        else:
            (data,) = args
        self.feed(data, cuts)

    @rule(tag=TAGS)
    def sendPing(self, tag):
        self.send([Ping(tag=_fresh(tag))])

    @precondition(lambda self: self.hostile)
    @rule(close=records(classes=[Close]))
    def sendClose(self, close):
        self.send([close])

    @rule(tag=TAGS, trailing=st.one_of(st.none(), st.binary(min_size=1, max_size=20)))
    def sendStartTLS(self, tag, trailing):
        """
        STARTTLS, alone or with bytes after it in the same read.  A calm
        peer sends it only as its first request, alone, as section 11.1
        asks.
        """
        if not self.hostile:
            if self.requested:
                return
            tag, trailing = None, None
        self.requested = True
        data = encodeRecord(self.tagged(StartTLS(tag=_fresh(tag))))
        self.feed(data + (trailing or b""))

    @precondition(lambda self: self.hostile)
    @rule(hello=st.one_of(VALID_HELLOS, HELLO_VARIANTS), preamble=st.booleans())
    def sendHello(self, hello, preamble):
        """
        HELLO (again), with or without the preamble.
        """
        self.feed((PREAMBLE if preamble else b"") + encodeRecord(hello))

    @precondition(lambda self: self.canSend() and self.serverPings)
    @rule(answer=st.sampled_from(["pong", "error", "ack", "other"]))
    def answerServerPing(self, answer):
        """
        Answer the server's keepalive PING, one way or another.
        """
        tag = self.serverPings.pop(0)
        reply = {
            "pong": Pong(tag=tag),
            "error": Error(tag=tag, code=400),
            "ack": Ack(tags=(tag, tag)),
            "other": StatusResult(tag=tag),
        }[answer]
        self.send([reply])

    @precondition(lambda self: self.proto is not None)
    @rule(
        seconds=st.sampled_from(
            [0.5, 1.0, 4.9, CLOSE_GRACE + 0.1, 9.9, 10.1, 15.1, 30.0, 60.5, 121.0, 601.0]
        )
    )
    def letTimePass(self, seconds):
        self.advance(seconds)

    @precondition(lambda self: self.hostile)
    @rule()
    def peerHangsUp(self):
        if not self.lost:
            self.loseConnection(ConnectionLost("the peer went away"))

    @precondition(
        lambda self: self.proto is not None
        and not self.lost
        and self.transport.tlsStartedAt is not None
        and not self.tlsDone
    )
    @rule(hello=st.one_of(st.none(), VALID_HELLOS))
    def tlsHandshakeSucceeds(self, hello):
        """
        The (pretend) TLS handshake completes: both sides start again
        with the preamble, and perhaps the peer sends its second HELLO.
        """
        self.tlsDone = True
        self.proto.handshakeCompleted()
        self.outputUpTo(self.transport.tlsStartedAt)
        self._resetStreams()
        self.readFrom = self.transport.tlsStartedAt
        self.network.flush()
        if hello is not None:
            self.feed(PREAMBLE + encodeRecord(hello))

    @precondition(
        lambda self: self.proto is not None
        and not self.lost
        and self.transport.tlsStartedAt is not None
        and not self.tlsDone
    )
    @rule()
    def tlsHandshakeFails(self):
        self.loseConnection(ConnectionLost("TLS handshake failed"))

    def loseConnection(self, reason):
        self.lost = True
        self.transport.disconnected = True
        self.proto.connectionLost(Failure(reason))
        self.network.flush()

    # -- what the server wrote ----------------------------------------------------

    def outputUpTo(self, end=None):
        """
        Decode what the server wrote since the last call (up to C{end}),
        checking that it is valid IMX, and count answers by tag.
        """
        value = self.transport.value()
        end = len(value) if end is None else end
        new = value[self.readFrom : end]
        self.readFrom = end
        try:
            frames = self.reader.feed(new)
            written = [decodeRecord(frame) for frame in frames]
        except WireError as e:
            raise AssertionError(f"the server wrote invalid IMX: {e}") from None
        for record in written:
            if not self.seenHello:
                assert isinstance(record, Hello), f"server began with {record!r}"
                self.seenHello = True
            if isinstance(record, Ping) and record.tag:
                self.serverPings.append(record.tag)
            if not record.response and record.tag and self.closeSent:
                # After CLOSE a side sends no new requests (section 9).
                raise AssertionError(f"{record!r} after CLOSE")
            if isinstance(record, Close):
                self.closeSent = True
            if not record.response:
                continue
            tags = record.tags if isinstance(record, Ack) else (record.tag,)
            for tag in tags:
                if tag:
                    self.answers[tag] = self.answers.get(tag, 0) + 1
            if isinstance(record, Error):
                self.codes.add(record.code)

    # -- invariants ---------------------------------------------------------------

    @invariant()
    def nothingLogged(self):
        assert not self.failures, "failure logged: %r" % (self.failures[0],)

    @invariant()
    def knownState(self):
        if self.proto is not None:
            assert isinstance(self.proto.state, PeerState), self.proto.state

    @invariant()
    def closedMeansGoing(self):
        """
        A closed connection is being dropped and takes no records; a
        closing one has sent CLOSE.
        """
        if self.proto is None:
            return
        state = self.proto.state
        if state is PeerState.CLOSED:
            assert self.transport.disconnecting or self.lost
            assert not self.dispatchedClosed, self.dispatchedClosed
            # Once CLOSED, the server writes nothing but the one ERROR that
            # _refuse sends right after entering that state.
            late = self.transport.lateWrites
            assert len(late) <= 1 and all(_isError(data) for data, _ in late), (
                "the server wrote after closing: %r" % (late,)
            )
            if self.closedOutput is None:
                self.closedOutput = len(self.transport.value())
            assert len(self.transport.value()) == self.closedOutput, (
                "the server wrote after closing: %r" % (late,)
            )
        if self.lost:
            assert state is PeerState.CLOSED
            proto = self.proto
            for timer in (
                proto._handshakeTimer,
                proto._keepaliveTimer,
                proto._idleTimer,
                proto._closeTimer,
                proto._drainTimer,
            ):
                assert timer is None or not timer.active(), timer
            assert not proto._awaitingSecret
            assert proto not in self.server.connections

    @invariant()
    def validOutputAndAtMostOneAnswer(self):
        if self.proto is None:
            return
        if self.transport.tlsStartedAt is not None and not self.tlsDone:
            self.outputUpTo(self.transport.tlsStartedAt)
        else:
            self.outputUpTo()
        for tag, count in self.answers.items():
            assert count <= self.allowed.get(tag, 0), (
                f"tag {tag}: {count} answers for {self.allowed.get(tag, 0)} records"
            )
        if self.proto.state is PeerState.CLOSING:
            assert any(
                isinstance(r, Close)
                for r in decodeAll(self.transport.value(), self.transport.tlsStartedAt)
            ), "closing without having sent CLOSE"

    @invariant()
    def noDataDelivered(self):
        if self.proto is None:
            return
        assert not self.delivered, self.delivered
        assert not self.proto.receivablePairs, self.proto.receivablePairs
        for server in (self.server, self.other):
            for domain in server.hostedDomains():
                backend = server.aggregator.domain(domain).backend
                assert not (
                    backend.messages
                    or backend.notifications
                    or backend.subscriptionRequests
                    or backend.subscriptionChanges
                ), backend

    def teardown(self):
        try:
            if self.proto is not None:
                if self.proto.state is PeerState.OPEN and self.canSend():
                    # Let pending dial-backs finish (or time out).
                    self.advance(16.0)
                    self.validOutputAndAtMostOneAnswer()
                    if self.proto.state is PeerState.OPEN:
                        for tag in set(self.expected) | set(self.answers):
                            assert self.answers.get(tag, 0) == self.expected.get(tag, 0), (
                                f"tag {tag}: {self.answers.get(tag, 0)} answers, "
                                f"{self.expected.get(tag, 0)} expected"
                            )
                finalState = self.proto.state
                if not self.lost:
                    self.loseConnection(ConnectionDone("test over"))
                self.closedMeansGoing()
                self.noDataDelivered()
                for server in (self.server, self.other):
                    server.aggregator.stopService()
                # Unhandled errors in Deferreds are logged when collected.
                _EXAMPLES[0] += 1
                gc.collect(2 if _EXAMPLES[0] % 50 == 0 else 1)
                self.nothingLogged()
                for name, value in sorted(self.server.counters.items()):
                    event(f"counter {name}")
                event(f"final state {finalState.value}")
                if self.tlsDone:
                    event("TLS upgrade completed")
                if not self.hostile and self.proto.closeReason is not None:
                    event(f"calm closed: {self.proto.closeReason.code}")
                for code in sorted(self.codes):
                    event(f"ERROR {code}")
        finally:
            globalLogPublisher.removeObserver(self._observe)


_EXAMPLES = [0]


def _withTag(record, tag):
    return attrs.evolve(record, tag=tag)


def _isError(data):
    """
    @return: whether C{data} is exactly one ERROR record.
    """
    frames = FrameDecoder(0xFFFFFFFF, expectPreamble=False).feed(data)
    return len(frames) == 1 and isinstance(decodeRecord(frames[0]), Error)


def decodeAll(data, tlsStartedAt):
    """
    @return: the records of the server's stream since its last preamble.
    """
    if tlsStartedAt is not None and len(data) > tlsStartedAt:
        data = data[tlsStartedAt:]
    elif tlsStartedAt is not None:
        data = data[:tlsStartedAt]
    return [decodeRecord(f) for f in FrameDecoder(0xFFFFFFFF).feed(data)]


class Mirror:
    """
    Follows the bytes the peer sent the way the server frames them, to
    know how many records carried each tag (the most answers that tag may
    get) and how many answers each tag must get if the connection stays
    open.
    """

    def __init__(self):
        self.preamble = 0
        self.buffer = bytearray()
        self.dead = False

    def feed(self, data, machine):
        if self.dead:
            return
        if self.preamble < len(PREAMBLE):
            want = PREAMBLE[self.preamble :]
            got = data[: len(want)]
            if not want.startswith(got):
                self.dead = True
                return
            self.preamble += len(got)
            data = data[len(got) :]
        self.buffer += data
        while len(self.buffer) >= HEADER_SIZE:
            length, recordType, flags, tag = HEADER.unpack_from(self.buffer)
            if length > MAX_RECORD:
                _count(machine.allowed, tag)
                self.dead = True
                return
            if len(self.buffer) < HEADER_SIZE + length:
                return
            body = bytes(self.buffer[HEADER_SIZE : HEADER_SIZE + length])
            del self.buffer[: HEADER_SIZE + length]
            _count(machine.allowed, tag)
            if tag and _answered(Frame(recordType, flags, tag, body)):
                _count(machine.expected, tag)


def _count(table, tag):
    if tag:
        table[tag] = table.get(tag, 0) + 1


def _answered(frame):
    """
    @return: whether a receiver that keeps the connection open answers
        this tagged frame (by its tag).
    """
    try:
        record = decodeRecord(frame)
    except MustUnderstand:
        return True
    except WireError:
        return False  # fatal: the connection does not stay open
    if isinstance(record, (Hello, Close, Redirect, DialbackSecret)):
        return False
    if isinstance(record, (Ping, StartTLS, DialbackKey, DialbackVerify)):
        # Taken by their type, whatever the RESPONSE flag says.
        return True
    return not record.response


ReceiverMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate] if os.environ.get("FUZZ_NOSHRINK") else list(Phase),
)
TestReceiverFuzz = ReceiverMachine.TestCase


# -- known defects, found by the machine above -----------------------------------


def _openConnection(network, server):
    """
    @return: C{(protocol, transport)}: an inbound connection of C{server}
        whose peer has sent the preamble and a valid HELLO.
    """
    transport = StringTransport(peerAddress=STRANGER)
    protocol = server.buildProtocol(STRANGER)
    protocol.makeConnection(transport)
    protocol.dataReceived(
        PREAMBLE + encodeRecord(Hello(versionMin=1, versionMax=1, maxRecord=MAX_RECORD))
    )
    return protocol, transport


def _afterClose(transport):
    """
    @return: the records the server wrote after its (first) CLOSE.
    """
    written = decodeAll(transport.value(), None)
    closes = [i for i, r in enumerate(written) if isinstance(r, Close)]
    assert closes, "the server sent no CLOSE"
    return written[closes[0] + 1 :]


def test_noPingAfterIdleClose():
    """
    A peer that answers every PING half a second late: the server closes
    the idle connection at 600 s, then sends a PING at about 604.8 s,
    inside the close grace, against section 9 ("After sending CLOSE it
    sends no new requests").
    """
    network = Network()
    server = network.server("10.0.0.1", list(HOSTED))
    protocol, transport = _openConnection(network, server)
    reader = FrameDecoder(0xFFFFFFFF, expectPreamble=True)
    read, due = 0, []
    for _ in range(6080):
        network.clock.advance(0.1)
        value = transport.value()
        for frame in reader.feed(value[read:]):
            record = decodeRecord(frame)
            if isinstance(record, Ping):
                due.append((network.clock.seconds() + 0.5, record.tag))
        read = len(value)
        for when, tag in list(due):
            if network.clock.seconds() >= when - 1e-6:
                due.remove((when, tag))
                protocol.dataReceived(encodeRecord(Pong(tag=tag)))
    assert protocol.state is PeerState.CLOSING
    assert _afterClose(transport) == []


def test_noPingAfterPeerClose():
    """
    The peer sends CLOSE and does not read, so the transport does not
    finish closing: the server answers CLOSE, then 60 s later writes a
    PING, and the connection is never aborted.
    """
    network = Network()
    server = network.server("10.0.0.1", list(HOSTED))
    protocol, transport = _openConnection(network, server)
    protocol.dataReceived(encodeRecord(Close()))
    assert protocol.state is PeerState.CLOSED
    assert transport.disconnecting
    network.clock.advance(60.0)
    network.clock.advance(60.0)
    assert _afterClose(transport) == []
    assert transport.disconnected, "never aborted"


# -- the live run -----------------------------------------------------------------

#: The imxd under test listens here; the fuzzing peer connects from
#: LIVE_CLIENT, where the DNS server also runs; nothing listens on
#: LIVE_DEAD (dial-backs to C{dead.test} are refused there).
LIVE_HOST = "127.0.0.61"
LIVE_CLIENT = "127.0.0.62"
LIVE_DEAD = "127.0.0.63"

#: The run: aim at LIVE_TARGET records, send at least LIVE_RECORDS, within
#: LIVE_DEADLINE seconds and LIVE_MAX_CONNECTIONS connections, from this seed.
LIVE_RECORDS = 100_000
LIVE_TARGET = 200_000
LIVE_DEADLINE = 120.0
LIVE_MAX_CONNECTIONS = 2000
LIVE_SEED = 0x1A7E61

#: The figures of the last live run (records, connections, seconds, ...).
LIVE_FIGURES = {}

#: The tag of the PING that ends a connection whose framing is intact.
END_TAG = 0xFFFF0001



class LiveJunk:
    """
    Random records for the live run, from one seeded L{random.Random}:
    plain Python, so that 100,000 of them are quick to make.
    """

    #: Never a name that /etc/hosts resolves (such as localhost): a
    #: dial-back must not reach beyond 127.0.0.61-63.
    DOMAINS = [
        "alpha.test", "beta.test", "ALPHA.test", "evil.test", "dead.test", "nowhere.test",
        "bücher.test", "xn--bcher-kva.test", "-x-.test", "a..test", "10.0.0.1",
    ]
    LOCALS = ["bob", "alice", "Ann", "postmaster", "ǅ", "a b", "x" * 70]
    WORDS = ["online", "away", "granted", "pending", "text/plain", "text/html-lite", "alias=Bob",
             "dialback", "starttls", "", "é", "\u2028", "\U0001F600", "%s", "<b>x</b>"]
    #: Classes for records that keep a connection open.
    STEADY = [cls for cls in _CLASSES if cls not in (Hello, Close, StartTLS)]

    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.tag = 0

    def freshTag(self):
        self.tag += 1
        return self.tag

    def text(self, lengths):
        rng = self.rng
        low, high = lengths or (0, 80)
        choice = rng.random()
        if choice < 0.3:
            text = f"{rng.choice(self.LOCALS)}@{rng.choice(self.DOMAINS)}"
        elif choice < 0.5:
            text = rng.choice(self.DOMAINS)
        elif choice < 0.8:
            text = rng.choice(self.WORDS)
        else:
            text = "".join(
                chr(rng.choice([rng.randrange(1, 0x80), rng.randrange(0x80, 0xD800),
                                rng.randrange(0xE000, 0x110000)]))
                for _ in range(rng.randrange(0, 20))
            )
        return fit(text, (low, min(high, 300)))

    def value(self, field):
        rng = self.rng
        kind = FIELD_KINDS[field]
        if kind is FieldKind.U16:
            return rng.choice([0, 1, 2, 407, 500, 0xFFFF, rng.randrange(0x10000)])
        if kind is FieldKind.U32:
            return rng.choice([0, 1, 16384, 65536, 0xFFFFFFFF, rng.randrange(1 << 32)])
        if kind is FieldKind.TAGS:
            return tuple(rng.randrange(1 << 32) for _ in range(rng.randrange(4)))
        if kind is FieldKind.BYTES:
            low, high = FIELD_LENGTHS.get(field) or (0, 200)
            return rng.randbytes(rng.randint(low, min(high, 120)))
        return self.text(FIELD_LENGTHS.get(field))

    def record(self, classes):
        """
        @return: the bytes of a valid record of one of C{classes}, an
            unknown type, or a known one with an unknown field.
        """
        rng = self.rng
        roll = rng.random()
        tag = rng.choice(
            [self.freshTag(), self.freshTag(), self.freshTag(), 0, rng.randrange(1 << 32)]
        )
        if roll < 0.08:
            recordType = rng.randrange(0x10000)
            if recordType in RECORD_CLASSES:
                recordType = 0x7E42
            return rawFrame(
                recordType, rng.choice([0, 0, 1, 2, 3]), tag,
                [(rng.randrange(0x10000), rng.randbytes(rng.randrange(30)))
                 for _ in range(rng.randrange(4))],
            )
        cls = rng.choice(classes)
        fields = {}
        for spec in cls.FIELDS:
            if spec.repeated:
                count = rng.randint(1 if spec.required else 0, 3)
                fields[spec.attribute] = tuple(self.value(spec.field) for _ in range(count))
            elif spec.required or rng.random() < 0.5:
                fields[spec.attribute] = self.value(spec.field)
        if cls in DATA_CLASSES and rng.random() < 0.5:
            origin, target = _ENVELOPE[cls]
            fields[origin] = rng.choice(PLAUSIBLE)
            recipient = rng.choice(RECIPIENTS)
            fields[target] = (recipient,) if target == "subscribers" else recipient
            if "messageId" in fields:
                fields["messageId"] = f"m{tag}"
        record = cls(
            tag=tag, response=rng.random() < 0.05, mustUnderstand=rng.random() < 0.05, **fields
        )
        data = encodeRecord(record)
        if roll < 0.16:
            # An unknown field: skipped, or (must-understand) refused.
            extra = rng.choice([0x0100, 0x8100, 0x7FFF, 0xFFFF])
            value = rng.randbytes(rng.randrange(12))
            body = data[HEADER_SIZE:] + FIELD_HEADER.pack(extra, len(value)) + value
            data = HEADER.pack(len(body), cls.TYPE, record.flags, tag) + body
        return data

    def broken(self, data):
        """
        @return: C{data} broken in one of many ways: bytes flipped, set,
            removed, added or cut, a lying or oversize length, or garbage.
        """
        rng = self.rng
        how = rng.randrange(7)
        if how == 0:
            length = len(data) - HEADER_SIZE + rng.randint(-30, 30)
            return struct.pack(">I", max(0, length)) + data[4:]
        if how == 1:
            return struct.pack(">I", rng.randint(MAX_RECORD + 1, 0xFFFFFFFF)) + data[4:]
        if how == 2:
            return rng.randbytes(rng.randint(1, 64))
        if how == 3:
            return data[: rng.randrange(len(data))]
        operations = ["flip", "set", "delete", "insert", "duplicate"]
        return mutate(
            data,
            [(rng.choice(operations), rng.randrange(1 << 20), rng.randrange(256),
              rng.randbytes(rng.randrange(8))) for _ in range(rng.randint(1, 3))],
        )

    def hello(self):
        return PREAMBLE + encodeRecord(
            Hello(versionMin=1, versionMax=1, maxRecord=self.rng.choice([16384, 65536, 1 << 24]),
                  capabilities=("dialback",), software="fuzz",
                  toDomain=self.rng.choice([None, "alpha.test", "beta.test"]))
        )

    def connection(self):
        """
        @return: C{(kind, items)}: what one connection sends, as
            C{(bytes, records)} items; C{kind} C{"steady"} means framing
            stays intact to the end (the server must answer a last PING).
        """
        rng = self.rng
        count = rng.randint(200, 2000)
        roll = rng.random()
        if roll < 0.55:
            kind, rate = "steady", 0.0
        elif roll < 0.85:
            kind, rate = "mutating", rng.choice([1 / 30, 1 / 100, 1 / 300])
        else:
            kind, rate = "opening", 0.0
        items = [(self.hello(), 0)]
        if kind == "opening":
            items = [(self.badOpening(), 1)]
        elif rng.random() < 0.1:
            items.append((encodeRecord(StartTLS(tag=self.freshTag())), 1))
        for _ in range(count):
            data = self.record(self.STEADY if kind != "opening" else _CLASSES)
            if rate and rng.random() < rate:
                data = self.broken(data)
            items.append((data, 1))
        return kind, items

    def badOpening(self):
        rng = self.rng
        how = rng.randrange(8)
        good = self.hello()
        if how == 0:
            return rng.randbytes(rng.randint(1, 100))
        if how == 1:
            return PREAMBLE[: rng.randrange(1, 8)] + rng.randbytes(rng.randint(1, 40))
        if how == 2:
            return PREAMBLE + rng.randbytes(rng.randint(1, 100))
        if how == 3:
            return PREAMBLE + encodeRecord(
                Hello(versionMin=rng.randint(2, 9), versionMax=rng.randint(0, 9),
                      maxRecord=rng.choice([0, 16383, 65536]),
                      toDomain=rng.choice([None, "nowhere.test", "ALPHA.TEST", "a..b"]))
            )
        if how == 4:
            return PREAMBLE + self.record([cls for cls in _CLASSES if cls is not Hello])
        if how == 5:
            return good + encodeRecord(Hello(versionMin=1, versionMax=1, maxRecord=65536))
        if how == 6:
            return good + encodeRecord(Close(code=rng.randrange(0x10000), text="bye"))
        return self.broken(good)


class ServerReader:
    """
    Reads what the live server writes: it must be valid IMX, beginning
    with HELLO (or, for a connection refused at admission, ERROR).
    """

    def __init__(self):
        self.decoder = FrameDecoder(1 << 24, expectPreamble=True)
        self.records = 0
        self.first = None
        self.ended = False
        self.errors = {}
        self.lastError = None

    def feed(self, data):
        try:
            for frame in self.decoder.feed(data):
                record = decodeRecord(frame)
                self.records += 1
                if self.first is None:
                    self.first = record
                    assert isinstance(record, (Hello, Error)), f"server began with {record!r}"
                if isinstance(record, Pong) and record.tag == END_TAG:
                    self.ended = True
                if isinstance(record, Error):
                    self.errors[record.code] = self.errors.get(record.code, 0) + 1
                    self.lastError = record
        except WireError as e:
            raise AssertionError(f"the server wrote invalid IMX: {e}") from None


@pytest.mark.slow
class LiveFuzzTests(SynchronousTestCase):
    """
    A real C{twistd -n imxd} on 127.0.0.61 faced with more than 100,000
    random and mutated records, then asked by a valid peer.
    """

    def setUp(self):
        self.base = tempfile.mkdtemp(prefix="imxd-live-fuzz-")
        self.addCleanup(shutil.rmtree, self.base, True)
        self.port = freePort(LIVE_HOST)
        self.dns = DNSServer(self.base, interface=LIVE_CLIENT)
        self.dns.target("evil.test", "imx-self.test", LIVE_HOST, self.port)
        self.dns.dead("dead.test", LIVE_DEAD, freePort(LIVE_DEAD))
        self.addCleanup(self.dns.stop)
        self.dns.start()
        self.server = self.spawn("imxd", self.startServer())
        self.waitListening(self.server, LIVE_HOST, self.port)

    # -- processes ----------------------------------------------------------------

    def spawn(self, name, arguments):
        """
        Start twistd with C{arguments}; it is stopped by its PID (SIGTERM,
        then SIGKILL) when the test ends, whatever happens.
        """
        directory = os.path.join(self.base, name)
        os.makedirs(directory, exist_ok=True)
        log = open(os.path.join(directory, "twistd.log"), "w")
        process = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", *arguments],
            cwd=directory, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
        process.logPath = log.name
        self.addCleanup(log.close)
        self.addCleanup(_stop, process)
        return process

    def startServer(self):
        config = os.path.join(self.base, "imxd.toml")
        with open(config, "w") as f:
            f.write(
                "[server]\n"
                'state_dir = "state"\n'
                f'listen = ["tcp:port={self.port}:interface={LIVE_HOST}"]\n'
                f'dns_servers = ["{LIVE_CLIENT}:{self.dns.port}"]\n'
                "[server.timeouts]\n"
                "handshake = 2.0\n"
                "dialback = 3.0\n"
                "connect = 1.0\n"
                '[[domain]]\nname = "alpha.test"\nbackend = "memory"\n'
                '[[domain]]\nname = "beta.test"\nbackend = "memory"\n'
            )
        return ["imxd", "--config", config]

    def waitListening(self, process, host, port):
        deadline = time.monotonic() + WAIT
        while True:
            if process.poll() is not None:
                raise AssertionError(f"twistd exited:\n{_read(process.logPath)}")
            try:
                with socket.create_connection((host, port), timeout=1.0):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"nothing listens on {host}:{port}") from None
                time.sleep(0.05)

    # -- the run ----------------------------------------------------------------------

    def test_liveFuzz(self):
        """
        More than 100,000 random or mutated records over many sequential
        connections; the server stays up, writes only valid IMX, answers a
        last PING on every connection whose framing stayed intact, lets no
        Data through, logs no traceback, and answers a valid peer at the
        end.
        """
        junk = LiveJunk(LIVE_SEED)
        started = time.monotonic()
        records = connections = steady = closedByServer = refusedAtAdmission = 0
        errors = {}
        while records < LIVE_TARGET and connections < LIVE_MAX_CONNECTIONS:
            if time.monotonic() - started > LIVE_DEADLINE:
                break
            # Each connection from its own seed, so that it is the same
            # whatever the timing of the ones before it.
            junk.rng.seed(LIVE_SEED * 100_003 + connections)
            kind, items = junk.connection()
            sent, reader, closed = self.runConnection(junk.rng, kind, items, started)
            if kind == "steady":
                # Nothing in a steady connection is a reason to close it.
                self.assertFalse(
                    closed,
                    f"connection {connections} closed by the server after {sent} records; "
                    f"last ERROR: {reader.lastError!r}",
                )
            records += sent
            connections += 1
            steady += kind == "steady"
            closedByServer += closed
            refusedAtAdmission += isinstance(reader.first, Error)
            for code, count in reader.errors.items():
                errors[code] = errors.get(code, 0) + count
        seconds = time.monotonic() - started
        LIVE_FIGURES.update(
            records=records, connections=connections, seconds=round(seconds, 1),
            rate=round(records / seconds), steady=steady, closedByServer=closedByServer,
            refusedAtAdmission=refusedAtAdmission,
            errors=dict(sorted(errors.items())),
        )
        print(
            f"\nlive fuzz: {records} records over {connections} connections in "
            f"{seconds:.1f} s ({records / seconds:.0f} records/s; {steady} steady "
            f"connections, {closedByServer} closed by the server, {refusedAtAdmission} "
            f"refused at admission; ERROR codes "
            f"{dict(sorted(errors.items()))})"
        )
        self.assertGreaterEqual(
            records, LIVE_RECORDS,
            f"only {records} records sent over {connections} connections in {seconds:.1f} s",
        )
        self.assertStillServing()

    def runConnection(self, rng, kind, items, started):
        """
        Send C{items} over one connection, in chunks split at random
        points, reading (and checking) what the server writes; end with
        PING (steady connections) and CLOSE, or by closing our side.

        @return: C{(records sent, reader, whether the server closed first)}.
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        reader = ServerReader()
        sent = 0
        try:
            sock.bind((LIVE_CLIENT, 0))
            sock.settimeout(5.0)
            sock.connect((LIVE_HOST, self.port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            closed = False
            index = 0
            for _ in range(len(items)):
                if index >= len(items) or closed:
                    break
                if time.monotonic() - started > LIVE_DEADLINE + 5:
                    break
                size = rng.randint(1, 48)
                chunk = items[index : index + size]
                index += size
                data = b"".join(d for d, _ in chunk)
                try:
                    cuts = [rng.randrange(1 << 20) for _ in range(rng.randrange(3))]
                    for piece in split(data, cuts):
                        sock.sendall(piece)
                except OSError:
                    closed = True
                    break
                sent += sum(n for _, n in chunk)
                closed = _drain(sock, reader, 0.0)
            if not closed and kind == "steady":
                try:
                    sock.sendall(encodeRecord(Ping(tag=END_TAG)))
                except OSError:
                    closed = True
                deadline = time.monotonic() + 10.0
                while not (closed or reader.ended) and time.monotonic() < deadline:
                    closed = _drain(sock, reader, 0.2)
                if not closed:
                    self.assertTrue(
                        reader.ended, "the server stopped answering: no PONG to the last PING"
                    )
                    try:
                        sock.sendall(encodeRecord(Close()))
                    except OSError:
                        closed = True
            serverClosed = closed
            if not closed:
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                deadline = time.monotonic() + 5.0
                while not closed and time.monotonic() < deadline:
                    closed = _drain(sock, reader, 0.2)
                self.assertTrue(closed, "the server did not close the connection after ours")
            self.assertIsNone(self.server.poll(), "the server exited")
            return sent, reader, serverClosed
        finally:
            sock.close()

    # -- afterwards ---------------------------------------------------------------------

    def assertStillServing(self):
        """
        The process is alive, answers a valid peer's HELLO and PING, has
        authenticated no pair and delivered no Data, and logged no
        traceback.
        """
        self.assertIsNone(self.server.poll(), "the server exited")
        os.kill(self.server.pid, 0)
        peer = BlockingPeer(
            socket.create_connection((LIVE_HOST, self.port), timeout=WAIT), toDomain="alpha.test"
        )
        try:
            answer = peer.request(Ping(tag=7))
            self.assertIsInstance(answer, Pong)
            self.assertEqual(answer.tag, 7)
        finally:
            peer.close()
        admin = BlockingPeer.unix(os.path.join(self.base, "state", "admin.sock"))
        try:
            status = dict(
                line.split("=", 1) for line in admin.request(Status(tag=1)).attributes
            )
        finally:
            admin.close()
        LIVE_FIGURES["status"] = status
        self.assertEqual(status.get("pairs-inbound"), "0", status)
        self.assertNotIn("count.data-received", status)
        self.assertNotIn("count.pairs-authenticated", status)
        log = _read(self.server.logPath)
        for sign in ("Traceback", "Unhandled Error", "Unhandled error"):
            if sign in log:
                self.fail(f"the server logged {sign!r}:\n{_excerpt(log, sign)}")


def _drain(sock, reader, timeout):
    """
    Read what has arrived (waiting up to C{timeout} seconds for the first
    bytes) and check it.

    @return: whether the server has closed the connection.
    """
    waited = False
    while True:
        ready, _, _ = select.select([sock], [], [], 0.0 if waited else timeout)
        if not ready:
            return False
        waited = True
        try:
            data = sock.recv(1 << 16)
        except (ConnectionResetError, BrokenPipeError):
            return True
        except (BlockingIOError, socket.timeout):
            return False
        if not data:
            return True
        reader.feed(data)


def _stop(process):
    """
    Stop a process by its PID: SIGTERM, then SIGKILL if it lingers.
    """
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=WAIT)


def _read(path):
    with open(path, errors="replace") as f:
        return f.read()


def _excerpt(log, sign):
    at = log.index(sign)
    return log[max(0, at - 2000) : at + 3000]
