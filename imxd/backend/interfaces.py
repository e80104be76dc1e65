"""
Interfaces between imxd and backend adapters.

L{IBackend} is what imxd asks of a backend (one per hosted domain).
L{IDomainService} is what a backend asks of imxd: the hosted domain's
L{imxd.aggregator.VirtualDomain}, handed to the backend in
L{IBackend.start}.  Addresses are canonical C{local@domain} strings.  Every
method that can take time returns a L{twisted.internet.defer.Deferred}; a
refusal is a failure with L{imxd.peer.Refused}, whose code travels back to
the sender (never a silent drop).
"""

from zope.interface import Attribute, Interface

#: Subscription decisions a backend may give.
DECISIONS = ("granted", "denied", "pending")


class IBackend(Interface):
    """
    A private IM system bridged to one hosted domain.
    """

    domain = Attribute("The normalised name of the hosted domain served.")

    def start(sender):
        """
        imxd is ready: the backend may now call C{sender}.  Called once when
        the hosted domain starts.

        @param sender: the hosted domain, an L{IDomainService}.
        @return: L{None}, or a L{Deferred} that fires when the backend is
            ready.
        """

    def stop():
        """
        imxd is stopping: stop calling it and release resources.

        @return: L{None}, or a L{Deferred} that fires when done.
        """

    def deliverMessage(message):
        """
        Deliver a message that arrived for a user of this domain.

        @param message: an L{imxd.wire.Message} (tag 0): envelope (sender,
            recipient, messageId), contentType and body, which servers do
            not parse in transit.
        @return: a L{Deferred} that fires with L{None} when the backend has
            accepted the message (delivered or stored), or fails with
            L{imxd.peer.Refused} (C{unknown-user}, C{blocked},
            C{recipient-unavailable}, ...).  imxd hands each MESSAGE_ID of
            a sending domain over once; only if imxd is killed between the
            backend's acceptance and its own record of it can the same
            message come a second time, so a backend that can should take
            a repeated C{(sender, messageId)} as the message it already
            has.
        """

    def deliveryReport(message, refusal):
        """
        What became of a message this domain sent (one the backend gave
        L{IDomainService.sendMessage} and imxd accepted): delivered to the
        receiving server, or failed for good.  Called once per accepted
        message, after a restart of imxd too.

        @param message: the L{imxd.wire.Message} as it was sent.
        @param refusal: L{None} when delivered, else the L{imxd.peer.Refused}
            saying why it was not (its code and text; a message given up
            after C{give_up_after} carries the last temporary error).
        @return: L{None} or a L{Deferred}.
        """

    def deliverNotification(notification):
        """
        Deliver a presence change to users of this domain who subscribed to
        the publisher.

        @param notification: an L{imxd.wire.Notify}: publisher, subscribers
            (all of this domain), presence (C{online}, C{away}, C{busy},
            C{offline}, or C{unknown} when a subscription lapsed) and
            status.
        @return: a L{Deferred} firing with L{None} once accepted.
        """

    def decideSubscription(subscriber, publisher):
        """
        Someone asks to see the presence of C{publisher}, a user of this
        domain.

        @return: a L{Deferred} firing with C{"granted"}, C{"denied"} or
            C{"pending"} (the user decides later, through
            L{IDomainService.decide}), or failing with C{unknown-user}.
        """

    def subscriptionChanged(subscriber, publisher, state):
        """
        A subscription of C{subscriber}, a user of this domain, changed
        state: C{pending}, C{granted}, C{denied}, C{cancelled} or
        C{expired}.

        @return: L{None} or a L{Deferred}.
        """

    def userAttributes(user, requester):
        """
        The attributes of C{user}, a user of this domain, that C{requester}
        may see (section 13 of C{docs/protocol.md}: C{alias}, C{presence},
        C{status}, C{capabilities}, C{max-message-size}, ...).  imxd itself
        removes C{presence} and C{status} for requesters without a granted
        subscription (6.2.2 item 1).

        @return: a L{Deferred} firing with a C{{name: value}} dict, or
            failing with C{unknown-user}.
        """


