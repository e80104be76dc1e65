"""
The IMX peer protocol: one L{PeerProtocol} per TCP connection, built by a
L{PeerFactory}.

This module owns the connection's life: preamble and HELLO (version and
capability negotiation), the handshake timeout, PING/PONG keepalive, the
idle close, orderly CLOSE, requests with tags and their responses, and the
refusal of bad input (ERROR, then close), and the in-band upgrade to TLS
(STARTTLS, then preamble and HELLO again inside TLS; section 11).  What
Data records mean is decided elsewhere; here every Data record is refused
as not authenticated.

Time comes from the injected clock; nothing here touches the global
reactor.
"""

import collections
import enum
import itertools

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from imxd.address import AddressError, normaliseDomain
from imxd.callbacks import Callbacks
from imxd.tls import describe
from imxd.wire import (
    DATA_TYPES,
    MINIMUM_MAX_RECORD,
    PREAMBLE,
    RecordType,
    VERSION_MAX,
    VERSION_MIN,
    Ack,
    Close,
    EncodeError,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    Hello,
    Ping,
    Pong,
    StartTLS,
    StartTLSProceed,
    UnknownRecord,
    WireError,
    decodeRecord,
    encodeRecord,
)
from imxd.wire.records import FAST_SCHEMAS

#: Seconds allowed for the peer's CLOSE after ours, and for a refused
#: connection's last bytes to drain, before the TCP connection is aborted.
CLOSE_GRACE = 5.0

#: Seconds a request waits for its answer by default (L{PeerSettings}).
REQUEST_TIMEOUT = 60.0

#: The most tags one ACK carries: 4000 tags make a 16,006-octet body,
#: within the smallest MAX_RECORD a peer may announce (16,384).
ACK_BATCH = 4000


@attrs.frozen
class PeerSettings:
    """
    What a peer connection needs to know about the server it runs in.

    @ivar hostedDomains: the normalised names of the domains served here.
    @ivar handshakeTimeout: seconds allowed from connect until HELLO is done.
    @ivar keepaliveInterval: seconds of silence before a PING is sent; the
        peer is dropped when no PONG comes back within the same interval.
    @ivar idleTimeout: seconds without Data before an orderly CLOSE (0:
        never).
    @ivar requestTimeout: seconds a request sent waits for its answer
        before it fails for now (C{temporary-failure}); 0: for ever.
    @ivar maxRecordSize: largest record body accepted, announced in HELLO.
    @ivar software: product token announced in HELLO.
    """

    hostedDomains: frozenset = frozenset()
    handshakeTimeout: float = 10.0
    keepaliveInterval: float = 60.0
    requestTimeout: float = REQUEST_TIMEOUT
    idleTimeout: float = 600.0
    maxRecordSize: int = 65536
    software: str = "imxd"


class PeerState(enum.Enum):
    """
    Where a connection is in its life.
    """

    AWAITING_HELLO = "awaiting-hello"
    OPEN = "open"
    UPGRADING = "upgrading"
    CLOSING = "closing"
    CLOSED = "closed"

    # Every record looks its handler up by the state: hash by identity (the
    # members are singletons) rather than by Enum's hash of the name, a
    # Python call.
    __hash__ = object.__hash__


class Refused(Exception):
    """
    A request was refused, here or by a peer, with an ERROR code.

    @ivar code: the ERROR code (L{ErrorCode}).
    @ivar token: the code's name, e.g. C{"relay-denied"}.
    @ivar text: the explanation, or C{None}.
    @ivar retryAfter: seconds to wait before trying again, or C{None}.
    """

    def __init__(self, code, text=None, retryAfter=None):
        text = errorText(text)
        token = ErrorCode(code).token if code in _CODES else "unknown"
        super().__init__(f"{int(code)} {token}: {text or ''}".rstrip(": "))
        self.token = token
        self.code = int(code)
        self.text = text
        self.retryAfter = retryAfter

    @property
    def temporary(self):
        """
        Whether the request may succeed if tried again later.
        """
        return 400 <= self.code <= 499

    def toError(self, tag=0):
        """
        @return: the L{Error} record that reports this refusal.
        """
        return Error(tag=tag, code=self.code, text=self.text, retryAfter=self.retryAfter)


_CODES = frozenset(int(code) for code in ErrorCode)

#: The longest ERROR TEXT imxd sends, in characters (at most 4 octets each,
#: within the field's 4096-octet bound).
MAX_ERROR_TEXT = 1000


def errorText(text):
    """
    @return: C{text} cut to L{MAX_ERROR_TEXT} characters (marked with an
        ellipsis), so that an ERROR can always be encoded; L{None} stays.
    """
    if text is None or len(text) <= MAX_ERROR_TEXT:
        return text
    return text[: MAX_ERROR_TEXT - 1] + "\u2026"


class RemoteError(Refused):
    """
    The peer answered a request with ERROR.
    """

    def __init__(self, error):
        super().__init__(error.code, error.text, error.retryAfter)


