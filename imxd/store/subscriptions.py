"""
The presence subscriptions in SQLite, both sides, so that they survive a
restart: the subscriptions to a hosted domain's users (publisher side),
the subscriptions its users want (subscriber side), and the presence each
of its users published last.  Every row is keyed by the hosted domain, so
one database serves all of them.
"""

from __future__ import annotations

import json

import attrs

from imxd.store.database import Stored

_SCHEMA = """
CREATE TABLE IF NOT EXISTS subscribers (
    domain TEXT NOT NULL,
    publisher TEXT NOT NULL,
    subscriber TEXT NOT NULL,
    state TEXT NOT NULL,
    expiry REAL NOT NULL,
    requested INTEGER NOT NULL,
    origin TEXT,
    PRIMARY KEY (domain, publisher, subscriber)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS wanted (
    domain TEXT NOT NULL,
    subscriber TEXT NOT NULL,
    publisher TEXT NOT NULL,
    state TEXT NOT NULL,
    expiry REAL,
    PRIMARY KEY (domain, subscriber, publisher)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS published (
    domain TEXT NOT NULL,
    user TEXT NOT NULL,
    presence TEXT NOT NULL,
    status TEXT,
    attributes TEXT NOT NULL,
    PRIMARY KEY (domain, user)
) WITHOUT ROWID;
"""


@attrs.frozen
class StoredPresence:
    """
    What one hosted domain kept of its presence state.

    @ivar subscribers: C{(publisher, subscriber, state, expiry, requested,
        origin)} rows, the subscriptions to the domain's users.
    @ivar wanted: C{(subscriber, publisher, state, expiry)} rows, the
        subscriptions its users want.
    @ivar published: C{(user, presence, status, attributes)} rows, the
        presence each user published last (C{attributes} a tuple of
        C{name=value} strings).
    """

    subscribers: list
    wanted: list
    published: list


class SubscriptionStore(Stored):
    """
    One hosted domain's presence subscriptions kept in a
    L{imxd.store.Database}; changes are written with the next grouped
    commit.
    """

    def __init__(self, database, domain):
        """
        @param database: the L{imxd.store.Database}.
        @param domain: the hosted domain whose rows this store reads and
            writes.
        """
        super().__init__(database)
        self.domain = domain
        database.schema(_SCHEMA)

    def load(self):
        """
        @return: the domain's L{StoredPresence}, including changes still
            queued (they are committed first).
        """
        self.database.flush()
        read = self.database.read
        subscribers = read(
            "SELECT publisher, subscriber, state, expiry, requested, origin"
            " FROM subscribers WHERE domain = ? ORDER BY publisher, subscriber",
            (self.domain,),
        )
        wanted = read(
            "SELECT subscriber, publisher, state, expiry FROM wanted"
            " WHERE domain = ? ORDER BY subscriber, publisher",
            (self.domain,),
        )
        published = [
            (user, presence, status, tuple(json.loads(attributes)))
            for user, presence, status, attributes in read(
                "SELECT user, presence, status, attributes FROM published"
                " WHERE domain = ? ORDER BY user",
                (self.domain,),
            )
        ]
        return StoredPresence(subscribers, wanted, published)

    def putSubscriber(self, publisher, subscriber, state, expiry, requested, origin):
        """
        Keep (or replace) a subscription to one of the domain's users.
        """
        self.database.write(
            "INSERT OR REPLACE INTO subscribers"
            " (domain, publisher, subscriber, state, expiry, requested, origin)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (self.domain, publisher, subscriber, state, expiry, requested, origin),
        )

    def removeSubscriber(self, publisher, subscriber):
        """
        Forget a subscription to one of the domain's users.
        """
        self.database.write(
            "DELETE FROM subscribers WHERE domain = ? AND publisher = ? AND subscriber = ?",
            (self.domain, publisher, subscriber),
        )

    def putWanted(self, subscriber, publisher, state, expiry):
        """
        Keep (or replace) a subscription one of the domain's users wants.
        """
        self.database.write(
            "INSERT OR REPLACE INTO wanted (domain, subscriber, publisher, state, expiry)"
            " VALUES (?, ?, ?, ?, ?)",
            (self.domain, subscriber, publisher, state, expiry),
        )

    def removeWanted(self, subscriber, publisher):
        """
        Forget a subscription one of the domain's users no longer wants.
        """
        self.database.write(
            "DELETE FROM wanted WHERE domain = ? AND subscriber = ? AND publisher = ?",
            (self.domain, subscriber, publisher),
        )

    def putPublished(self, user, presence, status, attributes):
        """
        Keep the presence C{user} published last, with its attributes
        (C{name=value} strings).
        """
        self.database.write(
            "INSERT OR REPLACE INTO published (domain, user, presence, status, attributes)"
            " VALUES (?, ?, ?, ?, ?)",
            (self.domain, user, presence, status, json.dumps(list(attributes))),
        )
