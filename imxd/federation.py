"""
Federation: every peer connection of one imxd process and the domain pairs
they carry (C{docs/protocol.md} sections 10 and 14).

L{FederationProtocol} is one connection.  On top of the peer protocol it
keeps which domain pairs are authenticated on it, runs both halves of
dial-back (the receiver's, which dials the claimed origin through this
server's own discovery, and the originator's), hands Data for authenticated
pairs to the router and acknowledges it, and follows or sends REDIRECT.

L{Federation} is the factory all of them share: hosted domains, dial-back
tokens and secrets, the outbound pool, the router, connection limits and
draining.
"""

import secrets as _random

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from imxd.address import AddressError, normaliseDomain
from imxd.dialback import DialbackError
from imxd.peer import PeerFactory, PeerProtocol, PeerState, Refused, RemoteError, servingTables
from imxd.pool import OutboundPool
from imxd.router import Router, dataPair
from imxd.config import QueueConfig
from imxd.outbox import Outbox
from imxd.ratelimit import RateLimiter
from imxd.store import Database, OutboundStore, SeenStore
from imxd.waiters import Waiters
from imxd.wire import (
    DATA_TYPES,
    DialbackKey,
    DialbackResult,
    DialbackSecret,
    PREAMBLE,
    DialbackVerify,
    Error,
    ErrorCode,
    Redirect,
)
from imxd.wire.records import RECORD_CLASSES

#: Capabilities imxd announces on peer connections.
CAPABILITIES = ("dialback", "redirect")

#: Seconds a draining server leaves a connection after sending REDIRECT,
#: for requests in progress to finish, before it closes in order.
DRAIN_GRACE = 10.0


def _pairFields(record):
    """
    @return: the canonical C{(FROM_DOMAIN, TO_DOMAIN)} of a dial-back record.
    @raise Refused: C{dialback-failed} if either is not a valid domain.
    """
    try:
        return normaliseDomain(record.fromDomain), normaliseDomain(record.toDomain)
    except AddressError as e:
        raise Refused(ErrorCode.DIALBACK_FAILED, f"not a domain: {e}") from None


def _pairError(code, text, pair, tag=0):
    """
    @return: an ERROR about a domain pair, naming it.
    """
    return attrs.evolve(
        Refused(code, text).toError(tag), fromDomain=pair[0], toDomain=pair[1]
    )


