"""
imxd's own durable state: the outbound queue, the message ids already
received (dedupe) and the presence subscriptions, in one SQLite database
in the state directory (C{imxd.sqlite3}), written in grouped transactions.

The queue and the dedupe table sit behind the interfaces in
L{imxd.store.interfaces}, so that another database can back them.
"""

from imxd.store.database import DURABILITY_MODES, Database, StoreError
from imxd.store.outbound import OutboundStore, QueuedMessage
from imxd.store.seen import SeenStore
from imxd.store.subscriptions import SubscriptionStore

__all__ = [
    "DURABILITY_MODES",
    "Database",
    "OutboundStore",
    "QueuedMessage",
    "SeenStore",
    "StoreError",
    "SubscriptionStore",
]
