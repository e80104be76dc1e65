"""
The dedupe table in SQLite: the MESSAGE_IDs received from each
authenticated origin domain, kept for the dedupe window so that a message
sent again after a lost acknowledgement is acknowledged but not delivered
twice, across restarts too.
"""

from __future__ import annotations

from zope.interface import implementer

from imxd.store.interfaces import ISeenStore

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
class SeenStore:
    """
    The received message ids kept in a L{imxd.store.Database}.  An id is
    seen once its write is committed; until then the router holds the
    message as being delivered and answers its copies itself.
    """

    def __init__(self, database):
        self.database = database
        database.schema(_SCHEMA)

    def contains(self, origin, messageId):
        """
        See L{ISeenStore.contains}.
        """
        return bool(
            self.database.read(
                "SELECT 1 FROM seen WHERE origin = ? AND id = ?", (origin, messageId)
            )
        )

    def add(self, origin, messageId, at):
        """
        See L{ISeenStore.add}.
        """
        self.database.write(
            "INSERT OR REPLACE INTO seen (origin, id, at) VALUES (?, ?, ?)",
            (origin, messageId, at),
        )

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
        return len(rows)

    def committed(self):
        """
        See L{ISeenStore.committed}.
        """
        return self.database.committed()
