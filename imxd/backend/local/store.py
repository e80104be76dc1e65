"""
The local backend's store: one SQLite file holding the accounts of every
domain served by the C{local} backend, their contacts, block lists,
subscription decisions and messages kept for users who are not connected.

Passwords are hashed with scrypt (memory-hard, stdlib C{hashlib.scrypt})
and never leave the server (draft 6.1 item 7).  SQLite runs in the
reactor's thread in WAL mode; each call is one short transaction.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import sqlite3

from imxd.address import Address, AddressError, normaliseDomain
from imxd.store.database import reconnectInChild

#: scrypt parameters: 16 MiB of memory per hash.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_SIZE = 16
KEY_SIZE = 32

#: Messages kept per user while no client is connected, at most.
OFFLINE_CAP = 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    address TEXT PRIMARY KEY,
    domain TEXT NOT NULL,
    password TEXT NOT NULL,
    alias TEXT,
    only_granted INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS users_domain ON users (domain);
CREATE TABLE IF NOT EXISTS blocks (
    owner TEXT NOT NULL,
    pattern TEXT NOT NULL,
    PRIMARY KEY (owner, pattern)
);
CREATE TABLE IF NOT EXISTS decisions (
    publisher TEXT NOT NULL,
    subscriber TEXT NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (publisher, subscriber)
);
CREATE TABLE IF NOT EXISTS contacts (
    owner TEXT NOT NULL,
    contact TEXT NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (owner, contact)
);
CREATE TABLE IF NOT EXISTS offline (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    owner TEXT NOT NULL,
    event TEXT NOT NULL,
    created REAL NOT NULL DEFAULT 0,
    delivered REAL
);
CREATE INDEX IF NOT EXISTS offline_owner ON offline (owner, id);
CREATE INDEX IF NOT EXISTS offline_created ON offline (created);
"""


class AccountError(Exception):
    """
    An account operation was refused; the message says why in one line.
    """


def hashPassword(password, salt=None):
    """
    @return: C{scrypt$N$r$p$salt$key} (hex) for C{password}.
    """
    salt = os.urandom(SALT_SIZE) if salt is None else salt
    key = hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=SCRYPT_N,
        r=SCRYPT_R,
        p=SCRYPT_P,
        maxmem=64 * 1024 * 1024,
        dklen=KEY_SIZE,
    )
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${key.hex()}"


def checkPassword(password, stored):
    """
    @return: whether C{password} matches a L{hashPassword} result
        (compared in constant time).
    """
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        n, r, p = int(n), int(r), int(p)
        salt, key = bytes.fromhex(salt), bytes.fromhex(key)
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    candidate = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p,
        maxmem=64 * 1024 * 1024, dklen=len(key),
    )
    return hmac.compare_digest(candidate, key)


def canonicalAddress(text):
    """
    @return: the canonical form of an address.
    @raise AccountError: not an address.
    """
    try:
        return str(Address.parse(text))
    except AddressError as e:
        raise AccountError(f"{text!r}: {e}") from None


