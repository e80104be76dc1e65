"""
The C{link} backend: a private IM system connects in to imxd over one
persistent connection and serves its domains through it.

The connection speaks the IMX framing and codec (C{docs/protocol.md},
section 19): preamble, HELLO, tagged requests, batched ACKs, PING/PONG.
The backend proves each domain it serves with that domain's secret
(L{imxd.wire.LinkAuth}, compared in constant time); after that, what imxd
asks of the domain's backend (L{IBackend}) travels to it as requests, and
what it sends (MESSAGE, SUBSCRIBE, PUBLISH, ...) reaches the hosted domain
(L{imxd.backend.interfaces.IDomainService}).

While no link is connected, requests for the domain are refused for now
(C{temporary-failure}, so the sending server retries); delivery reports
and subscription changes are held in memory and sent once the backend
authenticates again.  The client side is L{imxd.link}.
"""

from __future__ import annotations

import collections
import hmac
import os
from typing import Any, Mapping

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from imxd.address import AddressError, normaliseDomain
from imxd.backend import listenOption, refuseUnknownOptions
from imxd.backend.interfaces import DECISIONS, IFastBackend
from imxd.peer import (
    ACK_BATCH,
    PeerFactory,
    PeerProtocol,
    PeerSettings,
    PeerState,
    Refused,
    RemoteError,
    servingTables,
)
from imxd.presence import formatAttributes, parseAttributes
from imxd.router import domainOf
from imxd.wire import (
    DATA_TYPES,
    Attributes,
    Delivered,
    DomainAttributesGet,
    ErrorCode,
    LinkAuth,
    Message,
    Publish,
    Report,
    Subscribe,
    SubscriptionState,
    Unsubscribe,
    UserAttributesGet,
)

__all__ = ["LinkBackend", "LinkServerProtocol", "LinkFactory", "linkServices", "validateOptions"]

#: Where the link listener listens when the options name no address.
DEFAULT_LISTEN = "tcp:5280:interface=127.0.0.1"

#: Octets a link secret holds at least and at most (the SECRET field's
#: bounds).
SECRET_LENGTHS = (16, 64)

#: Delivery reports and subscription changes held per domain while its
#: link is down; beyond this the oldest are dropped (and logged).
MAX_HELD = 100_000

#: Failed LINK_AUTH attempts after which a connection is closed.
MAX_AUTH_FAILURES = 3

#: Seconds a link connection has, from connecting, to authenticate its
#: first domain; one that has not is refused and closed, so that a
#: stranger cannot hold link connections open (imxd's keepalive would
#: otherwise keep them alive for good).
AUTH_TIMEOUT = 30.0

#: Link connections from one address that have not authenticated a domain
#: yet, at most; one more is refused (C{resource-limit}) and closed, so
#: that a stranger cannot fill the listener.  A backend needs one.
MAX_UNAUTHENTICATED_PER_ADDRESS = 8

#: Seconds a sending server is asked to wait while a link is down.
RETRY_WHILE_DOWN = 5

#: The capability by which a link side says it takes (the backend) or
#: gives (imxd) the outcome of a MESSAGE that came before it was
#: acknowledged as its answer: DELIVERED, or a REPORT response
#: (protocol.md, section 19.3).
REPORT_ANSWER = "report-answer"

#: What both sides of a link announce in HELLO.
LINK_CAPABILITIES = ("link", REPORT_ANSWER)


def validateOptions(options: Mapping[str, Any], baseDirectory: str = ".") -> dict:
    """
    Check the options of a C{link} backend.

    @param options: C{listen} (the link listener's endpoint, default
        L{DEFAULT_LISTEN}; C{ssl:...} for TLS), and the domain's secret as
        C{secret} (text) or C{secret_file} (a file whose content, without
        the final newline, is the secret; relative to C{baseDirectory}).
    @return: C{{"listen", "secret"}}, the secret as L{bytes}.
    @raise ValueError: naming the first problem.
    """
    refuseUnknownOptions(options, {"listen", "secret", "secret_file"})
    listen = listenOption(options, DEFAULT_LISTEN)
    if ("secret" in options) == ("secret_file" in options):
        raise ValueError("give the domain's link secret as secret or as secret_file, once")
    if "secret" in options:
        secret = options["secret"]
        if not isinstance(secret, str):
            raise ValueError("secret: expected text")
        secret = secret.encode("utf-8")
    else:
        path = options["secret_file"]
        if not isinstance(path, str) or not path:
            raise ValueError("secret_file: expected a path")
        path = os.path.normpath(os.path.join(baseDirectory, path))
        try:
            with open(path, "rb") as f:
                secret = f.read().rstrip(b"\r\n")
        except OSError as e:
            raise ValueError(f"secret_file: cannot read {path}: {e.strerror}") from None
    low, high = SECRET_LENGTHS
    if not low <= len(secret) <= high:
        raise ValueError(f"the link secret must be {low} to {high} octets, not {len(secret)}")
    return {"listen": listen, "secret": secret}


