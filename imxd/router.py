"""
The router: where a Data record goes.

Data from a hosted domain's backend goes to another hosted domain in
process (requirement 6: it never touches the network) or to the outbound
pool; Data arriving from a peer goes to the backend of the hosted domain it
is for.  Nothing is relayed (4.3.3): a peer's Data for a domain not hosted
here is refused before it gets this far.  A hosted domain may send only as
its own addresses.
"""

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from imxd.address import Address, AddressError, normaliseDomain
from imxd.peer import Refused
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


def _domainOf(text, field, domainAllowed):
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


def dataPair(record):
    """
    The domain pair a Data record travels for: the domain of its sender
    and the domain of its recipients.

    @return: C{(originDomain, receivingDomain)}, canonical.
    @raise Refused: C{malformed} for a bad address, a MESSAGE_ID that is not
        printable ASCII, or a NOTIFY whose recipients are in several domains.
    """
    origin, recipient = _ENVELOPES[type(record)]
    domainOnly = isinstance(record, DomainAttributesGet)
    originDomain = _domainOf(getattr(record, origin), "FROM", domainOnly)
    recipients = getattr(record, recipient)
    if isinstance(recipients, str):
        recipients = (recipients,)
    field = "TARGET" if recipient == "target" else "TO"
    domains = {_domainOf(each, field, domainOnly) for each in recipients}
    if len(domains) != 1:
        raise Refused(
            ErrorCode.MALFORMED, "the TO addresses of a NOTIFY span several domains"
        )
    if isinstance(record, Message):
        messageId = record.messageId
        if not all(0x21 <= ord(c) <= 0x7E for c in messageId):
            raise Refused(ErrorCode.MALFORMED, "MESSAGE_ID is not printable ASCII")
    return originDomain, domains.pop()


class Router:
    """
    Routes Data between hosted domains, their backends and the outbound
    pool.
    """

    log = Logger()

    def __init__(self, aggregator, pool):
        """
        @param aggregator: the L{imxd.aggregator.Aggregator} (hosted domains).
        @param pool: the L{imxd.pool.OutboundPool} for remote domains.
        """
        self.aggregator = aggregator
        self.pool = pool

    def send(self, record, fromDomain):
        """
        Send a Data record on behalf of the hosted domain C{fromDomain}.

        @return: a L{Deferred} firing when the receiving server (or, for a
            domain hosted here, its backend) has accepted the record, or
            failing with L{Refused}.
        """
        try:
            origin, receiving = dataPair(record)
        except Refused as e:
            return defer.fail(e)
        if origin != fromDomain:
            return defer.fail(
                Refused(
                    ErrorCode.SENDER_MISMATCH,
                    f"{fromDomain} may send only as its own addresses",
                )
            )
        if self.aggregator.domain(receiving) is not None:
            return self.deliver(record, origin, receiving)
        return self.pool.send((origin, receiving), record)

    def deliver(self, record, origin, receiving):
        """
        Hand a record for a hosted domain to that domain (its backend, or
        its presence service), without the tag it had on its connection.

        @param origin: the authenticated (or hosted) origin domain.
        @param receiving: the hosted domain it is for.
        @return: a L{Deferred} firing once it has been accepted, with the
            response record for requests that have one (L{None} for an
            ACK), or failing with L{Refused}.
        """
        domain = self.aggregator.domain(receiving)
        if domain is None:
            return defer.fail(
                Refused(ErrorCode.RELAY_DENIED, f"{receiving} is not hosted here")
            )
        if origin in domain.config.policy.blockedDomains:
            return defer.fail(
                Refused(ErrorCode.BLOCKED, f"{receiving} does not accept traffic from {origin}")
            )
        if record.tag:
            record = attrs.evolve(record, tag=0)
        return domain.receive(record)