class IFastBackend(IBackend):
    """
    A backend that also takes messages without a L{Deferred}, for the
    per-message path of a busy domain (the C{link} adapter does).  imxd
    uses C{deliverMessageThen} when a backend has it.
    """

    def deliverMessageThen(message, onAccepted, onFailure, *args):
        """
        L{IBackend.deliverMessage}, calling C{onAccepted(None, *args)} or
        C{onFailure(failure, *args)} once instead of returning a
        L{Deferred}.  C{message} may still carry the tag it had on the
        peer connection (copying it to clear the tag would cost more than
        the rest of the call); the tag means nothing here.
        """


class IDomainService(Interface):
    """
    What a backend asks of imxd for its hosted domain.  Every address the
    backend acts for must be of this domain (C{sender-mismatch} otherwise).
    """

    name = Attribute("The normalised name of the hosted domain.")
    clock = Attribute("An IReactorTime provider, for backends that schedule work.")

    def sendMessage(message):
        """
        Send a message from a user of this domain.

        @param message: an L{imxd.wire.Message} with tag 0; its MESSAGE_ID
            must be unique for the sender's domain (receivers drop a second
            message with the same id as a duplicate).
        @return: a L{Deferred} firing with L{None} once imxd has accepted
            the message (written to its durable queue), or failing with
            L{imxd.peer.Refused} when it is refused at once (C{malformed},
            C{sender-mismatch}, C{rate-limited}, C{resource-limit}).  The
            outcome of an accepted message comes later, in
            L{IBackend.deliveryReport}.
        """

    def sendMessageThen(message, onAccepted, onFailure, *args, onOutcome=None):
        """
        L{sendMessage}, calling C{onAccepted(None, *args)} or
        C{onFailure(failure, *args)} once, instead of returning a
        L{Deferred}: for adapters whose every message passes here (imxd's
        link listener uses it).  The message's tag is ignored (it may be
        the one it had on the adapter's own connection).

        @param onOutcome: L{None}, or C{onOutcome(domain, message, refusal,
            *args)}, offered the message's outcome (C{refusal} L{None}:
            delivered) if it is known before the message is accepted.
            Returning true means it told the sender both, and neither
            C{onAccepted} nor the delivery report follows; returning false
            (or an implementation that never offers it) leaves both to
            come as usual.
        """

    def subscribe(subscriber, publisher):
        """
        C{subscriber} wants C{publisher}'s presence, for as long as it does
        not unsubscribe: imxd requests and renews the subscription.

        @return: a L{Deferred} firing with the first state (C{granted},
            C{pending} or C{denied}).
        """

    def unsubscribe(subscriber, publisher):
        """
        Stop renewing and cancel the subscription.

        @return: a L{Deferred} firing when the publisher's server has been
            told (or at once if it could not be reached).
        """

    def decide(publisher, subscriber, grant):
        """
        The user C{publisher} decides a pending request.

        @param grant: C{True} to grant, C{False} to deny.
        @return: a L{Deferred} firing once the subscriber's server has been
            told.
        """

    def publishPresence(user, presence, status=None, attributes=None):
        """
        C{user}'s presence changed: notify every live subscriber, one NOTIFY
        per remote domain.

        @param attributes: the user's attributes to send unsolicited with
            the NOTIFY (4.6.1), a C{{name: value}} dict, or L{None}.

        @return: a L{Deferred} firing once every domain has been handed its
            notification (failures are logged, not raised).
        """

    def remoteAttributes(requester, target):
        """
        Ask for the attributes of C{target} (an address or a domain) on
        behalf of C{requester}, a user of this domain.  Answers are cached
        for the TTL the answering server gives (at most 5 minutes).

        @return: a L{Deferred} firing with a C{{name: value}} dict.
        """