def _linkClosed(failure):
    """
    A request to the backend failed: its own refusal passes through, a
    lost link becomes a temporary failure.
    """
    if failure.check(Refused):
        return failure
    raise _linkLost()


def _linkLost():
    return Refused(ErrorCode.TEMPORARY_FAILURE, "the backend link closed before answering")


def _acknowledged(_):
    return None


@implementer(IFastBackend)
class LinkBackend:
    """
    The backend of one hosted domain, served by whichever link connection
    last authenticated for it.

    @ivar domain: the hosted domain's normalised name.
    @ivar listen: the endpoint description of the listener it is served on.
    @ivar connection: the L{LinkServerProtocol} serving the domain now, or
        L{None}.
    @ivar service: the hosted domain (L{IDomainService}), once started.
    @ivar held: C{(serial, record)} (REPORT, SUBSCRIPTION_STATE) waiting
        for a link.
    @ivar heldDropped: held records dropped because more than L{MAX_HELD}
        waited.
    @ivar maxMessageSize: the domain's C{max_message_size}: the link
        listener takes records large enough for such a message.
    """

    log = Logger()

    def __init__(
        self,
        domain: str,
        listen: str,
        secret: bytes,
        maxHeld: int = MAX_HELD,
        maxMessageSize: int = 32768,
    ):
        self.domain = domain
        self.listen = listen
        self._secret = secret
        self.maxHeld = maxHeld
        self.maxMessageSize = maxMessageSize
        self.connection = None
        self.service = None
        self.held: collections.deque = collections.deque()
        self.heldDropped = 0
        self._serial = 0
        self._unconfirmed: dict = {}

    @classmethod
    def fromConfig(cls, domainConfig: Any) -> "LinkBackend":
        """
        Build the backend of a hosted domain from its validated options.
        """
        options = domainConfig.backendOptions
        return cls(
            domainConfig.name,
            options["listen"],
            options["secret"],
            maxMessageSize=domainConfig.maxMessageSize,
        )

    # -- the link ---------------------------------------------------------------

    def secretMatches(self, secret: bytes) -> bool:
        """
        @return: whether C{secret} is the domain's, compared in constant time.
        """
        return hmac.compare_digest(secret, self._secret)

    def attach(self, connection: "LinkServerProtocol") -> None:
        """
        C{connection} authenticated for the domain: it serves the domain
        from now on (an older connection no longer does), and what was
        held is sent.
        """
        old, self.connection = self.connection, connection
        if old is not None and old is not connection:
            old.domains.discard(self.domain)
        # What an earlier link took but never confirmed goes first, in order.
        unconfirmed, self._unconfirmed = self._unconfirmed, {}
        self.held.extendleft(reversed(sorted(unconfirmed.items())))
        self._sendHeld()

    def detach(self, connection: "LinkServerProtocol") -> None:
        """
        C{connection} closed: if it served the domain, nothing does now.
        """
        if self.connection is connection:
            self.connection = None

    def connected(self) -> bool:
        """
        @return: whether a link serves the domain now.
        """
        return self.connection is not None and self.connection.state is PeerState.OPEN

    def _request(self, record, convert):
        """
        Send a request to the backend.

        @param convert: turns the backend's answer into the result.
        @return: a L{Deferred} of the result, failing with L{Refused} (the
            backend's ERROR, or C{temporary-failure} when no link serves
            the domain or it closed before answering).
        """
        if not self.connected():
            return defer.fail(self._notConnected())
        return self.connection.request(record).addCallbacks(convert, _linkClosed)

    def _notConnected(self):
        return Refused(
            ErrorCode.TEMPORARY_FAILURE,
            f"the backend of {self.domain} is not connected",
            retryAfter=RETRY_WHILE_DOWN,
        )

    def _hold(self, record) -> None:
        """
        Send a record the backend must not miss now, or once it is linked
        again.
        """
        if len(self.held) + len(self._unconfirmed) >= self.maxHeld and self.held:
            self.held.popleft()
            self.heldDropped += 1
            if self.heldDropped == 1 or not self.heldDropped % 1000:
                self.log.warn(
                    "{domain}: {count} reports dropped while the backend link is down",
                    domain=self.domain,
                    count=self.heldDropped,
                )
        self._serial += 1
        self.held.append((self._serial, record))
        self._sendHeld()

    def _sendHeld(self) -> None:
        """
        Send every held record on the link; one the link loses is held
        again.
        """
        while self.held and self.connected():
            serial, record = self.held.popleft()
            self._unconfirmed[serial] = record
            self.connection.requestThen(record, self._taken, self._notTaken, (serial, record))

    def _taken(self, _, serial, record):
        self._unconfirmed.pop(serial, None)

    def _notTaken(self, failure, serial, record):
        """
        The backend refused a held record (dropped and logged); one the link
        lost or left unanswered stays unconfirmed and is sent again, in
        order, when a link next authenticates.
        """
        if failure.check(RemoteError):
            self._unconfirmed.pop(serial, None)
            self.log.warn(
                "{domain}: the backend refused {record}: {error}",
                domain=self.domain,
                record=type(record).__name__,
                error=failure.value,
            )

    # -- IBackend -----------------------------------------------------------------

    def start(self, sender: Any) -> None:
        """
        Keep the hosted domain; see L{IBackend.start}.
        """
        self.service = sender

    def stop(self) -> None:
        """
        Close the link in order; see L{IBackend.stop}.
        """
        if self.connection is not None:
            self.connection.close("imxd is stopping")

    def deliverMessage(self, message: Message) -> defer.Deferred:
        """
        Hand a message to the backend; see L{IBackend.deliverMessage}.
        """
        return self._request(message, _acknowledged)

    def deliverMessageThen(self, message: Message, onAccepted, onFailure, *args) -> None:
        """
        Hand a message to the backend without a L{Deferred}; see
        L{IFastBackend.deliverMessageThen}.
        """
        if not self.connected():
            onFailure(Failure(self._notConnected()), *args)
            return
        self.connection.requestThen(message, self._delivered, self._notDelivered, (onAccepted, onFailure, args))

    def _delivered(self, _, onAccepted, onFailure, args):
        onAccepted(None, *args)

    def _notDelivered(self, failure, onAccepted, onFailure, args):
        if not failure.check(Refused):
            failure = Failure(_linkLost())
        onFailure(failure, *args)

    def deliverNotification(self, notification) -> defer.Deferred:
        """
        Hand a NOTIFY to the backend; see L{IBackend.deliverNotification}.
        """
        return self._request(notification, _acknowledged)

    def decideSubscription(self, subscriber: str, publisher: str) -> defer.Deferred:
        """
        Ask the backend (SUBSCRIBE, answered by SUBSCRIPTION_STATE); see
        L{IBackend.decideSubscription}.
        """

        def decision(answer):
            state = getattr(answer, "state", None)
            if state not in DECISIONS:
                raise Refused(
                    ErrorCode.MALFORMED, f"the backend answered SUBSCRIBE with {state!r}"
                )
            return state

        return self._request(Subscribe(subscriber=subscriber, publisher=publisher), decision)

    def subscriptionChanged(self, subscriber: str, publisher: str, state: str) -> None:
        """
        Tell the backend (SUBSCRIPTION_STATE, held while the link is down);
        see L{IBackend.subscriptionChanged}.
        """
        self._hold(SubscriptionState(publisher=publisher, subscriber=subscriber, state=state))

    def userAttributes(self, user: str, requester: str) -> defer.Deferred:
        """
        Ask the backend (USER_ATTRIBUTES_GET, answered by ATTRIBUTES); see
        L{IBackend.userAttributes}.
        """

        def values(answer):
            if not isinstance(answer, Attributes):
                raise Refused(ErrorCode.MALFORMED, "the backend did not answer with ATTRIBUTES")
            return parseAttributes(answer.attributes)

        return self._request(UserAttributesGet(requester=requester, target=user), values)

    def deliveryReport(self, message: Message, refusal) -> None:
        """
        Tell the backend (REPORT, held while the link is down); see
        L{IBackend.deliveryReport}.
        """
        self._hold(reportOf(message, refusal))

    def status(self) -> list:
        """
        @return: the C{imxctl status} line of the domain's link: whether a
            link serves it and from where, and the records held for it.
        """
        if self.connected():
            state = f"linked from={self.connection._peerName()}"
        else:
            state = "unlinked"
        return [(f"link.{self.domain}", f"{state} held={len(self.held)} dropped={self.heldDropped}")]

    def __repr__(self) -> str:
        state = "linked" if self.connected() else "unlinked"
        return f"<LinkBackend {self.domain} {state} held={len(self.held)}>"


