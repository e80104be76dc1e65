"""
Presence, subscriptions and attributes for one hosted domain (draft 4.5,
4.4.5, 4.4.6, 4.6.1; C{docs/protocol.md} sections 12.3-12.5 and 13).

Both sides of a subscription live here:

 - as **publisher's server**, the domain keeps the subscriptions to its
   users, each with an expiry (the domain's C{subscription-timeout} at
   most), asks the backend to decide new requests, and fans a presence
   change out as one NOTIFY per subscriber domain;
 - as **subscriber's server**, it requests the subscriptions its users want,
   renews them before they lapse for as long as the user wants them, and
   tells the backend when one lapses (presence C{unknown}).

Attribute requests are answered here too, with presence given only to
requesters the user granted (6.2.2 item 1), and remote answers are cached
for the TTL given (at most L{MAX_ATTRIBUTE_TTL}).

Both sides, and the presence each user published last, are kept in the
process's database (L{imxd.store.SubscriptionStore}) as they change, and
taken up again by L{Presence.start}, so that they survive a restart of
either server.
"""

from __future__ import annotations

import random

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from imxd.address import Address, AddressError
from imxd.peer import Refused, RemoteError
from imxd.store import SubscriptionStore
from imxd import wire
from imxd.wire import Attributes, ErrorCode, Notify, SubscriptionState

#: Recipients per NOTIFY at most, so that one fits the smallest MAX_RECORD.
NOTIFY_BATCH = 50

#: Renew when this share of a granted subscription's lifetime has passed.
RENEW_AT = 0.8

#: Seconds between tries to re-establish a subscription that failed.
RETRY_INTERVAL = 30.0

#: Seconds over which the wanted subscriptions are asked for again after
#: a start, at random, so that many do not leave in one burst.
RESUME_SPREAD = 10.0

#: Seconds an attribute answer from another server is cached at most.
MAX_ATTRIBUTE_TTL = 300

#: Seconds other servers may cache this domain's attribute answers.
ATTRIBUTE_TTL = 60

#: The attributes only subscribers the user granted may see.
PRIVATE_ATTRIBUTES = frozenset({"presence", "status"})

PRESENCE_STATES = ("online", "away", "busy", "offline")

#: The states a SUBSCRIPTION_STATE may carry (protocol.md 12.3).
SUBSCRIPTION_STATES = ("pending", "granted", "denied", "cancelled", "expired")


@attrs.define
class Subscription:
    """
    A subscription to one of this domain's users (publisher side).

    @ivar state: C{pending} or C{granted}.
    @ivar expiry: clock seconds when it lapses unless renewed.
    @ivar origin: the ORIGIN the subscriber's server asked to be copied.
    """

    state: str
    expiry: float
    requested: int
    origin: str | None = None


@attrs.define
class Wanted:
    """
    A subscription one of this domain's users wants (subscriber side).

    @ivar state: C{requesting}, C{pending}, C{granted} or C{lapsed}.
    @ivar expiry: when the granted subscription lapses, or L{None}.
    @ivar timer: the next renewal or retry.
    """

    state: str = "requesting"
    expiry: float | None = None
    timer: object = None


def parseAttributes(lines):
    """
    @param lines: C{name=value} strings.
    @return: a C{{name: value}} dict (malformed lines are skipped).
    """
    result = {}
    for line in lines:
        name, equals, value = line.partition("=")
        if equals and name:
            result[name] = value
    return result


def formatAttributes(values):
    """
    @return: C{name=value} strings, sorted by name.
    """
    return tuple(f"{name}={value}" for name, value in sorted(values.items()))


