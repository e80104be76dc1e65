"""
The dedupe table in SQLite: the MESSAGE_IDs received from each
authenticated origin domain, kept for the dedupe window so that a message
sent again after a lost acknowledgement is acknowledged but not delivered
twice, across restarts too.
"""

from __future__ import annotations

from twisted.python.failure import Failure
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
    The received message ids kept in a L{imxd.store.Database}; ids not yet
    committed are answered from memory.
    """

    def __init__(self, database):
        self.database = database
        database.schema(_SCHEMA)
        self._pending = {}
        self._clearing = None

    def contains(self, origin, messageId):
        """
        See L{ISeenStore.contains}.
        """
        if (origin, messageId) in self._pending:
            return True
        return bool(
            self.database.read(
                "SELECT 1 FROM seen WHERE origin = ? AND id = ?", (origin, messageId)
            )
        )

    def add(self, origin, messageId, at):
        """
        See L{ISeenStore.add}.
        """
        self._pending[(origin, messageId)] = self.database.commits + 1
        self.database.write(
            "INSERT OR REPLACE INTO seen (origin, id, at) VALUES (?, ?, ?)",
            (origin, messageId, at),
        )
        if self._clearing is None:
            self._clearing = self.database.committed()
            self._clearing.addBoth(self._cleared)

    def _cleared(self, result):
        """
        A commit is done: forget the ids it wrote (all of them if it failed:
        those messages were never acknowledged and will come again).
        """
        self._clearing = None
        if isinstance(result, Failure):
            self._pending.clear()
            return
        done = self.database.commits
        self._pending = {key: n for key, n in self._pending.items() if n > done}
        if self._pending:
            self._clearing = self.database.committed()
            self._clearing.addBoth(self._cleared)

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