def reportOf(message, refusal, tag=0, response=False):
    """
    @return: the REPORT of C{message}'s outcome: delivered (C{refusal} is
        L{None}) or failed for good; with C{tag} and C{response}, the
        answer to the backend's MESSAGE.
    """
    return Report(
        sender=message.sender,
        recipient=message.recipient,
        messageId=message.messageId,
        code=None if refusal is None else refusal.code,
        text=None if refusal is None else refusal.text,
        tag=tag,
        response=response,
    )


class LinkServerProtocol(PeerProtocol):
    """
    imxd's side of one link connection.

    @ivar domains: the hosted domains this connection serves now.
    @ivar reportAnswers: whether both sides announced C{report-answer}.
    """

    def __init__(self, factory, originator=False):
        super().__init__(factory, originator)
        self.domains: set[str] = set()
        self.reportAnswers = False
        self._delivered = []
        self._authFailures = 0
        self._authTimer = None

    def helloDone(self):
        """
        HELLO is done: note whether the backend takes outcomes as answers.
        """
        self.reportAnswers = self.bothOffer(REPORT_ANSWER)

    def connectionMade(self):
        """
        Start the clock for L{AUTH_TIMEOUT}, unless the address already has
        L{MAX_UNAUTHENTICATED_PER_ADDRESS} connections waiting to
        authenticate: then refuse this one.
        """
        super().connectionMade()
        host = self.peerHost()
        waiting = sum(
            1
            for c in self.factory.connections
            if c is not self and not c.domains and c.peerHost() == host
        )
        if waiting >= MAX_UNAUTHENTICATED_PER_ADDRESS:
            self.factory.count("link-connections-refused")
            self._refuse(
                ErrorCode.RESOURCE_LIMIT,
                f"{host} already has {waiting} link connections that have not authenticated",
            )
            return
        self._authTimer = self.clock.callLater(AUTH_TIMEOUT, self._authTimedOut)

    def _authTimedOut(self):
        self._authTimer = None
        if not self.domains:
            self.factory.count("link-auth-timeouts")
            self._refuse(
                ErrorCode.NOT_AUTHENTICATED,
                f"no domain authenticated within {AUTH_TIMEOUT:g} s",
            )

    def connectionLost(self, reason):
        """
        The domains it served have no link now.
        """
        if self._authTimer is not None and self._authTimer.active():
            self._authTimer.cancel()
        self._authTimer = None
        for domain in self.domains:
            self.factory.backends[domain].detach(self)
        self.domains = set()
        if self._delivered:
            # Their MESSAGEs are unanswered: the backend sends them again
            # (protocol.md, section 19.6) and hears their outcome then.
            self.factory.count("delivered-answers-lost", len(self._delivered))
            self.log.warn(
                "link from {peer} lost before {count} DELIVERED answers were sent",
                peer=self._peerName(),
                count=len(self._delivered),
            )
            self._delivered = []
        super().connectionLost(reason)

    def _handleAuth(self, auth: LinkAuth) -> None:
        """
        LINK_AUTH: take the domain on if its secret matches; a connection
        that fails L{MAX_AUTH_FAILURES} times is closed.
        """
        try:
            domain = normaliseDomain(auth.domain)
        except AddressError:
            domain = None
        backend = self.factory.backends.get(domain)
        if backend is None or not backend.secretMatches(auth.secret):
            self._authFailures += 1
            self.factory.count("link-auth-failures")
            self.log.warn(
                "link {peer}: authentication for {domain} failed",
                peer=self._peerName(),
                domain=auth.domain,
            )
            if self._authFailures >= MAX_AUTH_FAILURES:
                self._refuse(
                    ErrorCode.NOT_AUTHENTICATED,
                    f"{MAX_AUTH_FAILURES} failed authentications",
                    auth.tag,
                )
                return
            self.sendRecord(
                Refused(
                    ErrorCode.NOT_AUTHENTICATED,
                    f"not a link domain of this listener, or a wrong secret: {auth.domain}",
                ).toError(auth.tag)
            )
            return
        self.domains.add(domain)
        if self._authTimer is not None and self._authTimer.active():
            self._authTimer.cancel()
        self._authTimer = None
        self.factory.count("link-authentications")
        self.log.info(
            "link {peer} serves {domain}", peer=self._peerName(), domain=domain
        )
        # The ACK goes out before anything the backend held for the domain.
        self.acknowledge(auth.tag)
        self._flushAcks()
        backend.attach(self)

    def _serviceFor(self, address: str):
        """
        @return: the hosted domain that C{address} belongs to.
        @raise Refused: C{malformed}, or C{not-authenticated} when this
            connection does not serve its domain.
        """
        domain = domainOf(address, "FROM", domainAllowed=True)
        if domain not in self.domains:
            raise Refused(
                ErrorCode.NOT_AUTHENTICATED,
                f"{domain} is not authenticated on this link",
            )
        return self.factory.backends[domain].service

    def refuseRecord(self, record):
        """
        Records a backend never sends (RENEW, NOTIFY, ...) are refused as
        unsupported, not as unauthenticated Data.
        """
        if record.TYPE in DATA_TYPES and self.state is PeerState.OPEN:
            self.factory.count("records-refused")
            self.sendRecord(
                Refused(
                    ErrorCode.UNSUPPORTED,
                    f"{type(record).__name__} is not a request a backend sends on the link",
                ).toError(record.tag)
            )
            return
        super().refuseRecord(record)

    def _handleRequest(self, record) -> None:
        """
        A request from the backend: hand it to its hosted domain, and
        answer with the outcome.
        """
        if record.response:
            self._handleResponse(record)
            return
        try:
            answered = _REQUESTS[type(record)](self, record)
        except Refused as refusal:
            self._refuseRequest(refusal, record.tag)
            return
        self.answer(answered, record)

    def _refuseRequest(self, refusal, tag):
        self.factory.count("requests-refused")
        self.sendRecord(refusal.toError(tag))

    def _handleMessage(self, message) -> None:
        """
        A MESSAGE from the backend: queue it, and ACK it once it is queued
        durably (without a L{Deferred}: the per-message path).
        """
        if message.response:
            self._handleResponse(message)
            return
        tag = message.tag
        try:
            service = self._serviceFor(message.sender)
        except Refused as refusal:
            self._refuseRequest(refusal, tag)
            return
        # Sent on as it came: the tag means nothing beyond this link, and
        # a copy to clear it would cost more than queueing the message.
        service.sendMessageThen(
            message,
            self.answerAccepted,
            self.answerRefusal,
            tag,
            Message,
            onOutcome=self._answerWithOutcome if self.reportAnswers else None,
        )

    def _answerWithOutcome(self, origin, message, refusal, tag, requestType):
        """
        Answer a MESSAGE whose outcome came before it was acknowledged with
        that outcome, where this connection still serves its domain (with
        C{report-answer}, protocol.md section 19.3): delivered, in the next
        DELIVERED with the others gathered like ACKs; failed, as a REPORT
        response.

        @return: whether it did; if not, ACK and a REPORT request follow.
        """
        if not tag or self.state is not PeerState.OPEN or origin not in self.domains:
            return False
        if refusal is None:
            self._delivered.append(tag)
            self._flushSoon()
        else:
            self.sendRecord(reportOf(message, refusal, tag=tag, response=True))
        return True

    def _flushAcks(self):
        """
        Send the DELIVERED answers gathered, then the ACKs.
        """
        delivered, self._delivered = self._delivered, []
        if delivered and self.state is not PeerState.CLOSED:
            for start in range(0, len(delivered), ACK_BATCH):
                self.sendRecord(Delivered(tags=tuple(delivered[start : start + ACK_BATCH])))
        super()._flushAcks()

    def _subscribe(self, record):
        service = self._serviceFor(record.subscriber)
        state = service.subscribe(record.subscriber, record.publisher)
        return state.addCallback(
            lambda state: SubscriptionState(
                publisher=record.publisher, subscriber=record.subscriber, state=state
            )
        )

    def _unsubscribe(self, record):
        service = self._serviceFor(record.subscriber)
        return service.unsubscribe(record.subscriber, record.publisher).addCallback(
            _acknowledged
        )

    def _decide(self, record):
        service = self._serviceFor(record.publisher)
        if record.state not in ("granted", "denied"):
            raise Refused(
                ErrorCode.MALFORMED, f"a decision is granted or denied, not {record.state!r}"
            )
        decided = service.decide(record.publisher, record.subscriber, record.state == "granted")
        return decided.addCallback(_acknowledged)

    def _publish(self, record):
        service = self._serviceFor(record.user)
        published = service.publishPresence(
            record.user, record.presence, record.status, parseAttributes(record.attributes)
        )
        return published.addCallback(_acknowledged)

    def _attributes(self, record):
        service = self._serviceFor(record.requester)
        asked = service.remoteAttributes(record.requester, record.target)
        return asked.addCallback(
            lambda values: Attributes(target=record.target, attributes=formatAttributes(values))
        )