class FederationProtocol(PeerProtocol):
    """
    One IMX connection between this server and a peer server.

    @ivar connectionId: a random 64-bit number naming the connection in
        dial-back tokens.
    @ivar dialledDomains: for a connection this side opened, the remote
        domains it was dialled for (trusted by 6.3 item 1).
    @ivar receivablePairs: C{(origin, receiving)} pairs the peer has
        authenticated on this connection: it may send Data for them.
    @ivar redirectSent: this side sent REDIRECT (draining): new requests
        are refused with C{shutting-down}.
    @ivar localDomain: for an outbound connection, the hosted domain whose
        certificate is presented as a client certificate, or L{None}.
    """

    def __init__(
        self, factory, originator=False, dialledDomain=None, trusted=True, localDomain=None
    ):
        """
        @param factory: the L{Federation}.
        @param originator: whether this side opened the connection.
        @param dialledDomain: the remote domain dialled, for an outbound
            connection.
        @param trusted: for an outbound connection, whether its address came
            from this server's own discovery (6.3 item 1), not from a
            REDIRECT.
        @param localDomain: for an outbound connection, the hosted domain it
            is opened for first (its certificate is the client certificate).
        """
        super().__init__(factory, originator)
        self.federation = factory
        self.connectionId = factory.newConnectionId()
        self.dialledDomains = set() if dialledDomain is None else {dialledDomain}
        self.trusted = originator and trusted
        self.receivablePairs = set()
        self.redirectSent = False
        self.localDomain = localDomain
        self._certified = {}
        self._dialbackSeen = False
        self._firstToDomain = None
        self._sendablePairs = {}
        self._awaitingSecret = {}
        self._verifying = 0
        self._retired = False
        self._drainTimer = None
        self._open = Waiters()

    # -- life ---------------------------------------------------------------

    def helloRecord(self):
        """
        HELLO, naming the dialled domain on an outbound connection.
        """
        hello = super().helloRecord()
        if self.originator and self.dialledDomains:
            return attrs.evolve(hello, toDomain=min(self.dialledDomains))
        return hello

    def connectionMade(self):
        """
        Send the preamble and HELLO; refuse an inbound connection over the
        limits (counted per source address and in total, never per claimed
        domain) or arriving while the server drains.
        """
        self.federation.registerConnection(self)
        if not self.originator:
            refusal = self.federation.admissionRefusal(self)
            if refusal is not None:
                # Refused before HELLO, so that the peer sees a failed
                # connection (and tries its next target), not an open one.
                self.factory.connectionOpened(self)
                self.factory.count("connections-over-limit")
                self.transport.write(PREAMBLE)
                self._refuse(refusal.code, refusal.text)
                return
        super().connectionMade()

    # -- TLS ------------------------------------------------------------------

    def tlsMode(self):
        """
        The connection's TLS mode: for one this side opened, the setting for
        the domain dialled; for one a peer opened, the hosted domains'.
        """
        if self.originator and self.dialledDomains:
            return self.factory.tls.connectionMode(min(self.dialledDomains), self.localDomain)
        return self.factory.tls.connectionMode()

    def tlsServerName(self):
        """
        On a connection this side opened, the peer's certificate must be
        valid for the domain dialled (not the SRV target's host name).
        """
        if self.originator and self.dialledDomains:
            return min(self.dialledDomains)
        return None

    def tlsClientDomain(self):
        """
        The client certificate presented is the one of the hosted domain the
        connection was opened for.
        """
        return self.localDomain

    def upgradeRefusal(self):
        """
        STARTTLS is refused once a domain pair is authenticated or pending
        here: nothing authenticated in plaintext may carry into TLS.
        """
        refusal = super().upgradeRefusal()
        if refusal is None and self._dialbackSeen:
            refusal = "STARTTLS after dial-back has begun on this connection"
        return refusal

    def beforeUpgrade(self):
        """
        ACKs gathered from the same input go out before STARTTLS_PROCEED.
        """
        self._flushAcks()

    def pairTLSRefusal(self, hosted, remote):
        """
        @return: a L{Refused} (C{tls-required}) when traffic between
            C{hosted} and C{remote} needs TLS and this connection is
            plaintext, else L{None}.
        """
        tls = self.factory.tls
        if self.tlsActive or tls is None or tls.pairMode(hosted, remote) != "required":
            return None
        return Refused(
            ErrorCode.TLS_REQUIRED,
            f"{hosted} requires TLS with {remote}, and this connection is not encrypted",
        )

    def certifiedFor(self, origin):
        """
        Whether the peer's client certificate authenticates C{origin}
        (section 11.3): TLS is active, both sides announced
        C{tls-cert-auth}, certificates of C{origin} are checked, and the
        certificate is valid for it.  Each origin is judged once per
        connection; a failure is logged with its reason.
        """
        tls = self.factory.tls
        if not (self.tlsActive and self.bothOffer("tls-cert-auth")):
            return False
        if not tls.verifies(origin):
            return False
        if origin not in self._certified:
            problem = tls.store.peerProblem(self.transport.getHandle(), origin)
            self._certified[origin] = problem
            if problem is not None:
                self.log.info(
                    "client certificate of {peer} does not authenticate {origin}"
                    " ({problem}); dial-back instead",
                    peer=self._peerName(),
                    origin=origin,
                    problem=problem,
                )
        return self._certified[origin] is None

    def helloDone(self):
        """
        HELLO is done: refuse a peer that dialled a domain not hosted here,
        and release whoever waits for this connection to open.
        """
        toDomain = self.peerHello.toDomain
        if not self.originator and not self.tlsActive:
            self._firstToDomain = toDomain
        elif not self.originator and toDomain != self._firstToDomain:
            self._refuse(
                ErrorCode.BAD_SEQUENCE,
                f"HELLO inside TLS names {toDomain}, the first named {self._firstToDomain}",
            )
            return
        if toDomain is not None and not self.originator:
            if _canonical(toDomain) not in self.federation.hostedDomains():
                self._refuse(
                    ErrorCode.UNKNOWN_DOMAIN, f"{toDomain} is not hosted here"
                )
                return
        self._open.fire(self)

    def whenOpen(self):
        """
        @return: a L{Deferred} firing with this connection once HELLO is
            done, or failing if it closes first.
        """
        if self.state is PeerState.OPEN:
            return defer.succeed(self)
        return self._open.wait()

    def carriesNothing(self):
        """
        @return: whether nothing uses this connection: no pair of this
            side's, no request in flight, no pair authenticated by the peer.
        """
        return not (self._sendablePairs or self.pendingRequests() or self.receivablePairs)

    def usable(self):
        """
        @return: whether new requests may be sent on this connection.
        """
        return self.state is PeerState.OPEN and not self._retired

    def stopUsing(self):
        """
        Take this connection out of use for new requests (it was redirected
        or is draining); requests in progress finish.
        """
        self._retired = True

    def connectionLost(self, reason):
        """
        Fail every waiter and forget this connection's dial-back state.
        """
        for _, timer in self._awaitingSecret.values():
            if timer.active():
                timer.cancel()
        self._awaitingSecret.clear()
        if self._drainTimer is not None and self._drainTimer.active():
            self._drainTimer.cancel()
        super().connectionLost(reason)
        # Whoever waits to open the connection hears why it was refused;
        # whoever waits on a pair hears a temporary failure that says so.
        self._open.fire(reason if self.closeReason is None else Failure(self.closeReason))
        lost = self.lostFailure(reason)
        for waiters in self._sendablePairs.values():
            if isinstance(waiters, Waiters):
                waiters.fire(lost)
        self.federation.secrets.forgetConnection(self.connectionId)

    # -- Data ------------------------------------------------------------

    def _handleData(self, record):
        """
        Data from the peer: refuse it if this server drains, the recipient's
        domain is not hosted here (no relaying) or the pair is not
        authenticated on this connection; otherwise hand it to the router
        and acknowledge it once the backend has accepted it.
        """
        if record.response:
            self._handleResponse(record)
            return
        if self.redirectSent:
            self.refuseRecord(record)
            return
        try:
            origin, receiving = dataPair(record)
            if receiving not in self.federation.hostedDomains():
                raise Refused(
                    ErrorCode.RELAY_DENIED,
                    f"{receiving} is not hosted here; this server does not relay",
                )
            refusal = self.pairTLSRefusal(receiving, origin)
            if refusal is not None:
                raise refusal
            if not self._trusts(origin, receiving):
                raise Refused(
                    ErrorCode.NOT_AUTHENTICATED,
                    f"{origin} -> {receiving} is not authenticated on this connection",
                )
            retryAfter = self.federation.domainRate.take(origin)
            if retryAfter is not None:
                raise Refused(
                    ErrorCode.RATE_LIMITED,
                    f"{origin} sends more than {self.federation.domainRate.rate}"
                    " requests a second",
                    retryAfter=retryAfter,
                )
        except Refused as refusal:
            self.factory.count("data-refused")
            self.sendRecord(refusal.toError(record.tag))
            return
        self.noteActivity()
        self.factory.count("data-received")
        self.federation.router.deliverThen(
            record, origin, receiving, self.answerAccepted, self.answerRefusal, (record.tag, type(record))
        )

    def _trusts(self, origin, receiving):
        """
        Whether the peer may send Data for C{origin → receiving} here:
        authenticated by dial-back on this connection, or, on a connection
        this side opened, from a domain it dialled (6.3 item 1).
        """
        if (origin, receiving) in self.receivablePairs:
            return True
        return self.trusted and origin in self.dialledDomains

    # -- dial-back: the receiving server's side -------------------------------

    def _handleDialbackKey(self, key):
        """
        The peer claims a domain: check the claim by dialling that domain
        through this server's own discovery (section 10.1).
        """
        self._dialbackSeen = True
        try:
            if self.redirectSent:
                raise Refused(ErrorCode.SHUTTING_DOWN, "this server is draining")
            if self.originator:
                raise Refused(
                    ErrorCode.BAD_SEQUENCE,
                    "DIALBACK_KEY is taken only on connections the sender opened",
                )
            pair = _pairFields(key)
            origin, receiving = pair
            if receiving not in self.federation.hostedDomains():
                raise Refused(ErrorCode.UNKNOWN_DOMAIN, f"{receiving} is not hosted here")
            if origin in self.federation.hostedDomains():
                raise Refused(
                    ErrorCode.DIALBACK_FAILED, f"{origin} is hosted by this server"
                )
            refusal = self.pairTLSRefusal(receiving, origin)
            if refusal is not None:
                raise refusal
            if pair in self.receivablePairs:
                self.sendRecord(
                    DialbackResult(tag=key.tag, fromDomain=origin, toDomain=receiving)
                )
                return
            if pair in self._awaitingSecret:
                raise Refused(
                    ErrorCode.RESOURCE_LIMIT,
                    f"a dial-back for {origin} -> {receiving} is already pending",
                )
            refusal = self.federation.dialbackRefusal(self, pair)
            if refusal is not None:
                raise refusal
        except Refused as refusal:
            self.factory.count("dialbacks-refused")
            self.sendRecord(_pairError(refusal.code, refusal.text, _rawPair(key), key.tag))
            return
        if self.certifiedFor(origin):
            self.receivablePairs.add(pair)
            self.federation.count("pairs-certified")
            self.log.info(
                "{origin} -> {receiving} authenticated by certificate on the "
                "connection from {peer}",
                origin=origin,
                receiving=receiving,
                peer=self._peerName(),
            )
            self.sendRecord(DialbackResult(tag=key.tag, fromDomain=origin, toDomain=receiving))
            return
        federation = self.federation
        secret = federation.secrets.coin(self.connectionId, pair, self.clock.seconds())
        timer = self.clock.callLater(
            federation.dialbackTimeout, self._dialbackTimedOut, pair
        )
        self._awaitingSecret[pair] = (key.tag, timer)
        federation.count("dialbacks-started")
        asked = federation.askToVerify(origin, receiving, key.token, secret)
        asked.addErrback(self._dialbackFailed, pair)

    def awaitingSecret(self):
        """
        @return: how many dial-backs on this connection await their secret.
        """
        return len(self._awaitingSecret)

    def _finishDialback(self, pair):
        """
        Stop waiting for the secret of C{pair}.

        @return: the tag of its DIALBACK_KEY, or L{None} if it was not
            pending.
        """
        entry = self._awaitingSecret.pop(pair, None)
        if entry is None:
            return None
        tag, timer = entry
        if timer.active():
            timer.cancel()
        return tag

    def _failDialback(self, pair, code, text):
        """
        Answer a pending DIALBACK_KEY with ERROR; the pair stays
        unauthenticated.
        """
        tag = self._finishDialback(pair)
        if tag is None:
            return
        self._reportDialbackFailure(pair, code, text, tag)

    def _reportDialbackFailure(self, pair, code, text, tag):
        """
        Forget the pair's secret, count and log the failure, and send the
        ERROR (with the DIALBACK_KEY's tag, or 0 when none is pending).
        """
        self.federation.secrets.withdraw(self.connectionId, pair)
        self.federation.count("dialbacks-failed")
        self.log.info(
            "dial-back {origin} -> {receiving} from {peer} failed: {code} {text}",
            origin=pair[0],
            receiving=pair[1],
            peer=self._peerName(),
            code=int(code),
            text=text,
        )
        if self.state is not PeerState.CLOSED:
            self.sendRecord(_pairError(code, text, pair, tag))

    def _dialbackTimedOut(self, pair):
        """
        No valid secret arrived in time.
        """
        self._failDialback(
            pair,
            ErrorCode.DIALBACK_TIMEOUT,
            f"dial-back not finished within {self.federation.dialbackTimeout:g} s",
        )

    def _dialbackFailed(self, failure, pair):
        """
        The claimed origin could not be reached, or refused the token.
        """
        origin = pair[0]
        code = ErrorCode.DIALBACK_TIMEOUT
        if failure.check(Refused):
            if not failure.value.temporary:
                code = ErrorCode.DIALBACK_FAILED
            if failure.check(RemoteError):
                why = failure.value.text or failure.value.code
                text = f"{origin} did not confirm the key: {why}"
            else:
                text = f"could not dial {origin}: {failure.value.text}"
        else:
            text = f"could not dial {origin}: {failure.getErrorMessage()}"
        self._failDialback(pair, code, text)

    def _handleDialbackSecret(self, record):
        """
        The originator echoes the secret: the pair is authenticated if it is
        the one coined for this connection and pair, unused and unexpired.
        """
        try:
            pair = _pairFields(record)
        except Refused as refusal:
            self.sendRecord(_pairError(refusal.code, refusal.text, _rawPair(record)))
            return
        tag = self._finishDialback(pair)
        try:
            self.federation.secrets.consume(
                record.secret, self.connectionId, pair, self.clock.seconds()
            )
        except DialbackError as e:
            self._reportDialbackFailure(
                pair, ErrorCode.DIALBACK_FAILED, f"dial-back secret refused: {e}", tag or 0
            )
            return
        self.receivablePairs.add(pair)
        self.federation.count("pairs-authenticated")
        self.log.info(
            "{origin} -> {receiving} authenticated by dial-back on the connection "
            "from {peer}",
            origin=pair[0],
            receiving=pair[1],
            peer=self._peerName(),
        )
        if tag is not None:
            self.sendRecord(
                DialbackResult(tag=tag, fromDomain=pair[0], toDomain=pair[1])
            )

    # -- dial-back: the originating server's side -----------------------------

    def authenticatePair(self, pair):
        """
        Make sure this side may send Data for C{pair} on this connection:
        at once if it is authenticated, otherwise by sending DIALBACK_KEY
        and waiting for DIALBACK_RESULT.

        @param pair: C{(localDomain, remoteDomain)}.
        @return: a L{Deferred} firing with this connection, or failing with
            L{RemoteError} (or the reason the connection was lost).
        """
        state = self._sendablePairs.get(pair)
        if state is True:
            return defer.succeed(self)
        refusal = self.pairTLSRefusal(*pair)
        if refusal is not None:
            return defer.fail(refusal)
        if state is None:
            state = self._sendablePairs[pair] = Waiters()
            token = self.federation.tokens.issue(
                pair[0], pair[1], self.connectionId, self.clock.seconds()
            )
            self.request(
                DialbackKey(fromDomain=pair[0], toDomain=pair[1], token=token)
            ).addBoth(self._keyAnswered, pair)
        return state.wait()

    def pairReady(self, pair):
        """
        @return: whether this side may send Data for C{pair} on this
            connection now, without a dial-back.
        """
        return self._sendablePairs.get(pair) is True

    def _keyAnswered(self, result, pair):
        """
        DIALBACK_RESULT (the pair is ours to send on) or an ERROR.
        """
        waiters = self._sendablePairs.pop(pair)
        if isinstance(result, DialbackResult):
            self._sendablePairs[pair] = True
            result = self
        waiters.fire(result)

    def awaitingResult(self, pair):
        """
        @return: whether this side sent DIALBACK_KEY for C{pair} here and
            awaits the answer.
        """
        return isinstance(self._sendablePairs.get(pair), Waiters)

    def _handleDialbackVerify(self, verify):
        """
        A receiving server asks whether a token is ours: if it names a
        connection of ours still waiting for that pair, say yes here and
        echo the secret on that connection.
        """
        try:
            if self.redirectSent:
                raise Refused(ErrorCode.SHUTTING_DOWN, "this server is draining")
            connection, pair = self.federation.confirmToken(verify)
        except Refused as refusal:
            self.federation.count("verifies-refused")
            self.sendRecord(_pairError(refusal.code, refusal.text, _rawPair(verify), verify.tag))
            return
        self.acknowledge(verify.tag)
        connection.sendRecord(
            DialbackSecret(fromDomain=pair[0], toDomain=pair[1], secret=verify.secret)
        )

    def requestVerify(self, verify):
        """
        Send DIALBACK_VERIFY (this connection is Connection 2).

        @return: the L{Deferred} of its answer.
        """
        self._verifying += 1

        def done(result):
            self._verifying -= 1
            return result

        return self.request(verify).addBoth(done)

    # -- REDIRECT -------------------------------------------------------------

    def _handleRedirect(self, redirect):
        """
        Follow a REDIRECT within the safety rules: only on a connection this
        side opened, and never while it carries a dial-back check.
        """
        if not self.originator or self._verifying:
            self.factory.count("redirects-ignored")
            self.log.info(
                "ignoring REDIRECT to {host}:{port} from {peer}: {why}",
                host=redirect.host,
                port=redirect.port,
                peer=self._peerName(),
                why="this side did not open the connection"
                if not self.originator
                else "the connection is in use for dial-back",
            )
            return
        domains = set()
        for name in redirect.domains:
            domains.add(_canonical(name))
        moved = self.federation.pool.redirect(
            self, redirect.host, redirect.port, domains
        )
        if not moved:
            self.factory.count("redirects-ignored")
            return
        self.factory.count("redirects-followed")
        self.log.info(
            "{peer} redirects {domains} to {host}:{port}: {text}",
            peer=self._peerName(),
            domains=", ".join(sorted(moved)),
            host=redirect.host,
            port=redirect.port,
            text=redirect.text or "",
        )
        self.stopUsing()

    def sendRedirect(self, host, port, text):
        """
        Tell the peer to reconnect elsewhere; from now on refuse its new
        requests with C{shutting-down}, and close in order after
        L{DRAIN_GRACE} seconds.
        """
        self.sendRecord(Redirect(host=host, port=port, text=text))
        self.redirectSent = True
        self.stopUsing()
        self._drainTimer = self.clock.callLater(DRAIN_GRACE, self.close, "drained")

    def refuseRecord(self, record):
        """
        While draining, every new request is refused as shutting down.
        """
        if self.redirectSent and record.tag:
            self.factory.count("records-refused")
            self.sendRecord(
                Error(
                    tag=record.tag,
                    code=ErrorCode.SHUTTING_DOWN,
                    text="this server is draining; reconnect as redirected",
                )
            )
            return
        super().refuseRecord(record)


