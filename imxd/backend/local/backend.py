"""
The C{local} backend adapter: imxd's embedded IM service.

Each hosted domain with C{backend = "local"} gets one L{LocalBackend}.  Its
users, contacts and decisions live in an L{AccountStore}; its clients reach
it through the HTTP API of L{imxd.backend.local.api} and read what arrives
for them as events (C{docs/client-api.md}).  Messages and delivery failures
for a user without an open event stream are kept, capped and expired with
a bounce (a MESSAGE from C{postmaster@domain}, C{docs/protocol.md} 12.6).
"""

from __future__ import annotations

import os
import secrets
from typing import Any, Mapping

from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from imxd import content
from imxd.address import POSTMASTER, Address, AddressError
from imxd.backend import BackendError, listenOption, refuseUnknownOptions
from imxd.backend.interfaces import IBackend
from imxd.backend.local.store import AccountError, AccountStore
from imxd.peer import Refused
from imxd.presence import PRESENCE_STATES, formatAttributes, parseAttributes
from imxd.wire import ErrorCode, Message

#: The client API's listen address unless configured: loopback only.
DEFAULT_LISTEN = "tcp:8280:interface=127.0.0.1"

#: Event streams one user may hold open at once.
MAX_STREAMS_PER_USER = 8

#: Seconds an event written to a stream stays replayable by Last-Event-ID
#: (a half-open TCP connection can take minutes to notice; a client that
#: reconnects within this time gets what it may have missed).
REPLAY_GRACE = 86400.0

#: Subscription requests waiting for one user's decision, at most.
MAX_PENDING_REQUESTS = 100

#: Seconds between housekeeping runs (expiry, pruning).
HOUSEKEEPING_INTERVAL = 60.0

#: The headers of a delivery failure report (protocol.md 12.6).
FAILURE_HEADER = "X-IMX-Failure"
FAILED_ID_HEADER = "X-IMX-Failed-Id"
FAILED_TO_HEADER = "X-IMX-Failed-To"

#: What imxd's own clients can do, as the C{capabilities} attribute.
CAPABILITIES = "text/plain,text/html-lite,presence"

_LIFETIMES = {
    "session_lifetime": ("sessionLifetime", 86400, 60, 31 * 86400),
    "offline_lifetime": ("offlineLifetime", 7 * 86400, 60, 365 * 86400),
}


