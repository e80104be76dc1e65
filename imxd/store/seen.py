"""
The dedupe table in SQLite: the MESSAGE_IDs received from each
authenticated origin domain, kept for the dedupe window so that a message
sent again after a lost acknowledgement is acknowledged but not delivered
twice, across restarts too.  A L{SeenFilter} in memory answers for the
ids certainly never received without reading the table.
"""

from __future__ import annotations

from zope.interface import implementer

from imxd.store.database import Rows, Stored
from imxd.store.interfaces import ISeenStore
from imxd.store.seenfilter import SeenFilter

_INSERT = Rows("INSERT OR REPLACE INTO seen (origin, id, at) VALUES ", "(?, ?, ?)")

#: Ids forgotten per pruning at most.
PRUNE_CHUNK = 20000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS seen (
    origin TEXT NOT NULL,
    id TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (origin, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_at ON seen (at);
"""


@implementer(ISeenStore)
class SeenStore(Stored):
    """
    The received message ids kept in a L{imxd.store.Database}.  An id is
    seen once its write is committed; until then the router holds the
    message as being delivered and answers its copies itself.

    @ivar filter: the L{SeenFilter} over the table, filled from it at
        start.
    @ivar lookups: ids looked up in the table (the filter could not rule
        them out).
    """

    def __init__(self, database):
        super().__init__(database)
        database.schema(_SCHEMA)
        self.filter = SeenFilter()
        self.lookups = 0
        for origin, messageId, at in database.rows("SELECT origin, id, at FROM seen ORDER BY at"):
            self.filter.add(origin, messageId, at)

    def contains(self, origin, messageId):
        """
        See L{ISeenStore.contains}.
        """
        if not self.filter.mayContain(origin, messageId):
            return False
        self.lookups += 1
        return bool(
            self.database.read(
                "SELECT 1 FROM seen WHERE origin = ? AND id = ?", (origin, messageId)
            )
        )

    def add(self, origin, messageId, at):
        """
        See L{ISeenStore.add}.
        """
        self.filter.add(origin, messageId, at)
        self.database.write(_INSERT, (origin, messageId, at))

    def prune(self, before, limit=PRUNE_CHUNK):
        """
        See L{ISeenStore.prune}; at most C{limit} ids at a time, so that
        one pruning never holds the reactor long.
        """
        rows = self.database.read(
            "SELECT origin, id FROM seen WHERE at < ? LIMIT ?", (before, limit)
        )
        if rows:
            self.database.writeMany("DELETE FROM seen WHERE origin = ? AND id = ?", rows)
        self.filter.forget(before)
        return len(rows)
