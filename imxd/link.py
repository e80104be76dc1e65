"""
The link client: how a private IM system serves its imxd domains.

The system connects out to imxd's link listener (the C{link} backend,
C{docs/backends.md}), proves each domain with its secret, and from then on
imxd hands it what arrives for its users and it sends through imxd.  A
backend is a L{LinkHandler} and a L{LinkClient}::

    from twisted.internet import reactor
    from imxd.link import LinkClient, LinkHandler

    class Backend(LinkHandler):
        def deliverMessage(self, message):
            print(message.sender, "wrote", message.body)

    client = LinkClient(reactor, "tcp:127.0.0.1:5280",
                        {"example.com": b"the secret of example.com"}, Backend())
    client.startService()

The client reconnects by itself (with backoff) when the link drops, and
sends again every request not yet answered when it does: a message is
never lost between the two (imxd's receivers drop a second copy by its
MESSAGE_ID).  A refused authentication stops the client: see
L{LinkClient.whenLinked}.
"""

from __future__ import annotations

import itertools
from typing import Any, Mapping

from twisted.application import service
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer
from twisted.internet.endpoints import clientFromString
from twisted.logger import Logger
from twisted.python.failure import Failure

from imxd.backend.link import LINK_CAPABILITIES, SECRET_LENGTHS
from imxd.callbacks import Callbacks
from imxd.peer import (
    PeerFactory,
    PeerProtocol,
    PeerSettings,
    PeerState,
    Refused,
    RemoteError,
    servingTables,
)
from imxd.presence import formatAttributes, parseAttributes
from imxd.waiters import Waiters
from imxd.wire import (
    Attributes,
    Delivered,
    DomainAttributesGet,
    ErrorCode,
    LinkAuth,
    Message,
    Notify,
    Publish,
    Report,
    Subscribe,
    SubscriptionState,
    Unsubscribe,
    UserAttributesGet,
)

__all__ = ["LinkClient", "LinkHandler", "Refused"]


class LinkHandler:
    """
    What imxd asks of a backend; override what the backend serves.  Each
    method may return its answer or a L{Deferred} of it, and refuses by
    raising (or failing with) L{imxd.peer.Refused}; the code travels back
    to the sending server.  The defaults accept and record nothing.
    """

    def deliverMessage(self, message: Message) -> Any:
        """
        A message for a user of the backend's domains (an
        L{imxd.wire.Message}: sender, recipient, messageId, contentType,
        body).  Returning means accepted.
        """

    def deliverNotification(self, notification: Notify) -> Any:
        """
        A presence change (L{imxd.wire.Notify}: publisher, subscribers,
        presence, status, attributes) for subscribers of the backend's
        domains.
        """

    def decideSubscription(self, subscriber: str, publisher: str) -> Any:
        """
        C{subscriber} asks to see C{publisher}'s presence.

        @return: C{"granted"}, C{"denied"} or C{"pending"} (decide later with
            L{LinkClient.decide}).
        """
        return "pending"

    def subscriptionChanged(self, subscriber: str, publisher: str, state: str) -> Any:
        """
        A subscription of C{subscriber}, a user of the backend, is now
        C{state} (C{pending}, C{granted}, C{denied}, C{cancelled},
        C{expired}).
        """

    def userAttributes(self, user: str, requester: str) -> Any:
        """
        @return: the C{{name: value}} attributes of C{user} that
            C{requester} may see.
        """
        return {}

    def deliveryReport(self, report: Report) -> Any:
        """
        What became of a message the backend sent (an L{imxd.wire.Report}:
        sender, recipient, messageId, and C{code}/C{text} when it failed
        for good; C{code} is L{None} when it was delivered).
        """


def _none(answer):
    return None


def _state(answer):
    return answer.state


def _attributes(answer):
    return parseAttributes(answer.attributes)


