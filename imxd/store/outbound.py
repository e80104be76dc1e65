"""
The durable outbound queue in SQLite: one row per message accepted from a
backend and not yet acknowledged or given up, holding the record as it is
encoded on the wire.
"""

from __future__ import annotations

import attrs
from zope.interface import implementer

from imxd.callbacks import Callbacks
from imxd.store.database import Rows, Stored
from imxd.store.interfaces import IOutboundStore
from imxd.wire import decodeRecords, encodeRecord

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbound (
    seq INTEGER PRIMARY KEY,
    origin TEXT NOT NULL,
    remote TEXT NOT NULL,
    accepted REAL NOT NULL,
    record BLOB NOT NULL
);
"""

_INSERT = Rows("INSERT INTO outbound (seq, origin, remote, accepted, record) VALUES ", "(?, ?, ?, ?, ?)")
_DELETE = Rows("DELETE FROM outbound WHERE seq IN (", "?", ")")

#: The largest record read back (the wire's own ceiling).
_LARGEST = 16 * 1024 * 1024


@attrs.define(eq=False)
class QueuedMessage:
    """
    A message waiting in the outbound queue.

    @ivar seq: its place in the queue (ascending in the order accepted).
    @ivar origin: the hosted domain that sent it.
    @ivar remote: the domain it is for.
    @ivar record: the L{imxd.wire.Message}.
    @ivar accepted: clock seconds when it was accepted.
    @ivar attempts: tries that the receiving server refused for now.
    @ivar notBefore: clock seconds before which it is not tried again.
    @ivar lastError: why the last try failed, or L{None}.
    @ivar acceptance: C{(onAccepted, onFailure, args, onOutcome)} of the
        backend that submitted it (L{imxd.outbox.Outbox.submitThen}), until
        it hears that the message was accepted (or
        could not be queued); L{None} after, and for messages kept from
        before a restart.
    @ivar reported: whether its sender hears of its outcome (not after it
        heard that the message could not be queued).
    """

    seq: int
    origin: str
    remote: str
    record: object
    accepted: float
    attempts: int = 0
    notBefore: float = 0.0
    lastError: str | None = None
    acceptance: tuple | None = None
    reported: bool = True


@implementer(IOutboundStore)
class OutboundStore(Stored):
    """
    The outbound queue kept in a L{imxd.store.Database}.
    """

    def __init__(self, database, writeBehind=0.0):
        """
        @param writeBehind: seconds a message added waits before it is
            written (and a removal before it is made), so that one answered
            meanwhile never is.
        """
        super().__init__(database)
        self.writeBehind = writeBehind
        self._clock = database.clock
        database.schema(_SCHEMA)
        [(highest,)] = database.read("SELECT COALESCE(MAX(seq), 0) FROM outbound")
        self._next = highest + 1
        # The messages added and not yet handed to a transaction, by seq,
        # in the order added: [row, clock time added, Callbacks or None].
        # One removed before then is never written (nor deleted).
        self._unwritten = {}
        # Whether _takeUnwritten is queued with the database (once).
        self._queued = False

    def add(self, origin, remote, record, accepted):
        """
        See L{IOutboundStore.add}.
        """
        seq = self._next
        row = (seq, origin, remote, accepted, encodeRecord(record))
        self._next += 1
        if not self._queued:
            self._queued = True
            self.database.writeLater(self._takeUnwritten, self.writeBehind)
        self._unwritten[seq] = [row, self._clock.seconds(), None]
        return QueuedMessage(seq, origin, remote, record, accepted)

    def whenWritten(self, seq, onWritten, onFailure, *args):
        """
        See L{IOutboundStore.whenWritten}.
        """
        unwritten = self._unwritten.get(seq)
        if unwritten is not None:
            unwritten[2] = Callbacks(onWritten, onFailure, args)

    def _takeUnwritten(self, final, told):
        """
        The provider of L{Database.writeLater}: the inserts of the messages
        added at least C{writeBehind} ago (all of them if C{final}) and not
        removed since; those waiting for them are told with the
        transaction.  The rest wait for a later one.
        """
        self._queued = False
        unwritten = self._unwritten
        if final or not self.writeBehind:
            taken = list(unwritten.values())
            unwritten.clear()
        else:
            now = self._clock.seconds()
            due = now - self.writeBehind
            taken = []
            for each in unwritten.values():
                # Due, or stamped in the future (the clock was set back).
                if due < each[1] <= now:
                    break
                taken.append(each)
            for each in taken:
                del unwritten[each[0][0]]
            if unwritten:
                first = next(iter(unwritten.values()))
                self._queued = True
                self.database.writeLater(
                    self._takeUnwritten, min(self.writeBehind, max(0.0, first[1] - due))
                )
        told.extend(each[2] for each in taken if each[2] is not None)
        return [(_INSERT, [each[0] for each in taken])]

    def remove(self, seq):
        """
        See L{IOutboundStore.remove}.
        """
        if self._unwritten.pop(seq, None) is not None:
            return False
        self.database.write(_DELETE, (seq,), self.writeBehind)
        return True

    def load(self):
        """
        See L{IOutboundStore.load}.
        """
        rows = self.database.read(
            "SELECT seq, origin, remote, accepted, record FROM outbound ORDER BY seq"
        )
        return [
            QueuedMessage(seq, origin, remote, decodeRecords(record, _LARGEST)[0], accepted)
            for seq, origin, remote, accepted, record in rows
        ]
