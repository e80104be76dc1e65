"""
The router: where a Data record goes.

Data from a hosted domain's backend goes to another hosted domain in
process (requirement 6: it never touches the network) or to the outbound
pool; a MESSAGE goes through the durable outbox first (L{imxd.outbox}).
Data arriving from a peer goes to the backend of the hosted domain it is
for, a MESSAGE at most once per MESSAGE_ID and origin domain within the
dedupe window.  Nothing is relayed (4.3.3): a peer's Data for a domain not
hosted here is refused before it gets this far.  A hosted domain may send
only as its own addresses, each account within its rate limit.
"""

import collections

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from imxd.address import POSTMASTER, Address, AddressError, normaliseDomain
from imxd.peer import Refused
from imxd.ratelimit import RateLimiter
from imxd.wire import EncodeError, withTag
from imxd.wire import (
    DomainAttributesGet,
    ErrorCode,
    Message,
    Notify,
    Renew,
    Subscribe,
    SubscriptionState,
    Unsubscribe,
    UserAttributesGet,
)

#: For each Data record class: the attributes naming its origin and its
#: recipient (section 12 of docs/protocol.md).
_ENVELOPES = {
    Message: ("sender", "recipient"),
    Subscribe: ("subscriber", "publisher"),
    Renew: ("subscriber", "publisher"),
    Unsubscribe: ("subscriber", "publisher"),
    SubscriptionState: ("publisher", "subscriber"),
    Notify: ("publisher", "subscribers"),
    UserAttributesGet: ("requester", "target"),
    DomainAttributesGet: ("requester", "target"),
}


def domainOf(text, field, domainAllowed):
    """
    @return: the canonical domain of an address (or, where allowed, of a
        bare domain).
    @raise Refused: C{malformed}, naming the field.
    """
    try:
        if domainAllowed and "@" not in text:
            return normaliseDomain(text)
        return Address.parse(text).domain
    except AddressError as e:
        raise Refused(ErrorCode.MALFORMED, f"{field}: {e}") from None


def printableId(messageId):
    """
    @return: whether C{messageId} is a string of printable ASCII, 0x21 to
        0x7e, and not empty.
    """
    return (
        type(messageId) is str
        and messageId.isascii()
        and messageId.isprintable()
        and bool(messageId)
        and " " not in messageId
    )


def dataPair(record):
    """
    The domain pair a Data record travels for: the domain of its sender
    and the domain of its recipients.

    @return: C{(originDomain, receivingDomain)}, canonical.
    @raise Refused: C{malformed} for a bad address, a MESSAGE_ID that is not
        printable ASCII, or a NOTIFY whose recipients are in several domains.
    """
    recordType = type(record)
    if recordType is Message:
        # The per-message path: two addresses seen before, as a rule.
        try:
            pair = (Address.parse(record.sender).domain, Address.parse(record.recipient).domain)
        except AddressError:
            pass
        else:
            if not printableId(record.messageId):
                raise Refused(ErrorCode.MALFORMED, "MESSAGE_ID is not printable ASCII")
            return pair
    origin, recipient = _ENVELOPES[recordType]
    domainOnly = recordType is DomainAttributesGet
    originDomain = domainOf(getattr(record, origin), "FROM", domainOnly)
    recipients = getattr(record, recipient)
    field = "TARGET" if recipient == "target" else "TO"
    if isinstance(recipients, str):
        receiving = domainOf(recipients, field, domainOnly)
    else:
        domains = {domainOf(each, field, domainOnly) for each in recipients}
        if len(domains) != 1:
            raise Refused(
                ErrorCode.MALFORMED, "the TO addresses of a NOTIFY span several domains"
            )
        receiving = domains.pop()
    if recordType is Message and not printableId(record.messageId):
        raise Refused(ErrorCode.MALFORMED, "MESSAGE_ID is not printable ASCII")
    return originDomain, receiving


#: Seconds between two prunings of the dedupe table.
PRUNE_INTERVAL = 600.0