def _canonical(name):
    """
    @return: the canonical form of a domain name, or the name as given when
        it is not a valid domain.
    """
    try:
        return normaliseDomain(name)
    except AddressError:
        return name


def _rawPair(record):
    """
    @return: a dial-back record's domains as sent, for an ERROR about them.
    """
    return record.fromDomain, record.toDomain


def _dialbackTables():
    """
    The state tables of L{FederationProtocol}: the peer protocol's, with
    dial-back, REDIRECT and Data handled when OPEN.
    """
    serving = {
        DialbackKey: FederationProtocol._handleDialbackKey,
        DialbackVerify: FederationProtocol._handleDialbackVerify,
        DialbackSecret: FederationProtocol._handleDialbackSecret,
        Redirect: FederationProtocol._handleRedirect,
    }
    for recordType in DATA_TYPES:
        recordClass = RECORD_CLASSES[recordType]
        if not recordClass.ALWAYS_RESPONSE:
            serving[recordClass] = FederationProtocol._handleData
    return servingTables(serving)


FederationProtocol.stateTables = _dialbackTables()


class Federation(PeerFactory):
    """
    All peer connections of one imxd process, inbound and outbound, and
    what they share.

    @ivar aggregator: the L{imxd.aggregator.Aggregator}.
    @ivar tokens: the L{imxd.dialback.DialbackTokens} this server issues.
    @ivar secrets: the L{imxd.dialback.DialbackSecrets} it coins.
    @ivar pool: the L{OutboundPool}.
    @ivar router: the L{Router}.
    @ivar limits: the L{imxd.config.LimitsConfig}.
    @ivar dialbackTimeout: seconds one dial-back may take.
    @ivar draining: C{(host, port)} this server redirects peers to, or
        L{None} while it serves normally.
    """

    protocol = FederationProtocol
    log = Logger()

    def __init__(
        self,
        clock,
        settings,
        aggregator,
        tokens,
        secrets,
        discovery,
        connect,
        limits,
        dialbackTimeout=15.0,
        tls=None,
        database=None,
        queue=None,
    ):
        """
        @param clock: an L{IReactorTime} provider.
        @param settings: the L{imxd.peer.PeerSettings}.
        @param aggregator: the hosted domains.
        @param tokens: a L{imxd.dialback.DialbackTokens}.
        @param secrets: a L{imxd.dialback.DialbackSecrets}.
        @param discovery: a L{imxd.discovery.Discovery}.
        @param connect: the pool's connector (L{imxd.pool.tcpConnector}).
        @param limits: the L{imxd.config.LimitsConfig}.
        @param dialbackTimeout: seconds one dial-back may take.
        @param tls: the L{imxd.tls.TLSPolicy}, or L{None} for no TLS.
        @param database: the L{imxd.store.Database} of the outbound queue,
            the dedupe table and the subscriptions; a fresh one in memory
            when L{None}.
        @param queue: the L{imxd.config.QueueConfig}; its defaults when
            L{None}.
        """
        super().__init__(clock, settings, capabilities=CAPABILITIES, tls=tls)
        self.database = Database(":memory:", clock) if database is None else database
        self.aggregator = aggregator
        self.tokens = tokens
        self.secrets = secrets
        self.limits = limits
        self.dialbackTimeout = dialbackTimeout
        self.pool = OutboundPool(
            self, discovery, connect, clock, maxPerPeer=limits.maxOutboundPerPeer
        )
        queue = QueueConfig() if queue is None else queue
        self.queue = queue
        self.router = Router(
            aggregator,
            self.pool,
            clock,
            SeenStore(self.database),
            queue.dedupeWindow,
            limits.maxRequestsInProgress,
        )
        self.outbox = Outbox(
            OutboundStore(self.database, queue.writeBehind),
            clock,
            self.router.transmitThen,
            self._report,
            queue,
        )
        self.router.outbox = self.outbox
        self.domainRate = RateLimiter(
            clock, limits.domainRate, limits.domainBurst, limits.rateExemptDomains
        )
        self.draining = None
        self._byId = {}

    def hostedDomains(self):
        """
        @return: the canonical names of the domains hosted here.
        """
        return self.aggregator.hostedDomains()

    def start(self):
        """
        Take up the queued messages and start the upkeep timers.
        """
        self.router.start()
        self.outbox.start()

    def stop(self):
        """
        Stop sending and the upkeep timers, drop every connection (so that
        no answer arrives after the database is closed: requests in flight
        are sent again after the restart, and the receivers' dedupe keeps
        them from being delivered twice), and write what is pending.
        """
        self.outbox.stop()
        self.router.stop()
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abortConnection()
        self.database.flush()

    def _report(self, entry, refusal):
        """
        Tell the sending domain's backend what became of a queued message.
        """
        domain = self.aggregator.domain(entry.origin)
        if domain is None:
            self.log.warn(
                "delivery report for {id}: {origin} is no longer hosted here",
                id=entry.record.messageId,
                origin=entry.origin,
            )
            return
        domain.deliveryReport(entry.record, refusal)

    # -- connections ----------------------------------------------------------

    def newConnectionId(self):
        """
        @return: a fresh random 64-bit connection id.
        """
        while True:
            connectionId = _random.randbits(64)
            if connectionId not in self._byId:
                return connectionId

    def registerConnection(self, protocol):
        """
        A connection is made: find it by its id from now on (until it is
        lost), so that DIALBACK_VERIFY can name it.
        """
        self._byId[protocol.connectionId] = protocol

    def buildOutbound(self, domain, trusted=True, localDomain=None):
        """
        @param trusted: whether the address comes from this server's own
            discovery (C{False}: from a REDIRECT).
        @param localDomain: the hosted domain the connection is opened for
            (its certificate is presented).
        @return: a L{FederationProtocol} for a connection to be dialled for
            C{domain}.
        """
        return self.protocol(
            self,
            originator=True,
            dialledDomain=domain,
            trusted=trusted,
            localDomain=localDomain,
        )

    def connectionClosed(self, protocol):
        """
        A connection has gone: forget it everywhere.
        """
        super().connectionClosed(protocol)
        self._byId.pop(protocol.connectionId, None)
        if protocol.originator:
            self.pool.forget(protocol)

    def _inbound(self):
        """
        @return: the live connections peers opened to this server.
        """
        return [c for c in self.connections if not c.originator]

    def admissionRefusal(self, protocol):
        """
        Decide whether a new inbound connection may stay, by the limits
        that hold before authentication: in total and per source address.

        @return: a L{Refused} to send, or L{None}.
        """
        if self.draining is not None:
            return Refused(ErrorCode.SHUTTING_DOWN, "this server is draining")
        limits = self.limits
        if len(self.connections) >= limits.maxConnectionsTotal:
            return Refused(
                ErrorCode.RESOURCE_LIMIT,
                f"this server has its maximum of {limits.maxConnectionsTotal} connections",
            )
        host = protocol.peerHost()
        fromHost = sum(1 for c in self._inbound() if c.peerHost() == host)
        if fromHost >= limits.maxConnectionsPerAddress:
            return Refused(
                ErrorCode.RESOURCE_LIMIT,
                f"{host} already has {limits.maxConnectionsPerAddress} connections here",
            )
        return None

    def dialbackRefusal(self, protocol, pair):
        """
        Decide whether a dial-back may start: pending dial-backs are counted
        per source address; connections authenticated per origin domain.

        @return: a L{Refused} to send, or L{None}.
        """
        limits = self.limits
        host = protocol.peerHost()
        pending = sum(c.awaitingSecret() for c in self._inbound() if c.peerHost() == host)
        if pending >= limits.maxPendingDialbacksPerAddress:
            return Refused(
                ErrorCode.RESOURCE_LIMIT,
                f"{host} already has {pending} dial-backs pending here",
            )
        origin, receiving = pair
        blocked = self.aggregator.domain(receiving).config.policy.blockedDomains
        if origin in blocked:
            return Refused(ErrorCode.BLOCKED, f"{receiving} does not accept {origin}")
        authenticated = sum(
            1
            for c in self._inbound()
            if c is not protocol and any(o == origin for o, _ in c.receivablePairs)
        )
        if authenticated >= limits.maxConnectionsPerDomain:
            return Refused(
                ErrorCode.RESOURCE_LIMIT,
                f"{origin} already has {authenticated} connections here",
            )
        return None

    # -- dial-back ---------------------------------------------------------

    def askToVerify(self, origin, receiving, token, secret):
        """
        Connection 2: dial C{origin} through this server's own discovery
        (or reuse a connection this server opened to it) and ask it to
        confirm C{token}.

        @return: a L{Deferred} firing with the ACK, or failing with
            L{Refused} (L{RemoteError} if the origin said no).
        """
        verify = DialbackVerify(
            fromDomain=receiving, toDomain=origin, token=token, secret=secret
        )
        opened = self.pool.connection(origin, trusted=True, localDomain=receiving)

        def ask(connection):
            # The secret travels on this connection: never in plaintext
            # when the pair requires TLS.
            refusal = connection.pairTLSRefusal(receiving, origin)
            if refusal is not None:
                raise refusal
            asked = connection.requestVerify(verify)
            asked.addBoth(self._lingerThenClose, connection)
            return asked

        return opened.addCallback(ask)

    def _lingerThenClose(self, result, connection):
        """
        A connection opened only for dial-back checks is closed once it has
        been unused for the dial-back timeout, rather than the idle timeout,
        so that checks cannot pile up connections.
        """

        def closeIfUnused():
            if connection.carriesNothing():
                self.count("verification-closes")
                connection.close("dial-back check done")

        self.clock.callLater(self.dialbackTimeout, closeIfUnused)
        return result

    def confirmToken(self, verify):
        """
        Check a DIALBACK_VERIFY: the token is one this server issued, live,
        for C{(TO_DOMAIN → FROM_DOMAIN)}, by this node, naming a connection
        still open and still waiting for that pair.

        @return: C{(connection, pair)}: Connection 1 and the pair.
        @raise Refused: C{unknown-domain} or C{dialback-failed}, saying why.
        """
        asking, ours = _pairFields(verify)
        if ours not in self.hostedDomains():
            raise Refused(ErrorCode.UNKNOWN_DOMAIN, f"{ours} is not hosted here")
        pair = (ours, asking)
        try:
            claims = self.tokens.verify(verify.token, ours, asking, self.clock.seconds())
        except DialbackError as e:
            raise Refused(ErrorCode.DIALBACK_FAILED, str(e)) from None
        if claims.node != self.tokens.node:
            raise Refused(
                ErrorCode.TEMPORARY_FAILURE,
                f"token was issued by node {claims.node!r}, not {self.tokens.node!r}",
            )
        connection = self._byId.get(claims.connectionId)
        if connection is None or connection.state is not PeerState.OPEN:
            raise Refused(
                ErrorCode.DIALBACK_FAILED, "the connection the token names is gone"
            )
        if not connection.awaitingResult(pair):
            raise Refused(
                ErrorCode.DIALBACK_FAILED,
                f"no dial-back for {ours} -> {asking} is pending on that connection",
            )
        return connection, pair

    # -- draining ----------------------------------------------------------------

    def drain(self, host, port, text=None):
        """
        Take this server out of service: send REDIRECT to C{host:port} on
        every connection peers opened, refuse new requests and new
        connections, and close those connections in order after
        L{DRAIN_GRACE} seconds.

        @return: how many connections were redirected.
        """
        self.draining = (host, port)
        redirected = 0
        for protocol in self._inbound():
            if protocol.state in (PeerState.AWAITING_HELLO, PeerState.UPGRADING):
                refusal = self.admissionRefusal(protocol)
                protocol._refuse(refusal.code, refusal.text)
            elif protocol.state is PeerState.OPEN and not protocol.redirectSent:
                protocol.sendRedirect(host, port, text)
                redirected += 1
        self.log.info(
            "draining: {count} peer connections redirected to {host}:{port}",
            count=redirected,
            host=host,
            port=port,
        )
        return redirected

    def status(self):
        """
        @return: C{(name, value)} pairs describing the server's state, for
            the admin endpoint's STATUS.
        """
        inbound = self._inbound()
        outbound = [c for c in self.connections if c.originator]
        lines = [
            ("state", "draining" if self.draining else "serving"),
            ("domains", ",".join(sorted(self.hostedDomains()))),
            ("connections-inbound", len(inbound)),
            ("connections-outbound", len(outbound)),
            ("pairs-inbound", sum(len(c.receivablePairs) for c in inbound)),
            ("dialbacks-pending", sum(c.awaitingSecret() for c in inbound)),
        ]
        if self.draining:
            lines.append(("redirect-to", "%s:%d" % self.draining))
        lines.append(
            ("connections-tls", sum(1 for c in self.connections if c.tlsActive))
        )
        for protocol in inbound:
            name = f"inbound.{protocol.connectionId:016x}"
            if protocol.receivablePairs:
                pairs = sorted(f"{o}->{r}" for o, r in protocol.receivablePairs)
                lines.append((name, " ".join(pairs)))
            if protocol.tlsActive:
                lines.append((f"{name}.tls", protocol.tlsDescription))
        for domain, connections in sorted(self.pool.connections().items()):
            lines.append((f"peer.{domain}", len(connections)))
            for connection in connections:
                if connection.tlsActive:
                    lines.append((f"peer.{domain}.tls", connection.tlsDescription))
                    break
        for domain, redirection in sorted(self.pool.redirections.items()):
            target = redirection.target
            lines.append((f"redirect.{domain}", f"{target.host}:{target.port}"))
        lines.extend(self.outbox.status())
        for name in sorted(self.hostedDomains()):
            backendStatus = getattr(self.aggregator.domain(name).backend, "status", None)
            if backendStatus is not None:
                lines.extend(backendStatus())
        lines.append(("count.duplicates-suppressed", self.router.duplicates))
        lines.append(("count.rate-limited", self.domainRate.refusals))
        lines.append(("count.busy-refusals", self.router.busyRefusals))
        for name, value in sorted(self.counters.items()):
            lines.append((f"count.{name}", value))
        return lines