def _failureText(reason):
    """
    @return: one line saying why a connection was lost.
    """
    text = reason.getErrorMessage() if hasattr(reason, "getErrorMessage") else str(reason)
    return text.splitlines()[0] if text else "connection lost"


def _canonicalOrNone(domain):
    """
    @return: the canonical form of C{domain}, or L{None} when it is absent
        or not a valid domain.
    """
    if domain is None:
        return None
    try:
        return normaliseDomain(domain)
    except AddressError:
        return None


def negotiateVersion(ours, theirs):
    """
    Choose the protocol version both sides speak: the highest version in
    both ranges.

    @param ours: C{(minimum, maximum)} of this side.
    @param theirs: C{(minimum, maximum)} of the peer.
    @return: the version, or C{None} when the ranges do not meet.
    """
    chosen = min(ours[1], theirs[1])
    if chosen < max(ours[0], theirs[0]):
        return None
    return chosen


@implementer(IHandshakeListener, IPushProducer)
class PeerProtocol(Protocol):
    """
    One IMX connection, in either direction.

    @ivar state: the connection's L{PeerState}.
    @ivar version: the negotiated protocol version, once HELLO is done.
    @ivar peerHello: the peer's L{Hello}, once received.
    @ivar originator: whether this side opened the connection.
    @ivar tlsActive: whether the connection runs inside TLS (the handshake
        is done).
    @ivar tlsDescription: the TLS version and cipher, once TLS is active.
    @ivar closeReason: the L{Refused} this side or the peer closed the
        connection with, if any.

    The protocol is the producer of its own transport's writes: when the
    peer does not read what this side writes and the transport's buffer
    fills, reading from the peer pauses until the buffer drains, so a peer
    cannot make the server buffer without bound.
    """

    log = Logger()

    def __init__(self, factory, originator=False):
        """
        @param factory: the L{PeerFactory} that holds settings, clock and
            counters.
        @param originator: whether this side opened the connection.
        """
        self.factory = factory
        self.settings = factory.settings
        self.clock = factory.clock
        self.originator = originator
        self.state = PeerState.AWAITING_HELLO
        self.version = None
        self.peerHello = None
        self.sendLimit = MINIMUM_MAX_RECORD
        self._decoder = FrameDecoder(self.settings.maxRecordSize, schemas=FAST_SCHEMAS)
        self._pending = {}
        self._tags = itertools.count(1)
        self._handshakeTimer = None
        self._keepaliveTimer = None
        self._pingOutstanding = False
        self._lastReceived = 0.0
        self._lastActivity = 0.0
        self._idleTimer = None
        self._closeTimer = None
        self._closeSent = False
        self.tlsActive = False
        self.tlsDescription = None
        self.closeReason = None
        self._upgradeAfterRead = None
        self._upgradeAsked = False
        self._upgradeStarted = False
        self._tlsHandshakeDone = False
        self._upgradeTag = 0
        self._announced = ()
        self._pausedFor = set()
        self._acks = []
        # Requests written while ACKs are gathered: sent after those ACKs.
        self._behindAcks = []
        self._reading = False
        self._ackCall = None
        self._requestTimer = None

    # -- life -------------------------------------------------------------

    def connectionMade(self):
        """
        Send the preamble and HELLO at once and start the handshake clock.
        """
        setNoDelay = getattr(self.transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            setNoDelay(True)
        self.transport.registerProducer(self, True)
        self.factory.connectionOpened(self)
        self._greet()
        self._restartHandshakeClock()

    # -- back-pressure -------------------------------------------------------

    def pauseReading(self, reason):
        """
        Stop reading from the peer for C{reason}; reading resumes once every
        reason is gone.
        """
        if not self._pausedFor and self.transport is not None:
            self.transport.pauseProducing()
            self.factory.count("reads-paused")
        self._pausedFor.add(reason)

    def resumeReading(self, reason):
        """
        C{reason} to pause reading is gone.
        """
        if reason not in self._pausedFor:
            return
        self._pausedFor.discard(reason)
        if not self._pausedFor and self.state is not PeerState.CLOSED:
            self.transport.resumeProducing()

    def pauseProducing(self):
        """
        The transport's write buffer is full: stop reading until it drains.
        """
        self.pauseReading("writes")

    def resumeProducing(self):
        """
        The transport's write buffer drained.
        """
        self.resumeReading("writes")

    def stopProducing(self):
        """
        The transport is going away; nothing to stop.
        """

    def _greet(self):
        """
        Write the preamble and HELLO: on connect, and again inside TLS.
        """
        hello = self.helloRecord()
        self._announced = hello.capabilities
        self.transport.write(PREAMBLE + encodeRecord(hello))

    def helloRecord(self):
        """
        @return: the L{Hello} this side sends; subclasses add to it.
        """
        return Hello(
            versionMin=VERSION_MIN,
            versionMax=VERSION_MAX,
            capabilities=self.factory.capabilities + self._tlsCapabilities(),
            maxRecord=self.settings.maxRecordSize,
            software=self.settings.software,
        )

    def _tlsCapabilities(self):
        """
        @return: C{("starttls",)} before TLS when this side would use it,
            C{("tls-cert-auth",)} inside TLS, or nothing without TLS.
        """
        tls = self.factory.tls
        if tls is None:
            return ()
        if self.tlsActive or self._upgradeStarted:
            return ("tls-cert-auth",)
        if self.originator:
            return ("starttls",) if self.tlsMode() != "off" else ()
        return ("starttls",) if tls.offers() else ()

    def tlsMode(self):
        """
        @return: the TLS mode of this connection as a whole (C{"off"},
            C{"offered"} or C{"required"}); see L{imxd.tls.TLSPolicy}.
        """
        return self.factory.tls.connectionMode()

    def tlsServerName(self):
        """
        @return: the peer domain to send as SNI and check the peer's
            certificate against, on a connection this side opened.
        """
        return None

    def tlsClientDomain(self):
        """
        @return: the hosted domain whose certificate this side presents as
            a client certificate, or L{None}.
        """
        return None

    def bothOffer(self, capability):
        """
        @return: whether both sides announced C{capability} in their HELLO.
        """
        if self.peerHello is None or capability not in self.peerHello.capabilities:
            return False
        return capability in self._announced

    def connectionLost(self, reason=connectionDone):
        """
        Stop every timer and fail every request still waiting for an
        answer.
        """
        if self._upgradeStarted and not self.tlsActive and self.closeReason is None:
            self.closeReason = Refused(
                ErrorCode.TLS_FAILED, f"TLS handshake failed: {_failureText(reason)}"
            )
            self.factory.count("tls-failures")
            self.log.info(
                "TLS with peer {peer} failed: {reason}",
                peer=self._peerName(),
                reason=self.closeReason.text,
            )
        self.state = PeerState.CLOSED
        self._stopTimers()
        if self._closeTimer is not None and self._closeTimer.active():
            self._closeTimer.cancel()
        reason = self.lostFailure(reason)
        pending, self._pending = self._pending, {}
        if self._requestTimer is not None and self._requestTimer.active():
            self._requestTimer.cancel()
        for waiting, _sentAt, _record in pending.values():
            waiting.errback(reason)
        self.factory.connectionClosed(self)

    def lostFailure(self, reason):
        """
        What requests still waiting on a lost connection fail with: the
        loss itself, or, when the connection was refused with an ERROR
        (here or by the peer), a temporary refusal that quotes it: the
        request may well succeed on another connection.
        """
        if self.closeReason is None:
            return reason
        return Failure(
            Refused(ErrorCode.TEMPORARY_FAILURE, f"the connection closed: {self.closeReason}")
        )

    def _startTimers(self):
        """
        The connection is open: stop the handshake clock, start the
        keepalive and idle clocks.
        """
        self._stopTimers()
        self._touchKeepalive()
        self._touchIdle()
        self._keepaliveTimer = self.clock.callLater(
            self.settings.keepaliveInterval, self._keepaliveDue
        )
        if self.settings.idleTimeout:
            self._idleTimer = self.clock.callLater(self.settings.idleTimeout, self._idleDue)

    def _stopTimers(self):
        """
        Stop the handshake, keepalive and idle clocks.
        """
        for timer in (self._handshakeTimer, self._keepaliveTimer, self._idleTimer):
            if timer is not None and timer.active():
                timer.cancel()
        self._handshakeTimer = self._keepaliveTimer = self._idleTimer = None

    # -- receiving ----------------------------------------------------------

    def dataReceived(self, data):
        """
        Decode and dispatch every complete record, then send one ACK for
        every request accepted while doing so.
        """
        self._reading = True
        try:
            self._readRecords(data)
        finally:
            self._reading = False
        self._flushAcks()

    def _readRecords(self, data):
        """
        Decode and dispatch every complete record; refuse bad input.
        """
        if self.state is PeerState.CLOSED:
            return
        self._touchKeepalive()
        try:
            frames = self._decoder.feed(data)
        except WireError as e:
            self._refuse(e.code, str(e), e.tag)
            return
        for index, record in enumerate(frames):
            if self.state is PeerState.CLOSED:
                return
            if type(record) is Frame:
                # Not decoded as it was framed (no accelerator, or not a
                # plain valid record): the Python codec decides.
                try:
                    record = decodeRecord(record)
                except WireError as e:
                    if e.fatal:
                        self._refuse(e.code, str(e), e.tag)
                        return
                    self.factory.count("records-refused")
                    self.sendRecord(Error(tag=e.tag, code=e.code, text=str(e)))
                    continue
            self._dispatch(record)
            if self._upgradeAfterRead is not None:
                trailing = len(frames) - index - 1 or self._decoder.buffered()
                self._startTLS(trailing)
                return

    def _dispatch(self, record):
        """
        Hand a record to the handler that the current state's table names.
        """
        table = self.stateTables[self.state]
        handler = table.get(type(record), table[None])
        handler(self, record)

    def _handleHello(self, hello):
        """
        Negotiate the version; refuse a peer with no common version.
        """
        version = negotiateVersion(
            (VERSION_MIN, VERSION_MAX), (hello.versionMin, hello.versionMax)
        )
        if version is None:
            self._refuse(
                ErrorCode.VERSION_UNSUPPORTED,
                f"this server speaks IMX versions {VERSION_MIN} to "
                f"{VERSION_MAX}; the peer offers {hello.versionMin} to "
                f"{hello.versionMax}",
            )
            return
        if hello.maxRecord < MINIMUM_MAX_RECORD:
            self._refuse(
                ErrorCode.MALFORMED,
                f"HELLO announces a maximum record of {hello.maxRecord} bytes; "
                f"at least {MINIMUM_MAX_RECORD} is required",
            )
            return
        self.version = version
        self.peerHello = hello
        self.sendLimit = hello.maxRecord
        self.state = PeerState.OPEN
        self._startTimers()
        self.factory.count("handshakes")
        if self.factory.tls is not None and not self.tlsActive:
            peerOffers = "starttls" in hello.capabilities
            mode = self.tlsMode()
            if self.originator and peerOffers and mode != "off":
                self._askStartTLS()
                return
            if mode == "required" and not peerOffers:
                self._refuse(
                    ErrorCode.TLS_REQUIRED,
                    "this server requires TLS on this connection, and the peer "
                    "does not offer STARTTLS",
                )
                return
        self.helloDone()

    def helloDone(self):
        """
        Called once the HELLO exchange has succeeded.  Subclasses and later
        layers (dial-back, TLS) start from here.
        """

    # -- STARTTLS (section 11) ----------------------------------------------

    def _askStartTLS(self):
        """
        Originator: ask for the upgrade.  Nothing else is sent until the
        answer; the handshake clock covers TLS and the second HELLO.
        """
        self._restartHandshakeClock()
        self.state = PeerState.UPGRADING
        self.request(StartTLS()).addCallbacks(self._proceed, self._startTLSRefused)

    def _proceed(self, answer):
        """
        Originator: the peer agreed; TLS starts once the current input is
        processed (and only if nothing follows the PROCEED in plaintext).
        """
        name = self.tlsServerName()
        self._upgradeAfterRead = self.factory.tls.store.clientConnections(
            name, self.tlsClientDomain()
        )

    def _startTLSRefused(self, failure):
        """
        Originator: the peer could not start TLS (ERROR), or the
        connection went.  Refuse the connection if TLS is required, else
        go on in plaintext.
        """
        if self.state is PeerState.CLOSED or not failure.check(RemoteError):
            return
        if self.tlsMode() == "required":
            self._refuse(
                ErrorCode.TLS_REQUIRED,
                f"this server requires TLS, and the peer could not start it: "
                f"{failure.value.text or failure.value.token}",
            )
            return
        self.log.info(
            "peer {peer} could not start TLS ({why}); going on without",
            peer=self._peerName(),
            why=failure.value.text,
        )
        self.state = PeerState.OPEN
        self._startTimers()
        self.helloDone()

    def _handleStartTLS(self, record):
        """
        Receiver: agree to the upgrade when this side offered it and the
        connection carries nothing yet; TLS starts once the current input
        is processed (and only if nothing follows STARTTLS in it).
        """
        refusal = self.upgradeRefusal()
        if refusal is not None:
            self._refuse(ErrorCode.BAD_SEQUENCE, refusal, record.tag)
            return
        self._upgradeAsked = True
        tls = self.factory.tls
        domain = self.peerHello.toDomain
        connections = None
        if tls is None or not tls.offers():
            why = "TLS is not offered here"
        else:
            why = f"no certificate for {domain} here"
            connections = tls.store.serverConnections(_canonicalOrNone(domain))
            if connections is None:
                self.factory.count("tls-failures")
        if connections is None:
            self.sendRecord(Error(tag=record.tag, code=ErrorCode.TLS_FAILED, text=why))
            return
        self._restartHandshakeClock()
        self.state = PeerState.UPGRADING
        self._upgradeTag = record.tag
        self._upgradeAfterRead = connections

    def upgradeRefusal(self):
        """
        @return: why STARTTLS may not be taken now, or L{None}.
        """
        if self.originator:
            return "STARTTLS is sent only by the side that opened the connection"
        if self.tlsActive or self._upgradeStarted:
            return "STARTTLS inside TLS"
        if self._upgradeAsked:
            return "a second STARTTLS"
        if self._pending:
            return "STARTTLS while requests are outstanding"
        return None

    def _startTLS(self, trailing):
        """
        The current input is processed: start TLS, unless octets followed
        the STARTTLS (receiver) or the PROCEED (originator) in plaintext,
        which are never taken as records (section 11.1).
        """
        connections, self._upgradeAfterRead = self._upgradeAfterRead, None
        if trailing:
            self.factory.count("tls-injections-refused")
            self._refuse(
                ErrorCode.BAD_SEQUENCE,
                "plaintext after "
                + ("STARTTLS_PROCEED" if self.originator else "STARTTLS")
                + "; nothing may follow it before the TLS handshake",
            )
            return
        if not self.originator:
            self.beforeUpgrade()
            self.transport.write(encodeRecord(StartTLSProceed(tag=self._upgradeTag)))
        self._upgradeStarted = True
        self.transport.startTLS(connections)

    def beforeUpgrade(self):
        """
        Receiver: write what is owed in plaintext (e.g. gathered ACKs)
        before STARTTLS_PROCEED, the last plaintext record.
        """

    def inTLSHandshake(self):
        """
        @return: whether TLS has started and its handshake is not done:
            nothing can be written that the peer would read as IMX.
        """
        return self._upgradeStarted and not self._tlsHandshakeDone

    def handshakeCompleted(self):
        """
        The TLS handshake is done: check the peer's certificate (on a
        connection this side opened), then start again inside TLS with the
        preamble and HELLO.
        """
        self._tlsHandshakeDone = True
        if self.state is PeerState.CLOSED:
            return
        handle = self.transport.getHandle()
        name = self.tlsServerName()
        if name is not None and self.factory.tls.verifies(name):
            problem = self.factory.tls.store.peerProblem(handle, name)
            if problem is not None:
                self.factory.count("tls-failures")
                # Inside TLS the connection starts again with the preamble.
                self.transport.write(PREAMBLE)
                self._refuse(ErrorCode.TLS_FAILED, f"certificate of {name}: {problem}")
                return
        self.tlsActive = True
        self.tlsDescription = describe(handle)
        self.factory.count("tls-upgrades")
        self.log.info(
            "TLS with peer {peer} ({tls})", peer=self._peerName(), tls=self.tlsDescription
        )
        self.state = PeerState.AWAITING_HELLO
        self.peerHello = None
        self._decoder = FrameDecoder(self.settings.maxRecordSize, schemas=FAST_SCHEMAS)
        self._greet()

    def _restartHandshakeClock(self):
        """
        The upgrade begins: only the handshake clock runs, covering TLS and
        the second HELLO.
        """
        self._stopTimers()
        self._handshakeTimer = self.clock.callLater(
            self.settings.handshakeTimeout, self._handshakeTimedOut
        )

    def _handlePing(self, ping):
        """
        Answer a PING with a PONG carrying its tag.
        """
        self.sendRecord(Pong(tag=ping.tag))

    def _handleResponse(self, response):
        """
        Complete the request whose tag the response carries.
        """
        entry = self._pending.pop(response.tag, None)
        if entry is None:
            self.factory.count("unmatched-responses")
            return
        deferred = entry[0]
        if isinstance(response, Error):
            deferred.errback(RemoteError(response))
        else:
            deferred.callback(response)

    def _handleAck(self, ack):
        """
        Complete every request that an ACK (or a link's DELIVERED) lists.
        """
        pending = self._pending
        for tag in ack.tags:
            entry = pending.pop(tag, None)
            if entry is None:
                self.factory.count("unmatched-responses")
            else:
                entry[0].callback(ack)

    def _handleError(self, error):
        """
        An ERROR answers a request (tag) or refuses the connection (tag 0).
        """
        if error.tag:
            self._handleResponse(error)
            return
        self.log.warn(
            "peer {peer} reports error {code}: {text}",
            peer=self._peerName(),
            code=error.code,
            text=error.text,
        )
        if error.fromDomain is None and error.toDomain is None:
            # An ERROR about one domain pair does not end the connection.
            self.closeReason = RemoteError(error)
        self.factory.count("errors-received")

    def _handleClose(self, close):
        """
        The peer is closing in order: answer with CLOSE and disconnect; a
        peer that then does not read is dropped after L{CLOSE_GRACE}.
        """
        if not self._closeSent:
            self._writeClose(Close())
        self.state = PeerState.CLOSED
        self._stopTimers()
        self.transport.loseConnection()
        self._abortLater()

    def _handleUnexpected(self, record):
        """
        A record that this state does not take: before HELLO nothing but
        HELLO is allowed, and while STARTTLS awaits its answer nothing but
        that answer.
        """
        when = "during the TLS upgrade" if self.state is PeerState.UPGRADING else "before HELLO"
        self._refuse(
            ErrorCode.BAD_SEQUENCE,
            f"{type(record).__name__} {when}",
            record.tag,
        )

    def _handleSecondHello(self, hello):
        """
        HELLO is sent once per direction (until a TLS upgrade).
        """
        self._refuse(ErrorCode.BAD_SEQUENCE, "HELLO sent twice")

    def _handleOther(self, record):
        """
        Records without a handler of their own: unknown types are ignored
        (counted) unless tagged as requests or flagged must-understand;
        known types that this connection does not serve are refused.
        """
        if record.response:
            self._handleResponse(record)
            return
        if isinstance(record, UnknownRecord):
            if record.mustUnderstand:
                code, why = ErrorCode.MUST_UNDERSTAND, "understood"
            elif record.isRequest:
                code, why = ErrorCode.UNSUPPORTED, "supported"
            else:
                self.factory.count("unknown-records-ignored")
                return
            self.factory.count("unknown-records-refused")
            self.sendRecord(
                Error(
                    tag=record.tag,
                    code=code,
                    text=f"record type 0x{record.type:04x} is not {why}",
                )
            )
            return
        self.refuseRecord(record)

    def refuseRecord(self, record):
        """
        Refuse a known record that this connection does not (yet) serve.
        Data before authentication is refused as not authenticated; other
        records as unsupported.  Untagged records are refused with tag 0.
        """
        if self.state is PeerState.CLOSING:
            code, text = ErrorCode.SHUTTING_DOWN, "this connection is closing"
        elif record.TYPE in DATA_TYPES:
            code = ErrorCode.NOT_AUTHENTICATED
            text = f"{type(record).__name__} before the domain pair is authenticated"
        else:
            code = ErrorCode.UNSUPPORTED
            text = f"{type(record).__name__} is not served on this connection"
        self.factory.count("records-refused")
        self.sendRecord(Error(tag=record.tag, code=code, text=text))

    # -- answering -------------------------------------------------------------

    def acknowledge(self, tag):
        """
        Accept a request: its tag joins the next ACK, sent when the current
        input has been processed, or, for requests accepted later (after a
        commit, say), at the end of the reactor's current turn, so that
        requests accepted together share one ACK.
        """
        self._acks.append(tag)
        self._flushSoon()

    def _flushSoon(self):
        """
        Have L{_flushAcks} send what was gathered once the current input
        has been processed, or at the end of the reactor's current turn.
        """
        if not self._reading and self._ackCall is None:
            self._ackCall = self.clock.callLater(0, self._flushAcks)

    def _flushAcks(self):
        """
        Send the ACKs gathered, at most L{ACK_BATCH} tags per record.
        """
        if self._ackCall is not None:
            if self._ackCall.active():
                self._ackCall.cancel()
            self._ackCall = None
        acks, self._acks = self._acks, []
        behind, self._behindAcks = self._behindAcks, []
        if self.state is PeerState.CLOSED or not acks:
            return
        for start in range(0, len(acks), ACK_BATCH):
            self.sendRecord(Ack(tags=tuple(acks[start : start + ACK_BATCH])))
        for data in behind:
            self.transport.write(data)

    def answer(self, result, request):
        """
        Answer C{request} when C{result} fires: with ACK for L{None}, with a
        response record, or with the ERROR of a refusal.

        @param result: a L{Deferred} of the outcome.
        @param request: the request record (its tag and, should it fail
            unexpectedly, its type name for the log).
        """
        result.addCallbacks(
            self.answerAccepted,
            self.answerRefusal,
            callbackArgs=(request.tag,),
            errbackArgs=(request.tag, type(request)),
        )

    def answerRefusal(self, failure, tag, requestType):
        """
        Answer a request that failed with its ERROR (an unexpected failure
        is logged and answered C{internal-error}).
        """
        if failure.check(Refused):
            refusal = failure.value
        else:
            what = f"{requestType.__name__} {tag}"
            self.log.failure("{what} failed", failure, what=what)
            refusal = Refused(ErrorCode.INTERNAL_ERROR, f"{what} failed")
        self.factory.count("requests-refused")
        if self.state is not PeerState.CLOSED:
            self.sendRecord(refusal.toError(tag))

    def answerAccepted(self, response, tag, requestType=None):
        """
        A request was accepted: ACK it, or send its response record
        (C{requestType} is there so that both answers take the same
        arguments).
        """
        if response is None:
            self.acknowledge(tag)
        elif self.state is not PeerState.CLOSED:
            self.sendRecord(attrs.evolve(response, tag=tag, response=True))

    # -- sending ------------------------------------------------------------

    def sendRecord(self, record, tag=None):
        """
        Write one record.

        @param tag: the tag to send it with, or L{None} for its own.
        @raise EncodeError: the record is invalid or larger than the peer
            accepts.
        """
        data = encodeRecord(record, tag)
        if len(data) - 12 > self.sendLimit:
            raise EncodeError(
                f"{type(record).__name__} of {len(data) - 12} bytes exceeds the "
                f"peer's limit of {self.sendLimit}"
            )
        if self._acks and not record.response and (record.tag if tag is None else tag):
            # A request never overtakes the ACKs gathered before it (a
            # REPORT must not arrive before the ACK of its MESSAGE).
            self._behindAcks.append(data)
        else:
            self.transport.write(data)

    def request(self, record):
        """
        Send a request with a fresh tag.  Cancelling the L{Deferred}
        forgets the request: an answer that comes later is ignored (and
        counted as unmatched).

        @param record: a L{Record} whose tag is 0; it is sent with a new tag.
        @return: a L{Deferred} that fires with the response record (or the
            L{Ack}), or fails with L{RemoteError} for an ERROR or with the
            reason the connection was lost.
        """
        tag = self._nextTag()
        deferred = defer.Deferred(lambda cancelled: self._pending.pop(tag, None))
        self._sendRequest(tag, deferred, record)
        return deferred

    def requestThen(self, record, onAnswer, onFailure, args=()):
        """
        Send a request with a fresh tag, and call C{onAnswer(answer, *args)}
        or C{onFailure(failure, *args)} when its outcome is known, as
        L{request}'s L{Deferred} would fire, without making one (the
        per-message path; L{imxd.callbacks}).

        @param args: a tuple.
        @raise EncodeError: the record cannot be sent; neither is called.
        """
        self._sendRequest(self._nextTag(), Callbacks(onAnswer, onFailure, args), record)

    def _sendRequest(self, tag, waiting, record):
        """
        Remember who waits for C{tag}'s answer, send the request, and make
        sure it times out.
        """
        # Known before it is written: a synchronous transport may answer at once.
        self._pending[tag] = (waiting, self.clock.seconds(), record)
        try:
            self.sendRecord(record, tag)
        except EncodeError:
            del self._pending[tag]
            raise
        if self._requestTimer is None and self.settings.requestTimeout:
            self._requestTimer = self.clock.callLater(
                self.settings.requestTimeout, self._expireRequests
            )

    def _expireRequests(self):
        """
        Fail the requests that have waited longer than the request timeout
        (the oldest come first), and look again when the next would.
        """
        self._requestTimer = None
        timeout = self.settings.requestTimeout
        now = self.clock.seconds()
        expired = []
        for tag, (_waiting, sentAt, _record) in self._pending.items():
            if sentAt + timeout > now:
                break
            expired.append(tag)
        for tag in expired:
            deferred, _sentAt, record = self._pending.pop(tag)
            self.factory.count("requests-timed-out")
            deferred.errback(
                Refused(
                    ErrorCode.TEMPORARY_FAILURE,
                    f"no answer to {RecordType(record.TYPE).name} from "
                    f"{self._peerName()} within {timeout:g} s",
                )
            )
        if self._pending and self.state is not PeerState.CLOSED:
            oldest = next(iter(self._pending.values()))[1]
            self._requestTimer = self.clock.callLater(
                max(0.0, oldest + timeout - now), self._expireRequests
            )

    def pendingRequests(self):
        """
        @return: how many requests on this connection await an answer.
        """
        return len(self._pending)

    def _nextTag(self):
        """
        @return: a non-zero u32 tag not in use by a pending request.
        """
        while True:
            tag = next(self._tags) & 0xFFFFFFFF
            if tag and tag not in self._pending:
                return tag
            if tag == 0:
                self._tags = itertools.count(1)

    def close(self, text=None):
        """
        Begin an orderly close: send CLOSE, then wait for the peer's CLOSE
        (at most L{CLOSE_GRACE} seconds) before disconnecting.
        """
        if self.state in (PeerState.CLOSING, PeerState.CLOSED):
            return
        if self.state is PeerState.UPGRADING:
            # Mid-upgrade a CLOSE has no framing the peer would read.
            self.state = PeerState.CLOSED
            self.transport.abortConnection()
            return
        self.state = PeerState.CLOSING
        # No keepalive or idle close after CLOSE: no new requests (§9).
        self._stopTimers()
        self._writeClose(Close(text=text))
        self._abortLater()

    def _writeClose(self, close):
        """
        Write CLOSE once, after the ACKs gathered and the requests held
        behind them: nothing is sent after CLOSE.
        """
        self._flushAcks()
        self._closeSent = True
        self.sendRecord(close)

    def noteActivity(self):
        """
        Data went in or out: restart the idle clock.  Keepalive traffic does
        not call this.
        """
        self._touchIdle()

    # -- refusing -------------------------------------------------------------

    def _refuse(self, code, text, tag=0):
        """
        Send ERROR and close: the connection cannot go on.
        """
        if self.state is PeerState.CLOSED:
            return
        self.log.info(
            "refusing peer {peer}: {code} {token}: {text}",
            peer=self._peerName(),
            code=int(code),
            token=ErrorCode(code).token,
            text=text,
        )
        self.factory.count("connections-refused")
        self.closeReason = Refused(code, text)
        self.state = PeerState.CLOSED
        if self.inTLSHandshake():
            # Nothing written now would reach the peer as IMX.
            self.transport.abortConnection()
            return
        self._stopTimers()
        self.transport.write(encodeRecord(Error(tag=tag, code=code, text=errorText(text))))
        self.transport.loseConnection()
        self._abortLater()

    def _abortLater(self):
        """
        Drop the connection if it is not closed within L{CLOSE_GRACE}.
        """
        if self._closeTimer is None:
            self._closeTimer = self.clock.callLater(CLOSE_GRACE, self._abort)

    def _abort(self):
        """
        The peer did not finish closing in time: drop the connection.
        """
        self._closeTimer = None
        self.transport.abortConnection()

    # -- timers -----------------------------------------------------------------

    def _handshakeTimedOut(self):
        """
        HELLO did not complete within the handshake timeout.
        """
        self._handshakeTimer = None
        self._refuse(
            ErrorCode.TIMEOUT,
            f"handshake not finished within {self.settings.handshakeTimeout:g} s",
        )

    def _touchKeepalive(self):
        """
        Bytes arrived: the peer is alive.  Only a time stamp is taken here
        (this runs on every read); the keepalive timer looks at it when it
        fires.
        """
        self._lastReceived = self.clock.seconds()
        self._pingOutstanding = False

    def _laterThan(self, since, interval, callback):
        """
        If C{interval} seconds have not yet passed since C{since}, schedule
        C{callback} for when they will have.

        @return: the new L{IDelayedCall}, or L{None} if the time is up.
        """
        remaining = since + interval - self.clock.seconds()
        if remaining > 0:
            return self.clock.callLater(remaining, callback)
        return None

    def _keepaliveDue(self):
        """
        Check for silence: PING after a whole silent interval, or give up if
        a PING already went unanswered for one.
        """
        interval = self.settings.keepaliveInterval
        self._keepaliveTimer = self._laterThan(
            self._lastReceived, interval, self._keepaliveDue
        )
        if self._keepaliveTimer is not None:
            return
        if self._pingOutstanding:
            self._refuse(
                ErrorCode.TIMEOUT, f"no answer to PING within {interval:g} s"
            )
            return
        self._pingOutstanding = True
        self.request(Ping()).addErrback(lambda failure: None)
        self._keepaliveTimer = self.clock.callLater(interval, self._keepaliveDue)

    def _touchIdle(self):
        """
        Data went in or out: restart the idle clock (a time stamp; the idle
        timer looks at it when it fires).
        """
        self._lastActivity = self.clock.seconds()

    def _idleDue(self):
        """
        No Data for the idle timeout: close in order.
        """
        self._idleTimer = self._laterThan(
            self._lastActivity, self.settings.idleTimeout, self._idleDue
        )
        if self._idleTimer is not None:
            return
        self.factory.count("idle-closes")
        self.close("idle")

    def peerHost(self):
        """
        @return: the peer's IP address (or other address) as text, what
            the limits per source address count by.
        """
        try:
            address = self.transport.getPeer()
        except Exception:
            return "?"
        return getattr(address, "host", str(address))

    def _peerName(self):
        """
        @return: the peer's address for log lines.
        """
        try:
            address = self.transport.getPeer()
            return f"{address.host}:{address.port}"
        except Exception:
            return "?"


_OPEN_TABLE = {
    Hello: PeerProtocol._handleSecondHello,
    StartTLS: PeerProtocol._handleStartTLS,
    Ping: PeerProtocol._handlePing,
    Pong: PeerProtocol._handleResponse,
    Ack: PeerProtocol._handleAck,
    Error: PeerProtocol._handleError,
    Close: PeerProtocol._handleClose,
    None: PeerProtocol._handleOther,
}

#: The state machine: for each state, the handler of each record class
#: (C{None}: any other record).
_STATE_TABLES = {
    PeerState.AWAITING_HELLO: {
        Hello: PeerProtocol._handleHello,
        Error: PeerProtocol._handleError,
        Close: PeerProtocol._handleClose,
        None: PeerProtocol._handleUnexpected,
    },
    PeerState.OPEN: _OPEN_TABLE,
    PeerState.UPGRADING: {
        StartTLSProceed: PeerProtocol._handleResponse,
        Error: PeerProtocol._handleError,
        Close: PeerProtocol._handleClose,
        None: PeerProtocol._handleUnexpected,
    },
    PeerState.CLOSING: _OPEN_TABLE,
    PeerState.CLOSED: {None: lambda self, record: None},
}


PeerProtocol.stateTables = _STATE_TABLES


def servingTables(handlers):
    """
    The peer protocol's state tables with more records served when OPEN,
    for a subclass's C{stateTables}.

    @param handlers: C{{record class: handler}} added to the OPEN table.
    @return: the new tables.
    """
    tables = dict(_STATE_TABLES)
    tables[PeerState.OPEN] = {**_STATE_TABLES[PeerState.OPEN], **handlers}
    return tables


class PeerFactory(Factory):
    """
    Builds L{PeerProtocol}s and keeps what they share: settings, clock,
    capabilities and counters.

    @ivar counters: event counts by name (records refused, unknown records
        ignored, handshakes, ...), for status and metrics.
    @ivar connections: the live connections.
    """

    protocol = PeerProtocol
    noisy = False

    def __init__(self, clock, settings, originator=False, capabilities=(), tls=None):
        """
        @param clock: an L{IReactorTime} provider.
        @param settings: a L{PeerSettings}.
        @param originator: whether the connections built are outbound.
        @param capabilities: capability names announced in HELLO.
        @param tls: the L{imxd.tls.TLSPolicy}, or L{None} for no TLS.
        """
        self.clock = clock
        self.tls = tls
        self.settings = settings
        self.originator = originator
        self.capabilities = tuple(capabilities)
        self.counters = collections.Counter()
        self.connections = set()

    def buildProtocol(self, addr):
        """
        Make the protocol for one connection.
        """
        protocol = self.protocol(self, originator=self.originator)
        return protocol

    def count(self, name, amount=1):
        """
        Add to a named counter.
        """
        self.counters[name] += amount

    def connectionOpened(self, protocol):
        """
        Note a new live connection.
        """
        self.connections.add(protocol)
        self.count("connections-opened")

    def connectionClosed(self, protocol):
        """
        Note that a connection has gone.
        """
        self.connections.discard(protocol)