class Router:
    """
    Routes Data between hosted domains, their backends, the outbox and the
    outbound pool.

    @ivar outbox: the L{imxd.outbox.Outbox} messages are queued in, once
        attached.
    @ivar duplicates: MESSAGEs acknowledged but not delivered again.
    """

    log = Logger()

    def __init__(self, aggregator, pool, clock, seen, dedupeWindow, maxInProgress=1000):
        """
        @param aggregator: the L{imxd.aggregator.Aggregator} (hosted domains).
        @param pool: the L{imxd.pool.OutboundPool} for remote domains.
        @param clock: an L{IReactorTime} provider.
        @param seen: the L{imxd.store.interfaces.ISeenStore} of MESSAGE_IDs
            received.
        @param dedupeWindow: seconds a MESSAGE_ID is remembered.
        @param maxInProgress: records one hosted domain may be handling at
            once from one sending domain; more are refused for now
            (C{resource-limit}), so a slow backend slows its senders
            without holding up other domains, and a busy sender does not
            hold up the others.
        """
        self.aggregator = aggregator
        self.pool = pool
        self.clock = clock
        self.seen = seen
        self.dedupeWindow = dedupeWindow
        self.outbox = None
        self.duplicates = 0
        self.busyRefusals = 0
        self.maxInProgress = maxInProgress
        self._inProgress = collections.Counter()
        self._delivering = {}
        self._accountLimits = {}
        self._pruner = None
        self._pruneMore = None

    def start(self):
        """
        Prune the dedupe table now and every L{PRUNE_INTERVAL} seconds.
        """
        self._pruner = task.LoopingCall(self.prune)
        self._pruner.clock = self.clock
        self._pruner.start(PRUNE_INTERVAL, now=True)

    def stop(self):
        """
        Stop pruning.
        """
        if self._pruner is not None and self._pruner.running:
            self._pruner.stop()
        if self._pruneMore is not None and self._pruneMore.active():
            self._pruneMore.cancel()

    def prune(self):
        """
        Forget the MESSAGE_IDs older than the dedupe window, a chunk at a
        time until none is left; the next chunk is read once the last one
        is committed (read before, it would be the same rows again).
        """
        if self.seen.prune(self.clock.seconds() - self.dedupeWindow):
            self.seen.whenCommitted(self._pruneNext, self._pruneNext)

    def _pruneNext(self, _):
        if self._pruner is not None and self._pruner.running:
            self._pruneMore = self.clock.callLater(0, self.prune)

    def _checked(self, record, fromDomain):
        """
        @return: the C{(origin, receiving)} pair of a record a hosted domain
            sends.
        @raise Refused: C{malformed}, or C{sender-mismatch} when it is not
            from an address of C{fromDomain}.
        """
        origin, receiving = dataPair(record)
        if origin != fromDomain:
            raise Refused(
                ErrorCode.SENDER_MISMATCH, f"{fromDomain} may send only as its own addresses"
            )
        return origin, receiving

    def send(self, record, fromDomain):
        """
        Send a Data record on behalf of the hosted domain C{fromDomain}, in
        one try, without queueing (presence and attribute requests).

        @return: a L{Deferred} firing when the receiving server (or, for a
            domain hosted here, its backend) has accepted the record, or
            failing with L{Refused}.
        """
        try:
            origin, receiving = self._checked(record, fromDomain)
        except Refused as e:
            return defer.fail(e)
        return self.transmit(origin, receiving, record)

    def submit(self, message, fromDomain):
        """
        Accept a MESSAGE from the hosted domain C{fromDomain}: check it and
        the sender's rate limit, then queue it durably in the outbox.

        @return: a L{Deferred} firing with L{None} once the message is
            accepted (a delivery report follows through the backend's
            C{deliveryReport}), or failing with L{Refused}.
        """
        accepted = defer.Deferred()
        self.submitThen(message, fromDomain, accepted.callback, accepted.errback)
        return accepted

    def submitThen(self, message, fromDomain, onAccepted, onFailure, args=(), onOutcome=None):
        """
        L{submit}, calling C{onAccepted(None, *args)} or C{onFailure(failure,
        *args)} instead of returning a L{Deferred} (the per-message path);
        C{onOutcome} as for L{Outbox.submitThen}.  C{args} is a tuple,
        handed on as it is (cheaper than C{*args} at each step).
        """
        try:
            origin, receiving = self._checked(message, fromDomain)
            self._withinRate(message.sender, fromDomain)
            # The outbox encodes the message to store it: EncodeError.
            self.outbox.submitThen(origin, receiving, message, onAccepted, onFailure, args, onOutcome)
        except Refused:
            onFailure(Failure(), *args)
        except EncodeError as e:
            onFailure(Failure(Refused(ErrorCode.MALFORMED, f"cannot be sent: {e}")), *args)

    def _withinRate(self, sender, fromDomain):
        """
        @raise Refused: C{rate-limited}, when C{sender} is over its
            domain's C{account_rate}.  The domain's postmaster (failure
            reports) is never limited.
        """
        limiter = self._accountLimits.get(fromDomain)
        if limiter is None:
            policy = self.aggregator.domain(fromDomain).config.policy
            limiter = self._accountLimits[fromDomain] = RateLimiter(
                self.clock, policy.accountRate, policy.accountBurst, policy.rateExempt
            )
        if not limiter.rate:
            # No limit: not even the address is parsed again.
            return
        sender = str(Address.parse(sender))
        if sender.rpartition("@")[0] == POSTMASTER:
            return
        retryAfter = limiter.take(sender)
        if retryAfter is not None:
            raise Refused(
                ErrorCode.RATE_LIMITED,
                f"{sender} sends more than {limiter.rate} messages a second",
                retryAfter=retryAfter,
            )

    def transmit(self, origin, receiving, record):
        """
        Hand a checked record to a domain hosted here or to the pool, once.

        @return: a L{Deferred} firing with the answer, or failing with
            L{Refused}.
        """
        if self.aggregator.domain(receiving) is not None:
            return self.deliver(record, origin, receiving)
        return self.pool.send((origin, receiving), record)

    def transmitThen(self, origin, receiving, record, onAnswer, onFailure, args=()):
        """
        L{transmit}, calling C{onAnswer(answer, *args)} or
        C{onFailure(failure, *args)} (C{args} a tuple); a record for a
        remote domain makes no L{Deferred} on a connection already
        authenticated for the pair (the outbox's per-message path).
        """
        if self.aggregator.domain(receiving) is not None:
            self.deliverThen(record, origin, receiving, onAnswer, onFailure, args)
        else:
            self.pool.sendThen((origin, receiving), record, onAnswer, onFailure, args)

    def deliver(self, record, origin, receiving):
        """
        Hand a record for a hosted domain to that domain (its backend, or
        its presence service), without the tag it had on its connection.
        A MESSAGE whose MESSAGE_ID was already received from C{origin}
        within the dedupe window is acknowledged without being delivered
        again; one that is still being delivered gets the first copy's
        answer.

        @param origin: the authenticated (or hosted) origin domain.
        @param receiving: the hosted domain it is for.
        @return: a L{Deferred} firing once it has been accepted (for a
            MESSAGE: and its id durably remembered), with the response
            record for requests that have one (L{None} for an ACK), or
            failing with L{Refused}.
        """
        handled = defer.Deferred()
        self.deliverThen(record, origin, receiving, handled.callback, handled.errback)
        return handled

    def deliverThen(self, record, origin, receiving, onAnswer, onFailure, args=()):
        """
        L{deliver}, calling C{onAnswer(answer, *args)} or C{onFailure(failure,
        *args)} (C{args} a tuple) instead of returning a L{Deferred} (the
        per-message path of a receiving server).
        """
        domain = self.aggregator.domain(receiving)
        pair = (origin, receiving)
        if domain is None:
            refusal = Refused(ErrorCode.RELAY_DENIED, f"{receiving} is not hosted here")
        elif origin in domain.config.policy.blockedDomains:
            refusal = Refused(ErrorCode.BLOCKED, f"{receiving} does not accept traffic from {origin}")
        elif self._inProgress[pair] >= self.maxInProgress:
            self.busyRefusals += 1
            refusal = Refused(
                ErrorCode.RESOURCE_LIMIT,
                f"{receiving} is handling {self.maxInProgress} requests from {origin}; "
                "try again shortly",
                retryAfter=1,
            )
        else:
            refusal = None
        if refusal is not None:
            onFailure(Failure(refusal), *args)
            return
        self._inProgress[pair] += 1
        waiting = (pair, onAnswer, onFailure, args)
        if not isinstance(record, Message):
            domain.receive(withTag(record, 0) if record.tag else record).addBoth(
                self._handled, waiting
            )
            return
        key = (origin, record.messageId)
        copies = self._delivering.get(key)
        if copies is not None:
            copies.append(waiting)
            return
        if self.seen.contains(*key):
            self.duplicates += 1
            self._handled(None, waiting)
            return
        self._delivering[key] = []
        domain.receiveMessageThen(record, self._remember, self._settled, (key, waiting))

    def _remember(self, _, key, waiting):
        """
        The backend took a MESSAGE: remember its id, and answer once that
        is durable.
        """
        try:
            self.seen.add(*key, self.clock.seconds())
        except Exception:
            self._settled(Failure(), key, waiting)
            return
        self.seen.whenCommitted(self._settled, self._settled, key, waiting)

    def _settled(self, outcome, key, waiting):
        """
        A MESSAGE is delivered (and its id remembered), or failed: answer
        it, and the copies that came meanwhile.
        """
        copies = self._delivering.pop(key)
        if not isinstance(outcome, Failure):
            self.duplicates += len(copies)
        self._handled(outcome, waiting)
        for copy in copies:
            self._handled(outcome, copy)

    def _handled(self, outcome, waiting):
        """
        Answer one delivery with C{outcome} (a result or a L{Failure}).
        """
        pair, onAnswer, onFailure, args = waiting
        self._inProgress[pair] -= 1
        if not self._inProgress[pair]:
            del self._inProgress[pair]
        try:
            if isinstance(outcome, Failure):
                onFailure(outcome, *args)
            else:
                onAnswer(outcome, *args)
        except Exception:
            # The other copies of the message are still answered.
            self.log.failure("answering a delivery to {domain} failed", domain=pair[1])