class LinkClientProtocol(PeerProtocol):
    """
    The backend's side of one link connection.
    """

    def helloDone(self):
        """
        HELLO is done: authenticate every domain, then tell the client.
        """
        asked = [
            self.request(LinkAuth(domain=domain, secret=secret))
            for domain, secret in self.factory.client.secrets.items()
        ]
        done = defer.gatherResults(asked, consumeErrors=True)
        done.addCallbacks(lambda _: self.factory.client.linked(self), self._authRefused)

    def _authRefused(self, failure):
        failure = failure.value.subFailure if isinstance(failure.value, defer.FirstError) else failure
        if self.state is not PeerState.OPEN:
            return
        if failure.check(RemoteError):
            # imxd said no: a wrong secret does not right itself.
            self.factory.client.refused(self, failure)
            self.close("authentication refused")
        else:
            # No answer in time: try again on a new connection.
            self.close("no answer to LINK_AUTH")

    def connectionLost(self, reason):
        """
        Tell the client the link is gone.
        """
        super().connectionLost(reason)
        self.factory.client.unlinked(self)

    def _handleRequest(self, record):
        """
        A request from imxd: ask the handler and answer with the outcome.
        """
        if record.response:
            self._handleResponse(record)
            return
        serve, respond = _SERVED[type(record)]
        try:
            result = serve(self.factory.client.handler, record)
            if result is not None and isinstance(result, defer.Deferred):
                self.answer(result.addCallback(respond, record), record)
                return
            response = respond(result, record)
        except Exception:
            self.answerRefusal(Failure(), record.tag, type(record))
            return
        self.answerAccepted(response, record.tag)


def _ack(result, record):
    return None


def _decision(state, record):
    if state not in ("granted", "denied", "pending"):
        raise Refused(ErrorCode.INTERNAL_ERROR, f"the backend decided {state!r}")
    return SubscriptionState(publisher=record.publisher, subscriber=record.subscriber, state=state)


def _attributesOf(values, record):
    return Attributes(target=record.target, attributes=formatAttributes(values or {}))


#: For each request imxd sends: how the handler serves it, and how its
#: result becomes the answer.
_SERVED = {
    Message: (lambda handler, r: handler.deliverMessage(r), _ack),
    Notify: (lambda handler, r: handler.deliverNotification(r), _ack),
    Subscribe: (lambda handler, r: handler.decideSubscription(r.subscriber, r.publisher), _decision),
    SubscriptionState: (
        lambda handler, r: handler.subscriptionChanged(r.subscriber, r.publisher, r.state),
        _ack,
    ),
    UserAttributesGet: (lambda handler, r: handler.userAttributes(r.target, r.requester), _attributesOf),
    Report: (lambda handler, r: handler.deliveryReport(r), _ack),
}


LinkClientProtocol.stateTables = servingTables(
    {
        **{recordClass: LinkClientProtocol._handleRequest for recordClass in _SERVED},
        Attributes: LinkClientProtocol._handleResponse,
        Delivered: LinkClientProtocol._handleAck,
    }
)
# While the client closes, a DELIVERED still completes what it answers, as
# an ACK does.
LinkClientProtocol.stateTables[PeerState.CLOSING] = {
    **LinkClientProtocol.stateTables[PeerState.CLOSING],
    Delivered: LinkClientProtocol._handleAck,
}


class _LinkClientFactory(PeerFactory):
    protocol = LinkClientProtocol

    def __init__(self, client, clock, settings, capabilities):
        super().__init__(clock, settings, originator=True, capabilities=capabilities)
        self.client = client