class Presence:
    """
    Subscriptions, presence and attributes of one hosted domain.
    """

    log = Logger()

    def __init__(self, domain):
        """
        @param domain: the L{imxd.aggregator.VirtualDomain}.
        """
        self.domain = domain
        self._subscriptions: dict[str, dict[str, Subscription]] = {}
        self._current: dict[str, tuple[str, str | None]] = {}
        self._published: dict[str, tuple[str, ...]] = {}
        self._wanted: dict[tuple[str, str], Wanted] = {}
        self._attributeCache: dict[tuple[str, str], tuple[float, dict]] = {}
        self._sending: dict[tuple[str, str], object] = {}
        self._store = None
        self._stopped = False

    def start(self):
        """
        The domain starts serving: take up what the database kept for it
        (nothing when the domain is not part of an Aggregator with one).

        Publisher side: subscriptions past their expiry are dropped, the
        others are live again (presence fans out to them, renewals are
        accepted), and so is the presence each user published last.

        Subscriber side: every wanted subscription, whatever its state, is
        asked for again with a SUBSCRIBE within L{RESUME_SPREAD} seconds,
        at random.  A SUBSCRIBE rather than a RENEW, even for a granted
        one: the publisher's server answers a SUBSCRIBE it grants with the
        current presence (protocol.md section 12, "on grant"; imxd does so
        for one already granted too), and this domain's backend, which
        restarted with imxd, needs it now rather than at the next change.
        The SUBSCRIBE renews as well.  A granted subscription whose stored
        expiry passes before it is renewed is reported lapsed (presence
        C{unknown}) as at any other time.
        """
        self._stopped = False
        database = getattr(self.domain.parent, "database", None)
        if database is None:
            return
        self._store = SubscriptionStore(database, self.domain.name)
        stored = self._store.load()
        now = self.clock.seconds()
        self._subscriptions.clear()
        for publisher, subscriber, state, expiry, requested, origin in stored.subscribers:
            if expiry <= now:
                self._store.removeSubscriber(publisher, subscriber)
                continue
            table = self._subscriptions.setdefault(publisher, {})
            table[subscriber] = Subscription(state, expiry, requested, origin)
        self._wanted.clear()
        for subscriber, publisher, state, expiry in stored.wanted:
            key = (subscriber, publisher)
            wanted = self._wanted[key] = Wanted(state, expiry)
            self._schedule(wanted, random.uniform(0, RESUME_SPREAD), key, wire.Subscribe)
        for user, presence, status, attributes in stored.published:
            self._current[user] = (presence, status)
            self._published[user] = attributes

    def stop(self):
        """
        The domain stops: cancel the renewals, retries and pending initial
        presence, and from now on schedule none and write nothing (the
        database may be closed next); what is stored is taken up again by
        the next L{start}.
        """
        self._stopped = True
        self._store = None
        for wanted in self._wanted.values():
            self._cancel(wanted)
        for call in self._sending.values():
            if call.active():
                call.cancel()
        self._sending.clear()

    @property
    def clock(self):
        return self.domain.clock

    @property
    def backend(self):
        return self.domain.backend

    def _own(self, address, what="address"):
        """
        @return: the canonical form of an address of this domain.
        @raise Refused: C{sender-mismatch} for an address of another domain,
            C{malformed} for one that is not an address.
        """
        try:
            parsed = Address.parse(address)
        except AddressError as e:
            raise Refused(ErrorCode.MALFORMED, f"{what}: {e}") from None
        if parsed.domain != self.domain.name:
            raise Refused(
                ErrorCode.SENDER_MISMATCH,
                f"{address} is not an address of {self.domain.name}",
            )
        return str(parsed)

    # -- publisher side -------------------------------------------------------

    def subscribers(self, publisher):
        """
        @return: the live granted subscribers of C{publisher}, sorted.
        """
        now = self.clock.seconds()
        table = self._subscriptions.get(publisher, {})
        for subscriber in [s for s, sub in table.items() if sub.expiry <= now]:
            del table[subscriber]
            self._keepSubscriber(publisher, subscriber)
        return sorted(s for s, sub in table.items() if sub.state == "granted")

    def allowed(self, publisher, requester):
        """
        @return: whether C{requester} may see C{publisher}'s presence: the
            user themself, or a live granted subscriber.
        """
        if requester == publisher:
            return True
        subscription = self._subscriptions.get(publisher, {}).get(requester)
        return (
            subscription is not None
            and subscription.state == "granted"
            and subscription.expiry > self.clock.seconds()
        )

    def _lifetime(self, requested):
        timeout = self.domain.config.subscriptionTimeout
        return min(requested, timeout) if requested else timeout

    @defer.inlineCallbacks
    def subscribeRequest(self, record):
        """
        SUBSCRIBE or RENEW for one of this domain's users.  A subscription
        granted now, or a SUBSCRIBE for one already granted, is followed by
        the current presence (a RENEW is not).

        @return: a L{Deferred} firing with the L{SubscriptionState} answer.
        """
        publisher = self._own(record.publisher, "TO")
        subscriber = str(Address.parse(record.subscriber))
        table = self._subscriptions.setdefault(publisher, {})
        existing = table.get(subscriber)
        now = self.clock.seconds()
        if existing is not None and existing.expiry <= now:
            del table[subscriber]
            self._keepSubscriber(publisher, subscriber)
            existing = None
        lifetime = self._lifetime(record.expires)
        if existing is not None and existing.state == "granted":
            existing.expiry = now + lifetime
            self._keepSubscriber(publisher, subscriber)
            if not isinstance(record, wire.Renew):
                self._sendSoon(publisher, subscriber)
            return self._state(publisher, subscriber, "granted", lifetime, record.origin)
        if isinstance(record, wire.Renew):
            raise Refused(
                ErrorCode.NOT_SUBSCRIBED,
                f"{subscriber} has no subscription to {publisher}",
            )
        if existing is not None:
            existing.expiry = now + lifetime
            self._keepSubscriber(publisher, subscriber)
            return self._state(publisher, subscriber, "pending", None, record.origin)
        decision = yield defer.maybeDeferred(
            self.backend.decideSubscription, subscriber, publisher
        )
        if decision not in ("granted", "denied", "pending"):
            raise Refused(ErrorCode.INTERNAL_ERROR, f"backend decided {decision!r}")
        if decision == "denied":
            return self._state(publisher, subscriber, "denied", None, record.origin)
        table[subscriber] = Subscription(
            decision, self.clock.seconds() + lifetime, record.expires or 0, record.origin
        )
        self._keepSubscriber(publisher, subscriber)
        if decision == "granted":
            self._sendSoon(publisher, subscriber)
            return self._state(publisher, subscriber, "granted", lifetime, record.origin)
        return self._state(publisher, subscriber, "pending", None, record.origin)

    def _state(self, publisher, subscriber, state, expires, origin):
        return SubscriptionState(
            publisher=publisher,
            subscriber=subscriber,
            state=state,
            expires=int(expires) if expires is not None else None,
            origin=origin,
        )

    def unsubscribeRequest(self, record):
        """
        UNSUBSCRIBE: forget the subscription (there may be none).
        """
        publisher = self._own(record.publisher, "TO")
        subscriber = str(Address.parse(record.subscriber))
        if self._subscriptions.get(publisher, {}).pop(subscriber, None) is not None:
            self._keepSubscriber(publisher, subscriber)

    def decide(self, publisher, subscriber, grant):
        """
        The publisher's decision on a pending request; the subscriber's
        server is told with a SUBSCRIPTION_STATE request.

        @raise Refused: C{not-subscribed} when no request is pending.
        """
        try:
            publisher = self._own(publisher)
        except Refused as e:
            return defer.fail(e)
        table = self._subscriptions.get(publisher, {})
        subscription = table.get(subscriber)
        if subscription is None or subscription.expiry <= self.clock.seconds():
            return defer.fail(
                Refused(ErrorCode.NOT_SUBSCRIBED, f"no request from {subscriber} is pending")
            )
        if grant:
            lifetime = self._lifetime(subscription.requested)
            subscription.state = "granted"
            subscription.expiry = self.clock.seconds() + lifetime
            state = self._state(publisher, subscriber, "granted", lifetime, subscription.origin)
        else:
            del table[subscriber]
            state = self._state(publisher, subscriber, "denied", None, subscription.origin)
        self._keepSubscriber(publisher, subscriber)
        told = self.domain.route(state)
        if grant:
            told.addCallback(lambda answer: self._sendCurrent(publisher, subscriber))
        return told

    def _keepSubscriber(self, publisher, subscriber):
        """
        Write a subscription to one of this domain's users as it now is
        (removed when it is gone).
        """
        if self._store is None:
            return
        subscription = self._subscriptions.get(publisher, {}).get(subscriber)
        if subscription is None:
            self._store.removeSubscriber(publisher, subscriber)
        else:
            self._store.putSubscriber(
                publisher,
                subscriber,
                subscription.state,
                subscription.expiry,
                subscription.requested,
                subscription.origin,
            )

    def _sendSoon(self, publisher, subscriber):
        """
        Send the current presence right after the answer that grants it.
        """
        if self._stopped:
            return
        key = (publisher, subscriber)
        previous = self._sending.get(key)
        if previous is not None and previous.active():
            return

        def send():
            del self._sending[key]
            self._sendCurrent(publisher, subscriber)

        self._sending[key] = self.clock.callLater(0, send)

    def _sendCurrent(self, publisher, subscriber):
        """
        On grant the subscriber gets the current presence.
        """
        presence, status = self._current.get(publisher, ("offline", None))
        notify = Notify(
            publisher=publisher,
            subscribers=(subscriber,),
            presence=presence,
            status=status,
            attributes=self._published.get(publisher, ()),
        )
        return self.domain.route(notify).addErrback(self._logFailure, "initial presence")

    def publish(self, user, presence, status=None, attributes=None):
        """
        C{user}'s presence changed: one NOTIFY per subscriber domain (at
        most L{NOTIFY_BATCH} recipients each), carrying C{attributes}
        unsolicited.

        @return: a L{Deferred} firing with the number of NOTIFY records
            sent once each has been answered (failures are logged).
        """
        try:
            user = self._own(user)
        except Refused as e:
            return defer.fail(e)
        self._current[user] = (presence, status)
        self._published[user] = formatAttributes(attributes or {})
        if self._store is not None:
            self._store.putPublished(user, presence, status, self._published[user])
        byDomain = {}
        for subscriber in self.subscribers(user):
            byDomain.setdefault(subscriber.rsplit("@", 1)[1], []).append(subscriber)
        sent = []
        for domain, subscribers in sorted(byDomain.items()):
            for start in range(0, len(subscribers), NOTIFY_BATCH):
                notify = Notify(
                    publisher=user,
                    subscribers=tuple(subscribers[start : start + NOTIFY_BATCH]),
                    presence=presence,
                    status=status,
                    attributes=self._published[user],
                )
                sent.append(
                    self.domain.route(notify).addErrback(
                        self._logFailure, f"NOTIFY to {domain}"
                    )
                )
        return defer.gatherResults(sent).addCallback(lambda _: len(sent))

    def current(self, user):
        """
        @return: C{(presence, status)} last published by C{user}.
        """
        return self._current.get(user, ("offline", None))

    # -- subscriber side ------------------------------------------------------

    def subscribe(self, subscriber, publisher):
        """
        C{subscriber} wants C{publisher}'s presence until it unsubscribes.

        @return: a L{Deferred} firing with the first state.
        """
        try:
            key = self._wantedKey(subscriber, publisher)
        except Refused as e:
            return defer.fail(e)
        if key not in self._wanted:
            self._wanted[key] = Wanted()
            self._keepWanted(key)
        return self._request(key, wire.Subscribe)

    def _wantedKey(self, subscriber, publisher):
        """
        @return: C{(subscriber, publisher)} canonical, the subscriber of
            this domain.
        @raise Refused: C{sender-mismatch} or C{malformed}.
        """
        subscriber = self._own(subscriber)
        try:
            return subscriber, str(Address.parse(publisher))
        except AddressError as e:
            raise Refused(ErrorCode.MALFORMED, f"publisher: {e}") from None

    def _request(self, key, recordType):
        """
        Send SUBSCRIBE or RENEW for a wanted subscription and act on the
        answer.
        """
        subscriber, publisher = key
        record = recordType(subscriber=subscriber, publisher=publisher)
        answered = self.domain.route(record)
        answered.addCallbacks(
            self._answered, self._requestFailed, callbackArgs=(key,), errbackArgs=(key, recordType)
        )
        return answered

    def _answered(self, answer, key):
        wanted = self._wanted.get(key)
        if wanted is None:
            return answer.state if isinstance(answer, SubscriptionState) else None
        self._apply(key, wanted, answer.state, answer.expires)
        return answer.state

    def _requestFailed(self, failure, key, recordType):
        wanted = self._wanted.get(key)
        if wanted is None:
            return failure
        if failure.check(RemoteError) and failure.value.code == ErrorCode.NOT_SUBSCRIBED:
            return self._request(key, wire.Subscribe)
        if failure.check(Refused) and not failure.value.temporary:
            self._apply(key, wanted, "denied", None)
            return failure
        self._schedule(wanted, RETRY_INTERVAL, key, recordType)
        self._lapseIfDue(key, wanted)
        return failure

    def _apply(self, key, wanted, state, expires):
        """
        A new state for a wanted subscription: tell the backend, schedule
        the renewal, or forget it.
        """
        subscriber, publisher = key
        self._cancel(wanted)
        if state == "granted":
            lifetime = expires or self.domain.config.subscriptionTimeout
            wanted.expiry = self.clock.seconds() + lifetime
            self._schedule(wanted, lifetime * RENEW_AT, key, wire.Renew)
        elif state in ("denied", "cancelled"):
            del self._wanted[key]
        elif state == "expired":
            wanted.expiry = None
            self._schedule(wanted, 0, key, wire.Subscribe)
        changed = state != wanted.state
        wanted.state = state
        self._keepWanted(key)
        if changed:
            defer.maybeDeferred(
                self.backend.subscriptionChanged, subscriber, publisher, state
            ).addErrback(self._logFailure, "subscription change")

    def _keepWanted(self, key):
        """
        Write a subscription one of this domain's users wants as it now is
        (removed when it is no longer wanted).
        """
        if self._store is None:
            return
        wanted = self._wanted.get(key)
        if wanted is None:
            self._store.removeWanted(*key)
        else:
            self._store.putWanted(*key, wanted.state, wanted.expiry)

    def _schedule(self, wanted, delay, key, recordType):
        self._cancel(wanted)
        if self._stopped:
            return
        wanted.timer = self.clock.callLater(delay, self._due, key, recordType)

    def _cancel(self, wanted):
        if wanted.timer is not None and wanted.timer.active():
            wanted.timer.cancel()
        wanted.timer = None

    def _due(self, key, recordType):
        wanted = self._wanted.get(key)
        if wanted is None:
            return
        wanted.timer = None
        self._lapseIfDue(key, wanted)
        self._request(key, recordType).addErrback(lambda failure: None)

    def _lapseIfDue(self, key, wanted):
        """
        A granted subscription past its expiry has lapsed: the user's view
        of the publisher's presence becomes C{unknown}.
        """
        if wanted.state == "granted" and wanted.expiry is not None:
            if wanted.expiry <= self.clock.seconds():
                subscriber, publisher = key
                wanted.state = "lapsed"
                self._keepWanted(key)
                notify = Notify(
                    publisher=publisher, subscribers=(subscriber,), presence="unknown"
                )
                defer.maybeDeferred(self.backend.deliverNotification, notify).addErrback(
                    self._logFailure, "lapse notice"
                )

    def unsubscribe(self, subscriber, publisher):
        """
        Stop wanting a subscription and tell the publisher's server.
        """
        try:
            subscriber, publisher = self._wantedKey(subscriber, publisher)
        except Refused as e:
            return defer.fail(e)
        wanted = self._wanted.pop((subscriber, publisher), None)
        if wanted is not None:
            self._cancel(wanted)
            self._keepWanted((subscriber, publisher))
        told = self.domain.route(wire.Unsubscribe(subscriber=subscriber, publisher=publisher))
        return told.addErrback(self._logFailure, "UNSUBSCRIBE")

    def stateRequest(self, record):
        """
        A SUBSCRIPTION_STATE request from the publisher's server: a later
        decision, or the end of a subscription.
        """
        subscriber = self._own(record.subscriber, "TO")
        publisher = str(Address.parse(record.publisher))
        if record.state not in SUBSCRIPTION_STATES:
            raise Refused(ErrorCode.MALFORMED, f"unknown subscription state {record.state!r}")
        key = (subscriber, publisher)
        wanted = self._wanted.get(key)
        if wanted is None:
            return None
        self._apply(key, wanted, record.state, record.expires)
        return None

    def notified(self, record):
        """
        A NOTIFY for users of this domain: handed to the backend for the
        recipients who want the publisher's presence; others are ignored.
        """
        publisher = str(Address.parse(record.publisher))
        recipients = []
        for subscriber in record.subscribers:
            subscriber = self._own(subscriber, "TO")
            wanted = self._wanted.get((subscriber, publisher))
            if wanted is not None and wanted.state in ("granted", "requesting", "pending"):
                recipients.append(subscriber)
        if not recipients:
            return defer.succeed(None)
        notify = attrs.evolve(record, tag=0, subscribers=tuple(recipients))
        return defer.maybeDeferred(self.backend.deliverNotification, notify)

    # -- attributes -------------------------------------------------------------

    def domainAttributes(self):
        """
        @return: this domain's attributes (section 13).
        """
        config = self.domain.config
        server = self.domain.serverConfig
        values = {
            "subscription-timeout": str(config.subscriptionTimeout),
            "max-message-size": str(config.maxMessageSize),
            "accepted-types": ",".join(config.acceptedTypes),
        }
        if server is not None:
            values["max-record-size"] = str(server.limits.maxRecordSize)
            values["idle-timeout"] = f"{server.timeouts.idle:g}"
            if server.limits.domainRate:
                values["rate-limit"] = f"{server.limits.domainRate}/1"
        return values

    @defer.inlineCallbacks
    def attributesRequest(self, record):
        """
        USER_ATTRIBUTES_GET or DOMAIN_ATTRIBUTES_GET for this domain.

        @return: a L{Deferred} firing with the L{Attributes} answer.
        """
        requester = record.requester
        if isinstance(record, wire.DomainAttributesGet):
            values = self.domainAttributes()
        else:
            target = self._own(record.target, "TARGET")
            values = yield self.userAttributes(target, requester)
        if record.names:
            values = {n: v for n, v in values.items() if n in record.names}
        return Attributes(
            target=record.target, attributes=formatAttributes(values), ttl=ATTRIBUTE_TTL
        )

    @defer.inlineCallbacks
    def userAttributes(self, user, requester):
        """
        The attributes of C{user} that C{requester} may see: the backend's,
        without presence unless C{requester} is allowed it.
        """
        values = yield defer.maybeDeferred(self.backend.userAttributes, user, requester)
        values = {k: str(v) for k, v in dict(values).items()}
        for name in PRIVATE_ATTRIBUTES:
            values.pop(name, None)
        if self.allowed(user, requester):
            presence, status = self.current(user)
            values["presence"] = presence
            if status:
                values["status"] = status
        values.setdefault("max-message-size", str(self.domain.config.maxMessageSize))
        return values

    def remoteAttributes(self, requester, target):
        """
        Ask for the attributes of C{target} (an address or a domain) on
        behalf of C{requester}; answers are cached for their TTL (at most
        L{MAX_ATTRIBUTE_TTL} seconds).
        """
        try:
            requester = self._own(requester)
        except Refused as e:
            return defer.fail(e)
        key = (requester, target)
        now = self.clock.seconds()
        cached = self._attributeCache.get(key)
        if cached is not None and cached[0] > now:
            return defer.succeed(dict(cached[1]))
        recordType = wire.UserAttributesGet if "@" in target else wire.DomainAttributesGet
        asked = self.domain.route(recordType(requester=requester, target=target))

        def remember(answer):
            values = parseAttributes(answer.attributes)
            ttl = min(answer.ttl or 0, MAX_ATTRIBUTE_TTL)
            if ttl:
                self._pruneCache(now)
                self._attributeCache[key] = (now + ttl, values)
            return dict(values)

        return asked.addCallback(remember)

    def _pruneCache(self, now):
        if len(self._attributeCache) > 10000:
            for key in [k for k, (expiry, _) in self._attributeCache.items() if expiry <= now]:
                del self._attributeCache[key]

    # -- receiving ------------------------------------------------------------------

    def receive(self, record):
        """
        Data other than MESSAGE for this domain, from a peer or from another
        hosted domain.

        @return: a L{Deferred} firing with the response record, or L{None}
            for an ACK.
        """
        handler = _HANDLERS[type(record)]
        return defer.maybeDeferred(handler, self, record)

    def _logFailure(self, failure, what):
        self.log.info(
            "{domain}: {what} failed: {why}",
            domain=self.domain.name,
            what=what,
            why=failure.getErrorMessage(),
        )
        return None


_HANDLERS = {
    wire.Subscribe: Presence.subscribeRequest,
    wire.Renew: Presence.subscribeRequest,
    wire.Unsubscribe: Presence.unsubscribeRequest,
    SubscriptionState: Presence.stateRequest,
    Notify: Presence.notified,
    wire.UserAttributesGet: Presence.attributesRequest,
    wire.DomainAttributesGet: Presence.attributesRequest,
}