#: What each request from the backend does (but MESSAGE, which
#: L{LinkServerProtocol._handleMessage} serves).
_REQUESTS = {
    Subscribe: LinkServerProtocol._subscribe,
    Unsubscribe: LinkServerProtocol._unsubscribe,
    SubscriptionState: LinkServerProtocol._decide,
    Publish: LinkServerProtocol._publish,
    UserAttributesGet: LinkServerProtocol._attributes,
    DomainAttributesGet: LinkServerProtocol._attributes,
}


def _linkTables():
    """
    The state tables of L{LinkServerProtocol}: the peer protocol's, with
    LINK_AUTH and the backend's requests served when OPEN.
    """
    serving = {recordClass: LinkServerProtocol._handleRequest for recordClass in _REQUESTS}
    serving[Message] = LinkServerProtocol._handleMessage
    serving[LinkAuth] = LinkServerProtocol._handleAuth
    serving[Attributes] = LinkServerProtocol._handleResponse
    return servingTables(serving)


LinkServerProtocol.stateTables = _linkTables()


class LinkFactory(PeerFactory):
    """
    The link listener of one endpoint: the link backends served on it.

    @ivar backends: the L{LinkBackend}s by domain.
    """

    protocol = LinkServerProtocol

    def __init__(self, clock, backends, maxRecordSize=None):
        """
        @param clock: an L{IReactorTime} provider.
        @param backends: the L{LinkBackend}s served on this listener.
        @param maxRecordSize: the largest record body accepted; by default
            L{linkRecordSize} of the backends.
        """
        if maxRecordSize is None:
            maxRecordSize = linkRecordSize(backends)
        settings = PeerSettings(
            hostedDomains=frozenset(backend.domain for backend in backends),
            idleTimeout=0,
            maxRecordSize=maxRecordSize,
            software="imxd-link",
        )
        super().__init__(clock, settings, capabilities=LINK_CAPABILITIES)
        self.backends = {backend.domain: backend for backend in backends}


#: Octets a link record may hold besides the message body (addresses, id,
#: content type, attributes).
ENVELOPE_ROOM = 65536


def linkRecordSize(backends):
    """
    @return: the MAX_RECORD a link listener announces: room for the largest
        message any of its domains accepts (C{max_message_size}) and its
        envelope.
    """
    return max((backend.maxMessageSize for backend in backends), default=0) + ENVELOPE_ROOM


def linkServices(backends, reactor):
    """
    Build one link listener per distinct C{listen} address of the given
    link backends (domains naming the same address share it).

    @param backends: L{LinkBackend}s.
    @param reactor: the reactor to listen and time with.
    @return: the listener services, named C{link-N}.
    """
    from twisted.internet.endpoints import serverFromString

    from imxd.listener import ListenerService

    byListen: dict[str, list] = {}
    for backend in backends:
        byListen.setdefault(backend.listen, []).append(backend)
    services = []
    for index, (listen, served) in enumerate(sorted(byListen.items())):
        listener = ListenerService(
            serverFromString(reactor, listen), LinkFactory(reactor, served), listen
        )
        listener.setName(f"link-{index}")
        services.append(listener)
    return services