class LinkClient(service.Service):
    """
    A backend's link to imxd: keeps one connection up, authenticated for
    its domains, and carries its requests over it.

    @ivar handler: the L{LinkHandler} serving imxd's requests.
    @ivar secrets: the secret of each domain served, by domain.
    @ivar connection: the authenticated connection, or L{None}.
    @ivar factory: the factory of its connections (a test or a custom
        connector may build one with C{factory.buildProtocol(None)}).
    @ivar outstanding: requests sent or waiting to be sent, not yet
        answered.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        endpoint: Any,
        secrets: Mapping[str, bytes | str],
        handler: LinkHandler,
        maxRecordSize: int = 65536,
        maxDelay: float = 10.0,
        reportAnswers: bool = True,
    ):
        """
        @param reactor: the reactor to connect and time with.
        @param endpoint: an L{IStreamClientEndpoint}, or its description
            (C{"tcp:127.0.0.1:5280"}, C{"tls:imx.example.com:5281"}).
        @param secrets: the link secret of each domain to serve.
        @param handler: the L{LinkHandler}.
        @param maxRecordSize: the largest record body accepted.
        @param maxDelay: the longest wait, in seconds, between reconnection
            attempts.
        @param reportAnswers: whether to take a message's outcome as the
            answer to the MESSAGE when imxd has it before it acknowledged
            the message (C{report-answer}, protocol.md section 19.3: a
            DELIVERED answers many at once), instead of an ACK and a
            REPORT request for each; but imxd neither waits for the
            handler's L{LinkHandler.deliveryReport} to finish nor sends
            that report again.  Pass C{False} for a handler that must
            confirm each report (as the answer to a REPORT request).
        """
        if isinstance(endpoint, str):
            endpoint = clientFromString(reactor, endpoint)
        self.clock = reactor
        self.handler = handler
        self.secrets = {
            domain: secret.encode("utf-8") if isinstance(secret, str) else secret
            for domain, secret in secrets.items()
        }
        for domain, secret in self.secrets.items():
            if not SECRET_LENGTHS[0] <= len(secret) <= SECRET_LENGTHS[1]:
                raise ValueError(
                    f"the link secret of {domain} must be {SECRET_LENGTHS[0]} to "
                    f"{SECRET_LENGTHS[1]} octets"
                )
        self.connection = None
        self.outstanding: dict[int, list] = {}
        self._keys = itertools.count()
        self._linked = Waiters()
        self._refusal = None
        settings = PeerSettings(idleTimeout=0, maxRecordSize=maxRecordSize, software="imxd-link")
        capabilities = LINK_CAPABILITIES if reportAnswers else ("link",)
        self.factory = _LinkClientFactory(self, reactor, settings, capabilities)
        self._connector = ClientService(
            endpoint,
            self.factory,
            retryPolicy=backoffPolicy(initialDelay=0.2, maxDelay=maxDelay),
            clock=reactor,
        )

    # -- life -------------------------------------------------------------------

    def startService(self) -> None:
        """
        Connect, and stay connected.
        """
        super().startService()
        self._connector.startService()

    def stopService(self) -> defer.Deferred:
        """
        Close the link and stop reconnecting; requests not yet answered fail
        with C{shutting-down}.
        """
        super().stopService()
        if self.connection is not None:
            self.connection.close("the backend is stopping")
        outstanding, self.outstanding = self.outstanding, {}
        for _record, waiting, _convert in outstanding.values():
            waiting.errback(Refused(ErrorCode.SHUTTING_DOWN, "the link client stopped"))
        return self._connector.stopService()

    def whenLinked(self) -> defer.Deferred:
        """
        @return: a L{Deferred} firing with the client once every domain is
            authenticated, or failing with L{Refused} if imxd refused one.
        """
        if self._refusal is not None:
            return defer.fail(self._refusal)
        if self.connection is not None:
            return defer.succeed(self)
        return self._linked.wait()

    def linked(self, connection: LinkClientProtocol) -> None:
        """
        C{connection} authenticated every domain: send every request not
        yet answered over it, in the order they were made.
        """
        self.connection = connection
        self.log.info("linked to imxd for {domains}", domains=", ".join(sorted(self.secrets)))
        for key in list(self.outstanding):
            self._transmit(key)
        self._linked.fire(self)

    def unlinked(self, connection: LinkClientProtocol) -> None:
        """
        C{connection} is gone; the client reconnects.
        """
        if self.connection is connection:
            self.connection = None

    def refused(self, connection: LinkClientProtocol, failure: Failure) -> None:
        """
        imxd refused a domain's secret: stop, and tell whoever waits.
        """
        self.log.error("imxd refused the link: {error}", error=failure.getErrorMessage())
        self._refusal = failure.value
        self._linked.fire(failure)
        if self.running:
            self.stopService()

    # -- requests -------------------------------------------------------------------

    def _request(self, record, convert, waiting=None):
        """
        Send a request now, or once linked, and again after a lost link
        until it is answered.

        @param convert: turns the answer into the result.
        @param waiting: who hears the result: a L{Callbacks}, or (by
            default) a new L{Deferred}, which is returned.
        """
        if waiting is None:
            waiting = defer.Deferred()
        key = next(self._keys)
        self.outstanding[key] = [record, waiting, convert]
        if self.connection is not None:
            self._transmit(key)
        return waiting

    def _transmit(self, key):
        self.connection.requestThen(self.outstanding[key][0], self._answered, self._failed, (key,))

    def _answered(self, answer, key):
        entry = self.outstanding.pop(key, None)
        if entry is None:
            return
        record, waiting, convert = entry
        if type(record) is Message and type(answer) in (Delivered, Report):
            # report-answer: accepted, and already delivered (or failed).
            if type(answer) is Delivered:
                answer = Report(sender=record.sender, recipient=record.recipient, messageId=record.messageId)
            waiting.callback(None)
            self._reportAnswered(answer)
            return
        try:
            result = convert(answer)
        except Exception:
            # An answer that is not the one expected fails the request.
            waiting.errback(Failure())
            return
        waiting.callback(result)

    def _reportAnswered(self, report):
        """
        Hand the handler the outcome that answered a MESSAGE, as if it had
        come as a REPORT request (a failure of the handler is logged).
        """
        try:
            taken = self.handler.deliveryReport(report)
        except Exception:
            taken = defer.fail()
        if isinstance(taken, defer.Deferred):
            taken.addErrback(self._reportNotTaken)

    def _reportNotTaken(self, failure):
        self.log.failure("the handler failed to take a delivery report", failure)

    def _failed(self, failure, key):
        if not failure.check(RemoteError):
            # The link closed first, or the answer timed out: sent again
            # now if the link is up, else once it is back.
            connection = self.connection
            if key in self.outstanding and connection is not None and connection.state is PeerState.OPEN:
                self._transmit(key)
            return None
        entry = self.outstanding.pop(key, None)
        if entry is not None:
            entry[1].errback(failure)

    def sendMessage(self, message: Message) -> defer.Deferred:
        """
        Send a message from a user of one of the backend's domains.

        @param message: an L{imxd.wire.Message}; its MESSAGE_ID must be
            unique for the sender's domain.
        @return: a L{Deferred} firing with L{None} once imxd has accepted
            it (queued it durably, or already has its outcome; the outcome
            follows in L{LinkHandler.deliveryReport}), or failing with
            L{Refused}.
        """
        return self._request(message, _none)

    def sendMessageThen(self, message: Message, onAccepted, onFailure, *args) -> None:
        """
        L{sendMessage}, calling C{onAccepted(None, *args)} or
        C{onFailure(failure, *args)} once instead of returning a
        L{Deferred} (for a gateway sending many messages).
        """
        self._request(message, _none, Callbacks(onAccepted, onFailure, args))

    def subscribe(self, subscriber: str, publisher: str) -> defer.Deferred:
        """
        C{subscriber} wants C{publisher}'s presence.

        @return: a L{Deferred} firing with the first state.
        """
        return self._request(Subscribe(subscriber=subscriber, publisher=publisher), _state)

    def unsubscribe(self, subscriber: str, publisher: str) -> defer.Deferred:
        """
        Cancel a subscription.
        """
        return self._request(Unsubscribe(subscriber=subscriber, publisher=publisher), _none)

    def decide(self, publisher: str, subscriber: str, grant: bool) -> defer.Deferred:
        """
        C{publisher} decides a pending request.
        """
        state = "granted" if grant else "denied"
        decision = SubscriptionState(publisher=publisher, subscriber=subscriber, state=state)
        return self._request(decision, _none)

    def publishPresence(
        self, user: str, presence: str, status: str | None = None, attributes: Mapping | None = None
    ) -> defer.Deferred:
        """
        C{user}'s presence changed: imxd notifies every subscriber.
        """
        record = Publish(
            user=user,
            presence=presence,
            status=status,
            attributes=formatAttributes(attributes or {}),
        )
        return self._request(record, _none)

    def remoteAttributes(self, requester: str, target: str) -> defer.Deferred:
        """
        Ask for the attributes of C{target} (an address or a domain).

        @return: a L{Deferred} firing with a C{{name: value}} dict.
        """
        recordType = UserAttributesGet if "@" in target else DomainAttributesGet
        return self._request(recordType(requester=requester, target=target), _attributes)
