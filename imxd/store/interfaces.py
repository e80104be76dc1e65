"""
What imxd asks of the stores behind its outbound queue and its dedupe
table, so that a shared database can replace the SQLite ones.
"""

from zope.interface import Interface


class IOutboundStore(Interface):
    """
    The durable outbound queue: every message accepted from a backend
    until it is acknowledged or given up.
    """

    def add(origin, remote, record, accepted):
        """
        Keep a message: written with a later grouped commit, unless it is
        removed before that commit is put together.

        @return: its L{imxd.store.QueuedMessage}, with a sequence number
            that orders it after every message added before.
        """

    def whenWritten(seq, onWritten, onFailure, *args):
        """
        Call C{onWritten(None, *args)} once the message numbered C{seq}
        (just added: before the next commit is put together) is durable,
        or C{onFailure(failure, *args)} if the commit that was to write it
        failed; neither if it is removed before it is written, or if it is
        not waiting to be written.
        """

    def remove(seq):
        """
        Forget the message numbered C{seq} (delivered or given up).

        @return: whether the removal is a write to wait for (L{True}: the
            message was written, or is being written); L{False}: it never
            was, and nothing is left of it.
        """

    def load():
        """
        @return: every message kept, in the order they were added.
        """

    def committed():
        """
        @return: a L{Deferred} firing once every change so far is durable.
        """

    def whenCommitted(onCommitted, onFailure, *args):
        """
        Call C{onCommitted(None, *args)} once every change so far is
        durable, or C{onFailure(failure, *args)}: L{committed} without a
        L{Deferred}.
        """


class ISeenStore(Interface):
    """
    The message ids received, by authenticated origin domain, for the
    dedupe window.
    """

    def contains(origin, messageId):
        """
        @return: whether a message with this id from this origin domain was
            received within the window (and its L{add} committed).
        """

    def add(origin, messageId, at):
        """
        Remember a message received at clock time C{at}.
        """

    def prune(before):
        """
        Forget the messages received before clock time C{before}.

        @return: how many were forgotten.
        """

    def committed():
        """
        @return: a L{Deferred} firing once every change so far is durable.
        """

    def whenCommitted(onCommitted, onFailure, *args):
        """
        Call C{onCommitted(None, *args)} once every change so far is
        durable, or C{onFailure(failure, *args)}: L{committed} without a
        L{Deferred}.
        """
