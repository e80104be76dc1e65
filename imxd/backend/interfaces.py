"""
Interfaces between imxd and backend adapters.

L{IBackend} is what imxd asks of a backend.  This is its first part; reading
user attributes, deciding subscription requests and the interface for what a
backend asks of imxd come in later work.
"""

from zope.interface import Attribute, Interface


class IBackend(Interface):
    """
    A private IM system bridged to one hosted domain.

    Every method returns a L{twisted.internet.defer.Deferred}.  It fires with
    L{None} once the backend has taken responsibility for the item (stored or
    handed to the recipient), or fails when the backend refuses it; the
    failure is reported back to the sending server, never dropped.
    """

    domain = Attribute("The normalised name of the hosted domain served.")

    def start(sender):
        """
        imxd is ready: the backend may now send.  Called once when the
        hosted domain starts.

        @param sender: the hosted domain's
            L{imxd.aggregator.VirtualDomain}; its C{sendMessage} routes a
            message from a user of this domain.
        @return: L{None}, or a L{Deferred} that fires when the backend is
            ready.
        """

    def stop():
        """
        imxd is stopping: stop sending and release resources.

        @return: L{None}, or a L{Deferred} that fires when done.
        """

    def deliverMessage(message):
        """
        Deliver a message that arrived for a user of this domain.

        @param message: the message: its envelope (sender, recipients, id)
            and its body, which servers do not parse in transit.
        @return: a L{Deferred} that fires with L{None} when the backend has
            accepted the message, or fails with the reason it refused it.
        """

    def deliverNotification(notification):
        """
        Deliver a notification (for example a presence change) to users of
        this domain.

        @param notification: the notification: its sender, its recipients
            in this domain and its content.
        @return: a L{Deferred} that fires with L{None} when the backend has
            accepted the notification, or fails with the reason it refused
            it.
        """