def validateOptions(options: Mapping[str, Any], baseDirectory: str = ".") -> dict:
    """
    Check the options of a C{local} backend.

    @param options: C{database} (required: the SQLite file, relative to
        C{baseDirectory}), C{listen} (the client API's endpoint, default
        L{DEFAULT_LISTEN}), C{session_lifetime} and C{offline_lifetime}
        (seconds).
    @return: C{{"database", "listen", "sessionLifetime", "offlineLifetime"}}.
    @raise ValueError: naming the first problem.
    """
    refuseUnknownOptions(options, {"database", "listen", *_LIFETIMES})
    database = options.get("database")
    if not isinstance(database, str) or not database:
        raise ValueError("database: required, the path of the SQLite file")
    listen = listenOption(options, DEFAULT_LISTEN)
    result = {
        "database": os.path.normpath(os.path.join(baseDirectory, database)),
        "listen": listen,
    }
    for option, (name, default, low, high) in _LIFETIMES.items():
        value = options.get(option, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{option}: expected a number of seconds")
        if not low <= value <= high:
            raise ValueError(f"{option}: must be from {low} to {high} seconds")
        result[name] = float(value)
    return result


def canonical(text, what="address"):
    """
    @return: the canonical form of an address.
    @raise Refused: C{malformed}.
    """
    try:
        return str(Address.parse(text))
    except (AddressError, TypeError) as e:
        raise Refused(ErrorCode.MALFORMED, f"{what}: {e}") from None


def failureOf(failure):
    """
    @return: C{(token, text, temporary)} describing why a request failed.
    """
    if failure.check(Refused):
        error = failure.value
        return error.token, error.text or error.token, error.temporary
    return "internal-error", failure.getErrorMessage(), True


@implementer(IBackend)
class LocalBackend:
    """
    One hosted domain served by imxd's embedded service.

    @ivar domain: the normalised name of the hosted domain.
    @ivar store: its L{AccountStore}.
    @ivar listen: the client API's endpoint description.
    """

    log = Logger()

    def __init__(
        self,
        domain: str,
        store: AccountStore,
        listen: str = DEFAULT_LISTEN,
        sessionLifetime: float = 86400.0,
        offlineLifetime: float = 7 * 86400.0,
        maxMessageSize: int = 32768,
    ) -> None:
        self.domain = domain
        self.store = store
        self.listen = listen
        self.sessionLifetime = sessionLifetime
        self.offlineLifetime = offlineLifetime
        self.maxMessageSize = maxMessageSize
        self.sender: Any = None
        self.clock: Any = None
        self._streams: dict[str, list] = {}
        self._presenceSeen: dict[tuple[str, str], tuple[str, str | None]] = {}
        self._ownPresence: dict[str, str] = {}
        self._housekeeping: Any = None

    @classmethod
    def fromConfig(cls, domainConfig: Any) -> "LocalBackend":
        """
        Build the backend of a hosted domain and open its store.

        @raise BackendError: the store cannot be opened.
        """
        options = domainConfig.backendOptions
        try:
            store = AccountStore(options["database"])
        except Exception as e:
            raise BackendError(
                f"{domainConfig.name}: local database {options['database']}: {e}"
            ) from None
        return cls(
            domainConfig.name,
            store,
            options["listen"],
            options["sessionLifetime"],
            options["offlineLifetime"],
            domainConfig.maxMessageSize,
        )

    # -- IBackend -------------------------------------------------------------

    def start(self, sender: Any) -> None:
        """
        Resume the subscriptions users want and start housekeeping; see
        L{IBackend.start}.
        """
        self.sender = sender
        self.clock = sender.clock
        self.clock.callLater(0, self.resume)
        self._housekeeping = task.LoopingCall(self.housekeeping)
        self._housekeeping.clock = self.clock
        self._housekeeping.start(HOUSEKEEPING_INTERVAL, now=False)

    def stop(self) -> None:
        """
        Stop housekeeping, close every stream and the store; see
        L{IBackend.stop}.
        """
        if self._housekeeping is not None and self._housekeeping.running:
            self._housekeeping.stop()
        for streams in list(self._streams.values()):
            for stream in list(streams):
                stream.close()
        self._streams.clear()
        self.store.close()

    def deliverMessage(self, message: Message) -> defer.Deferred:
        """
        Check the recipient's edge policy (unknown user, blocks,
        only-granted), then keep the message and write it to the
        recipient's open streams; see L{IBackend.deliverMessage}.
        """
        return defer.execute(self._deliver, message)

    def _deliver(self, message):
        recipient = canonical(message.recipient, "TO")
        sender = canonical(message.sender, "FROM")
        self._known(recipient)
        body = content.read(message.body)
        declared = content.mediaTypeOf(message.contentType)
        if body.mediaType != declared or declared not in content.MEDIA_TYPES:
            raise Refused(
                ErrorCode.MEDIA_TYPE_REFUSED,
                f"{self.domain} shows only text/plain and text/html-lite, declared"
                f" alike in CONTENT_TYPE and the body (got {declared}, {body.mediaType})",
            )
        if body.mediaType == content.HTML_LITE:
            body = content.Content(
                body.mediaType, body.contentType, body.body,
                content.sanitiseHtmlLite(body.text), body.headers,
            )
        headers = dict(body.headers)
        report = self._failureReport(sender, headers, body.text)
        if self.store.isBlocked(recipient, sender):
            raise Refused(ErrorCode.BLOCKED, f"{recipient} does not accept messages from {sender}")
        if (
            report is None
            and self.store.onlyGranted(recipient)
            and self.store.decision(recipient, sender) != "granted"
        ):
            raise Refused(
                ErrorCode.BLOCKED,
                f"{recipient} accepts messages only from contacts it granted",
            )
        if report is not None:
            self.push(recipient, "delivery-failure", report, keep=True)
            return
        self.push(
            recipient,
            "message",
            {
                "id": message.messageId,
                "from": sender,
                "to": recipient,
                "type": body.mediaType,
                "body": body.text,
                "headers": headers,
                "attributes": parseAttributes(message.attributes or ()),
            },
            keep=True,
        )

    def _failureReport(self, sender, headers, text):
        """
        @return: the C{delivery-failure} event data when the message is a
            failure report from the postmaster of the failed recipient's
            domain, else L{None}.
        """
        failedId = headers.get(FAILED_ID_HEADER)
        failedTo = headers.get(FAILED_TO_HEADER, "")
        local, _, domain = sender.rpartition("@")
        if failedId is None or local != POSTMASTER:
            return None
        if failedTo.rpartition("@")[2].lower() != domain:
            return None
        return {
            "id": failedId,
            "to": failedTo,
            "error": headers.get(FAILURE_HEADER, "unknown"),
            "message": text,
        }

    def deliverNotification(self, notification) -> defer.Deferred:
        """
        Remember the publisher's presence for each recipient and write a
        C{presence} event to their streams; see
        L{IBackend.deliverNotification}.
        """
        publisher = notification.publisher
        seen = (notification.presence, notification.status)
        event = self._presenceEvent(publisher, *seen)
        event["attributes"] = parseAttributes(notification.attributes or ())
        for subscriber in notification.subscribers:
            self._presenceSeen[(subscriber, publisher)] = seen
            self.push(subscriber, "presence", event)
        return defer.succeed(None)

    @staticmethod
    def _presenceEvent(publisher, presence, status):
        return {"from": publisher, "state": presence, "status": status}

    def decideSubscription(self, subscriber: str, publisher: str) -> defer.Deferred:
        """
        A remembered decision answers at once; otherwise the request is
        pending and the publisher gets a C{subscription-request} event; see
        L{IBackend.decideSubscription}.
        """
        return defer.execute(self._decide, subscriber, publisher)

    def _decide(self, subscriber, publisher):
        self._known(publisher)
        if self.store.isBlocked(publisher, subscriber):
            raise Refused(ErrorCode.BLOCKED, f"{publisher} does not accept requests from {subscriber}")
        remembered = self.store.decision(publisher, subscriber)
        if remembered in ("granted", "denied"):
            return remembered
        if remembered is None and len(self.store.pendingRequests(publisher)) >= MAX_PENDING_REQUESTS:
            raise Refused(ErrorCode.RESOURCE_LIMIT, f"{publisher} has too many requests waiting")
        self.store.setDecision(publisher, subscriber, "pending")
        self.push(publisher, "subscription-request", {"from": subscriber})
        return "pending"

    def subscriptionChanged(self, subscriber: str, publisher: str, state: str) -> None:
        """
        Remember the state of a subscription the user wants and tell their
        streams; see L{IBackend.subscriptionChanged}.
        """
        if publisher in self.store.contacts(subscriber):
            self.store.setContact(subscriber, publisher, state)
        self.push(subscriber, "subscription-state", {"to": publisher, "state": state})

    def userAttributes(self, user: str, requester: str) -> defer.Deferred:
        """
        C{alias} and C{capabilities} (imxd adds presence for requesters
        the user granted); see L{IBackend.userAttributes}.
        """
        def known():
            self._known(user)
            return self._attributes(user)

        return defer.execute(known)

    def _attributes(self, user):
        values = {"capabilities": CAPABILITIES}
        alias = self.store.alias(user)
        if alias:
            values["alias"] = alias
        return values

    def _known(self, user):
        if not self.store.exists(user):
            raise Refused(ErrorCode.UNKNOWN_USER, f"no such user: {user}")

    # -- what clients ask (through the API) -----------------------------------

    def sendMessage(self, user, to, text, mediaType=content.PLAIN, headers=()):
        """
        Compose and send a message from C{user}; a later failure reaches
        the user as a C{delivery-failure} event.

        @return: a L{Deferred} firing with the message id once imxd has
            accepted the message (durably queued), or failing with
            L{Refused} (C{rate-limited}, C{resource-limit}, ...).
        @raise Refused: the message is refused at once (C{malformed},
            C{media-type-refused}, C{message-too-large}).
        """
        to = canonical(to, "to")
        body = content.compose(user, to, text, mediaType, headers, self.maxMessageSize)
        messageId = secrets.token_hex(16)
        message = Message(
            sender=user,
            recipient=to,
            messageId=messageId,
            contentType=body.contentType,
            body=body.body,
            attributes=formatAttributes({"alias": a} if (a := self.store.alias(user)) else {}),
        )
        return self.sender.sendMessage(message).addCallback(lambda _: messageId)

    def deliveryReport(self, message, refusal):
        """
        A message a user sent failed for good: tell the user with a
        C{delivery-failure} event; see L{IBackend.deliveryReport}.  Reports
        on failure reports themselves are only logged.
        """
        if refusal is None:
            return
        if message.sender.rpartition("@")[0] == POSTMASTER:
            self._reportLost(message.recipient, str(refusal))
            return
        self._reportFailure(
            message.sender, message.recipient, message.messageId,
            refusal.token, refusal.text or refusal.token, refusal.temporary,
        )

    def _reportFailure(self, user, to, messageId, token, text, temporary):
        self.log.info(
            "{domain}: message {id} from {user} to {to} failed: {why}",
            domain=self.domain, id=messageId, user=user, to=to, why=f"{token}: {text}",
        )
        event = {"id": messageId, "to": to, "error": token, "message": text,
                 "temporary": temporary}
        try:
            self.push(user, "delivery-failure", event, keep=True)
        except Refused:
            self.log.warn("{user}: delivery failure for {id} not kept: too many waiting",
                          user=user, id=messageId)

    def setPresence(self, user, state, status=None):
        """
        Publish C{user}'s presence to their granted subscribers.
        """
        if state not in PRESENCE_STATES:
            raise Refused(ErrorCode.MALFORMED, f"state must be one of {', '.join(PRESENCE_STATES)}")
        self._ownPresence[user] = state
        self.sender.publishPresence(user, state, status, self._attributes(user)).addErrback(
            lambda failure: self.log.info(
                "{user}: presence not published: {why}", user=user, why=failure.getErrorMessage()
            )
        )

    @defer.inlineCallbacks
    def subscribe(self, user, to):
        """
        C{user} wants C{to}'s presence.

        @return: a L{Deferred} firing with the first state (C{requesting}
            when the other server could not be reached yet), or failing
            with L{Refused} when refused for good.
        """
        to = canonical(to, "to")
        if to not in self.store.contacts(user):
            self.store.setContact(user, to, "requesting")
        try:
            state = yield self.sender.subscribe(user, to)
        except Refused as e:
            if e.temporary:
                return "requesting"
            self.store.removeContact(user, to)
            raise
        self.store.setContact(user, to, state)
        return state

    def unsubscribe(self, user, to):
        """
        C{user} no longer wants C{to}'s presence.
        """
        to = canonical(to, "address")
        self.store.removeContact(user, to)
        self._presenceSeen.pop((user, to), None)
        return self.sender.unsubscribe(user, to)

    def decide(self, user, subscriber, grant):
        """
        C{user} decides C{subscriber}'s request (or decides in advance).
        """
        subscriber = canonical(subscriber, "address")
        self.store.setDecision(user, subscriber, "granted" if grant else "denied")
        return self.sender.decide(user, subscriber, grant).addErrback(
            lambda failure: None if failure.check(Refused) else failure
        )

    def attributes(self, user, target):
        """
        The attributes of C{target} (an address or a domain) C{user} may see.
        """
        return self.sender.remoteAttributes(user, target)

    # -- events -----------------------------------------------------------------

    def push(self, user, name, data, keep=False):
        """
        Write an event to C{user}'s open streams; with C{keep}, store it
        first so that it survives until a client has read it.

        @raise Refused: C{recipient-unavailable} when too many are kept.
        """
        eventId = None
        if keep:
            try:
                eventId = self.store.keep(
                    user, {"event": name, "data": data}, self.clock.seconds()
                )
            except AccountError as e:
                raise Refused(ErrorCode.RECIPIENT_UNAVAILABLE, str(e)) from None
        streams = self._streams.get(user, ())
        for stream in streams:
            stream.send(name, data, eventId)
        if streams and eventId is not None:
            self.store.delivered(user, eventId, self.clock.seconds())

    def checkStreamLimit(self, user):
        """
        @raise Refused: C{resource-limit} when C{user} has
            L{MAX_STREAMS_PER_USER} streams open.
        """
        if len(self._streams.get(user, ())) >= MAX_STREAMS_PER_USER:
            raise Refused(ErrorCode.RESOURCE_LIMIT, f"{MAX_STREAMS_PER_USER} event streams are open")

    def openStream(self, user, stream, lastEventId=0):
        """
        A client of C{user} opened an event stream: forget what it has
        read, replay what is kept, then send the current state.

        @raise Refused: C{resource-limit} with too many streams open.
        """
        self.checkStreamLimit(user)
        streams = self._streams.setdefault(user, [])
        if lastEventId:
            self.store.forget(user, lastEventId)
        last = 0
        for eventId, event in self.store.kept(user, lastEventId):
            stream.send(event["event"], event["data"], eventId)
            last = eventId
        if last:
            self.store.delivered(user, last, self.clock.seconds())
        for contact, state in sorted(self.store.contacts(user).items()):
            stream.send("subscription-state", {"to": contact, "state": state})
            seen = self._presenceSeen.get((user, contact))
            if seen is not None:
                stream.send("presence", self._presenceEvent(contact, *seen))
        for subscriber in self.store.pendingRequests(user):
            stream.send("subscription-request", {"from": subscriber})
        streams.append(stream)

    def closeStream(self, user, stream):
        """
        A stream closed; when it was the user's last, their presence
        becomes C{offline}.
        """
        streams = self._streams.get(user, [])
        if stream in streams:
            streams.remove(stream)
        if not streams:
            self._streams.pop(user, None)
            if self._ownPresence.get(user, "offline") != "offline" and self.sender is not None:
                self.setPresence(user, "offline")

    # -- upkeep -------------------------------------------------------------------

    def resume(self):
        """
        Ask again for every subscription the domain's users want (after a
        restart); imxd renews them from then on.
        """
        for owner, contact in self.store.allContacts(self.domain):
            self.sender.subscribe(owner, contact).addErrback(lambda failure: None)

    def housekeeping(self):
        """
        Drop events read long enough ago, and return messages kept past
        C{offlineLifetime} to their senders.
        """
        now = self.clock.seconds()
        try:
            self.store.pruneDelivered(now - REPLAY_GRACE)
            expired = self.store.expire(self.domain, now - self.offlineLifetime)
        except Exception:
            self.log.failure("{domain}: housekeeping failed; next try in a minute",
                             domain=self.domain)
            return
        for owner, event in expired:
            if event["event"] == "message":
                self.bounce(event["data"], "recipient-unavailable",
                            "not read within the time messages are kept")

    def bounce(self, message, token, text):
        """
        Tell the sender of a message that was accepted but cannot be
        delivered: a report from C{postmaster@domain} (protocol.md 12.6).
        Reports are never bounced themselves.
        """
        sender, recipient = message["from"], message["to"]
        if sender.rpartition("@")[0] == POSTMASTER:
            return
        postmaster = f"{POSTMASTER}@{self.domain}"
        body = content.compose(
            postmaster,
            sender,
            f"Your message to {recipient} could not be delivered: {text}.",
            headers=(
                (FAILURE_HEADER, token),
                (FAILED_ID_HEADER, message["id"]),
                (FAILED_TO_HEADER, recipient),
            ),
        )
        report = Message(
            sender=postmaster,
            recipient=sender,
            messageId=secrets.token_hex(16),
            contentType=body.contentType,
            body=body.body,
        )
        self.sender.sendMessage(report).addErrback(
            lambda failure: self._reportLost(sender, failure.getErrorMessage())
        )

    def _reportLost(self, to, why):
        self.log.info(
            "{domain}: failure report to {to} not delivered: {why}",
            domain=self.domain, to=to, why=why,
        )

    def __repr__(self) -> str:
        return f"<LocalBackend {self.domain} {self.store.path}>"
