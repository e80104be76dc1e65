"""
The durable outbound queue in SQLite: one row per message accepted from a
backend and not yet acknowledged or given up, holding the record as it is
encoded on the wire.
"""

from __future__ import annotations

import attrs
from zope.interface import implementer

from imxd.store.database import Stored
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
    """

    seq: int
    origin: str
    remote: str
    record: object
    accepted: float
    attempts: int = 0
    notBefore: float = 0.0
    lastError: str | None = None


@implementer(IOutboundStore)
class OutboundStore(Stored):
    """
    The outbound queue kept in a L{imxd.store.Database}.
    """

    def __init__(self, database):
        super().__init__(database)
        database.schema(_SCHEMA)
        [(highest,)] = database.read("SELECT COALESCE(MAX(seq), 0) FROM outbound")
        self._next = highest + 1

    def add(self, origin, remote, record, accepted):
        """
        See L{IOutboundStore.add}.
        """
        entry = QueuedMessage(self._next, origin, remote, record, accepted)
        self._next += 1
        self.database.write(
            "INSERT INTO outbound (seq, origin, remote, accepted, record)"
            " VALUES (?, ?, ?, ?, ?)",
            (entry.seq, origin, remote, accepted, encodeRecord(record)),
        )
        return entry

    def remove(self, seq):
        """
        See L{IOutboundStore.remove}.
        """
        self.database.write("DELETE FROM outbound WHERE seq = ?", (seq,))

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