class AccountStore:
    """
    The local backend's SQLite store.
    """

    def __init__(self, path):
        """
        Open (and create if needed) the store; the file is made readable by
        its owner only.

        @param path: the SQLite file, or C{":memory:"}.
        """
        if path != ":memory:":
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
            os.close(fd)
        self.path = path
        self._db = self._connect()
        self._db.executescript(_SCHEMA)
        # The connections made before a fork, kept open and unused in the
        # child (see L{reconnectInChild}).
        self._inherited = []
        self._closed = False
        reconnectInChild(self)

    def _connect(self):
        connection = sqlite3.connect(self.path, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        return connection

    def _reconnectAfterFork(self):
        """
        In a child after a fork: a connection of its own (a file store).
        """
        if not self._closed and self.path != ":memory:":
            self._inherited.append(self._db)
            self._db = self._connect()

    def close(self):
        """
        Close the database.
        """
        self._closed = True
        self._db.close()

    def _one(self, query, *arguments):
        return self._db.execute(query, arguments).fetchone()

    def _write(self, query, *arguments):
        with self._db:
            return self._db.execute(query, arguments)

    # -- accounts ------------------------------------------------------------

    def addUser(self, address, password, alias=None):
        """
        Create an account.

        @raise AccountError: the address is taken or not valid, or the
            password is empty.
        """
        address = canonicalAddress(address)
        if not password:
            raise AccountError("the password may not be empty")
        if self.exists(address):
            raise AccountError(f"{address} already exists")
        self._write(
            "INSERT INTO users (address, domain, password, alias) VALUES (?, ?, ?, ?)",
            address,
            address.rsplit("@", 1)[1],
            hashPassword(password),
            alias,
        )
        return address

    def removeUser(self, address):
        """
        Delete an account and everything kept for it.

        @raise AccountError: there is no such account.
        """
        address = canonicalAddress(address)
        if not self.exists(address):
            raise AccountError(f"no such user: {address}")
        with self._db:
            for query in (
                "DELETE FROM users WHERE address = ?",
                "DELETE FROM blocks WHERE owner = ?",
                "DELETE FROM decisions WHERE publisher = ?",
                "DELETE FROM contacts WHERE owner = ?",
                "DELETE FROM offline WHERE owner = ?",
            ):
                self._db.execute(query, (address,))

    def users(self, domain):
        """
        @return: the addresses of C{domain}'s accounts, sorted.
        """
        domain = normaliseDomain(domain)
        rows = self._db.execute(
            "SELECT address FROM users WHERE domain = ? ORDER BY address", (domain,)
        )
        return [row[0] for row in rows]

    def exists(self, address):
        """
        @return: whether C{address} has an account.
        """
        return self._one("SELECT 1 FROM users WHERE address = ?", address) is not None

    def setPassword(self, address, password):
        """
        @raise AccountError: no such account, or an empty password.
        """
        address = canonicalAddress(address)
        if not password:
            raise AccountError("the password may not be empty")
        if not self._write(
            "UPDATE users SET password = ? WHERE address = ?", hashPassword(password), address
        ).rowcount:
            raise AccountError(f"no such user: {address}")

    def passwordHash(self, address):
        """
        @return: the stored scrypt hash of C{address}'s password, or
            L{None} for an unknown address.
        """
        row = self._one("SELECT password FROM users WHERE address = ?", address)
        return row[0] if row else None

    def authenticate(self, address, password):
        """
        @return: the canonical address when C{password} is right, else
            L{None} (also for an unknown or invalid address, after the same
            time).
        """
        try:
            address = canonicalAddress(address)
        except AccountError:
            address = None
        stored = self.passwordHash(address) if address else None
        right = checkPassword(password, stored or dummyHash())
        return address if right and stored else None

    def alias(self, address):
        """
        @return: the account's display name, or L{None}.
        """
        row = self._one("SELECT alias FROM users WHERE address = ?", address)
        return row[0] if row else None

    def setAlias(self, address, alias):
        """
        Set (or clear, with L{None}) the account's display name.
        """
        self._write("UPDATE users SET alias = ? WHERE address = ?", alias, address)

    # -- edge policy ----------------------------------------------------------

    def block(self, owner, pattern):
        """
        Refuse messages and subscription requests to C{owner} from an
        address or a whole domain.
        """
        self._write(
            "INSERT OR IGNORE INTO blocks (owner, pattern) VALUES (?, ?)",
            owner,
            _pattern(pattern),
        )

    def unblock(self, owner, pattern):
        """
        Lift a block set by L{block}.
        """
        self._write(
            "DELETE FROM blocks WHERE owner = ? AND pattern = ?", owner, _pattern(pattern)
        )

    def blocks(self, owner):
        """
        @return: C{owner}'s blocked addresses and domains, sorted.
        """
        rows = self._db.execute(
            "SELECT pattern FROM blocks WHERE owner = ? ORDER BY pattern", (owner,)
        )
        return [row[0] for row in rows]

    def isBlocked(self, owner, sender):
        """
        @return: whether C{owner} blocked C{sender} or its domain.
        """
        domain = sender.rsplit("@", 1)[-1]
        return (
            self._one(
                "SELECT 1 FROM blocks WHERE owner = ? AND pattern IN (?, ?)",
                owner,
                sender,
                domain,
            )
            is not None
        )

    def setOnlyGranted(self, owner, flag):
        """
        Accept messages only from addresses whose subscription C{owner}
        granted (or not).
        """
        self._write(
            "UPDATE users SET only_granted = ? WHERE address = ?", int(bool(flag)), owner
        )

    def onlyGranted(self, owner):
        """
        @return: whether C{owner} accepts messages only from granted
            subscribers.
        """
        row = self._one("SELECT only_granted FROM users WHERE address = ?", owner)
        return bool(row and row[0])

    # -- subscriptions ----------------------------------------------------------

    def setDecision(self, publisher, subscriber, state):
        """
        Remember how C{publisher} decided C{subscriber}'s request
        (C{granted}, C{denied} or C{pending}).
        """
        self._write(
            "INSERT OR REPLACE INTO decisions (publisher, subscriber, state) VALUES (?, ?, ?)",
            publisher,
            subscriber,
            state,
        )

    def decision(self, publisher, subscriber):
        """
        @return: the remembered decision, or L{None}.
        """
        row = self._one(
            "SELECT state FROM decisions WHERE publisher = ? AND subscriber = ?",
            publisher,
            subscriber,
        )
        return row[0] if row else None

    def pendingRequests(self, publisher):
        """
        @return: the subscribers waiting for C{publisher}'s decision.
        """
        rows = self._db.execute(
            "SELECT subscriber FROM decisions WHERE publisher = ? AND state = 'pending' "
            "ORDER BY subscriber",
            (publisher,),
        )
        return [row[0] for row in rows]

    def decisions(self, publisher):
        """
        @return: C{{subscriber: state}} decided (or pending) by C{publisher}.
        """
        rows = self._db.execute(
            "SELECT subscriber, state FROM decisions WHERE publisher = ?", (publisher,)
        )
        return dict(rows)

    def setContact(self, owner, contact, state):
        """
        Remember a subscription C{owner} wants, and its state.
        """
        self._write(
            "INSERT OR REPLACE INTO contacts (owner, contact, state) VALUES (?, ?, ?)",
            owner,
            contact,
            state,
        )

    def removeContact(self, owner, contact):
        """
        Forget a subscription C{owner} no longer wants.
        """
        self._write("DELETE FROM contacts WHERE owner = ? AND contact = ?", owner, contact)

    def contacts(self, owner):
        """
        @return: C{{contact: state}} for C{owner}.
        """
        rows = self._db.execute(
            "SELECT contact, state FROM contacts WHERE owner = ?", (owner,)
        )
        return dict(rows)

    def allContacts(self, domain):
        """
        @return: C{(owner, contact)} for every subscription the users of
            C{domain} want, to resume them at start (denied ones excluded).
        """
        rows = self._db.execute(
            "SELECT owner, contact FROM contacts c JOIN users u ON u.address = c.owner "
            "WHERE u.domain = ? AND c.state != 'denied' ORDER BY owner, contact",
            (domain,),
        )
        return list(rows)

    # -- events kept for users without a client --------------------------------

    def keep(self, owner, event, now=0.0):
        """
        Keep an event (a JSON-able dict) for C{owner}.

        @param now: the time it was kept, for L{expire}.
        @return: its id, increasing.
        @raise AccountError: C{owner} already has L{OFFLINE_CAP} events no
            client has been sent.
        """
        count = self._one(
            "SELECT COUNT(*) FROM offline WHERE owner = ? AND delivered IS NULL", owner
        )[0]
        if count >= OFFLINE_CAP:
            raise AccountError(f"{owner} has {OFFLINE_CAP} messages waiting")
        cursor = self._write(
            "INSERT INTO offline (owner, event, created) VALUES (?, ?, ?)",
            owner,
            json.dumps(event),
            now,
        )
        return cursor.lastrowid

    def kept(self, owner, after=0):
        """
        @return: C{[(id, event)]} kept for C{owner} with ids above C{after}.
        """
        rows = self._db.execute(
            "SELECT id, event FROM offline WHERE owner = ? AND id > ? ORDER BY id",
            (owner, after),
        )
        return [(row[0], json.loads(row[1])) for row in rows]

    def delivered(self, owner, upTo, now):
        """
        Note that C{owner}'s events up to id C{upTo} were written to a
        client's stream at C{now}; they are dropped by L{pruneDelivered}
        unless the client asks for them again first.
        """
        self._write(
            "UPDATE offline SET delivered = ? WHERE owner = ? AND id <= ? "
            "AND delivered IS NULL",
            now,
            owner,
            upTo,
        )

    def forget(self, owner, upTo):
        """
        Drop the kept events of C{owner} up to id C{upTo} (acknowledged by
        a client).
        """
        self._write("DELETE FROM offline WHERE owner = ? AND id <= ?", owner, upTo)

    def pruneDelivered(self, before):
        """
        Drop events written to a client's stream before C{before}.
        """
        self._write(
            "DELETE FROM offline WHERE delivered IS NOT NULL AND delivered < ?", before
        )

    def expire(self, domain, before):
        """
        Remove the events of C{domain}'s users that no client was sent and
        that were kept before C{before}.

        @return: C{[(owner, event)]} removed, oldest first.
        """
        rows = self._db.execute(
            "SELECT o.id, o.owner, o.event FROM offline o JOIN users u "
            "ON u.address = o.owner WHERE u.domain = ? AND o.delivered IS NULL "
            "AND o.created < ? ORDER BY o.id",
            (domain, before),
        ).fetchall()
        with self._db:
            self._db.executemany(
                "DELETE FROM offline WHERE id = ?", [(row[0],) for row in rows]
            )
        return [(row[1], json.loads(row[2])) for row in rows]


def _pattern(text):
    """
    @return: a canonical address, or a canonical domain.
    @raise AccountError: neither.
    """
    try:
        if "@" in text:
            return str(Address.parse(text))
        return normaliseDomain(text)
    except AddressError as e:
        raise AccountError(f"{text!r}: {e}") from None


@functools.lru_cache(maxsize=1)
def dummyHash():
    """
    @return: a hash to check against for unknown accounts, so that they
        cost the same time as known ones.
    """
    return hashPassword("timing", b"\x00" * SALT_SIZE)
