"""
One SQLite database written in grouped transactions.

Writers queue statements with L{Database.write}; everything queued during
one turn of the reactor is committed in one transaction (one fsync with
C{durability = "full"}), and L{Database.committed} tells a caller when its
writes are safe.  Reads see committed data only, so callers that must see
their own pending writes keep them in memory until they are committed.
"""

from __future__ import annotations

import itertools
import os
import queue
import sqlite3
import threading
import weakref

from twisted.internet import defer
from twisted.logger import Logger

from imxd.callbacks import Callbacks

#: C{server.queue.durability} values and the SQLite C{synchronous} setting
#: each one uses (in WAL mode).  C{full}: a commit is on disk before the
#: writers hear of it (it survives a power loss).  C{normal}: a commit is
#: in the operating system before they hear of it (it survives imxd being
#: killed, not a power loss or a kernel crash).
DURABILITY_MODES = {"full": "FULL", "normal": "NORMAL"}

#: This process's id, kept up to date across forks (C{os.getpid} is a
#: system call, and L{Database} asks on every commit whether its writer
#: thread belongs to this process).
_processId = os.getpid()


#: What holds SQLite connections in this process, to be given new ones
#: in a child after a fork (L{reconnectInChild}).
_OPEN = weakref.WeakSet()


def reconnectInChild(owner):
    """
    Have C{owner._reconnectAfterFork()} called in a child after a fork:
    SQLite forbids using a connection made before one, and C{twistd}
    forks to become a daemon after building the server.
    """
    _OPEN.add(owner)


def _forked():
    global _processId
    _processId = os.getpid()
    for owner in list(_OPEN):
        owner._reconnectAfterFork()


os.register_at_fork(after_in_child=_forked)

#: How long a connection waits for another's lock (the writer thread's
#: transaction, a checkpoint) before giving up, in milliseconds.
BUSY_TIMEOUT_MS = 10_000


class Rows:
    """
    A statement that takes many rows at once (a multi-row C{INSERT}, a
    C{DELETE ... IN}), queued with L{Database.write} as if it took one: the
    rows of a transaction run as few statements of L{MANY} and L{SOME}
    rows each, and the rest one by one.  The writer thread then gives up
    the interpreter lock once per statement instead of once per row.
    """

    #: Rows per statement, and per statement of what is left over.
    MANY = 128
    SOME = 16

    def __init__(self, head, row, tail=""):
        """
        @param head: the statement up to its first row, e.g. C{"INSERT INTO
            t (a, b) VALUES "}.
        @param row: one row's placeholders, e.g. C{"(?, ?)"}; rows are
            joined by commas.
        @param tail: what follows the last row, e.g. C{")"}.
        """
        self._head = head
        self._row = row
        self._tail = tail
        self._texts = {}

    def sql(self, count):
        """
        @return: the statement for C{count} rows.
        """
        text = self._texts.get(count)
        if text is None:
            text = self._texts[count] = self._head + ", ".join([self._row] * count) + self._tail
        return text

    def runs(self, rows):
        """
        @param rows: parameter tuples, one per row.
        @return: C{(sql, parameters)} pairs, each run with C{executemany}.
        """
        runs = []
        start, total = 0, len(rows)
        for size in (self.MANY, self.SOME):
            stop = start + (total - start) // size * size
            if stop > start:
                runs.append((
                    self.sql(size),
                    [tuple(itertools.chain.from_iterable(rows[i : i + size]))
                     for i in range(start, stop, size)],
                ))
                start = stop
        if start < total:
            runs.append((self.sql(1), rows[start:]))
        return runs

    def __repr__(self):
        return f"Rows({self.sql(1)!r})"


class StoreError(Exception):
    """
    The database could not be opened or written; the message says why.
    """


class Database:
    """
    A SQLite database shared by imxd's stores, with grouped commits.

    @ivar path: the file, or C{":memory:"}.
    @ivar threaded: whether commits run on a thread of their own.
    @ivar commits: transactions committed so far.
    @ivar writes: statements committed so far.
    """

    log = Logger()

    def __init__(self, path, clock, durability="full", threaded=False):
        """
        Open (or create, mode 0600) the database.

        @param path: a file path, or C{":memory:"} for tests.
        @param clock: an L{IReactorTime}; commits are scheduled on it.
        @param durability: a key of L{DURABILITY_MODES}.
        @param threaded: commit on a thread of its own, with a connection
            of its own, so that the reactor goes on while SQLite writes and
            waits for the disk; C{clock} must then be the running reactor
            (an L{IReactorThreads}), which hears of each commit.  A file
            database only.
        @raise StoreError: the file cannot be opened.
        """
        if durability not in DURABILITY_MODES:
            raise StoreError(f"unknown durability {durability!r}")
        self.path = path
        self.clock = clock
        self.durability = durability
        try:
            if path != ":memory:" and not os.path.exists(path):
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        except OSError as e:
            raise StoreError(f"cannot open {path}: {e}") from None
        self._db = self._connect()
        # Connections made before a fork: a child keeps them open, unused
        # (SQLite forbids using them, and closing one could disturb the
        # parent's locks and journal).
        self._inherited = []
        reconnectInChild(self)
        self._pending = []
        self._waiting = []
        self._call = None
        self._lateCall = None
        self._closed = False
        self._writer = None
        self.threaded = threaded
        if threaded and path == ":memory:":
            raise StoreError("a database in memory cannot be written by another thread")
        self.commits = 0
        self.writes = 0

    def _connect(self):
        """
        @return: a new connection to the file, in WAL mode with the
            durability's C{synchronous} setting.
        @raise StoreError: it cannot be opened.
        """
        try:
            connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(f"PRAGMA synchronous={DURABILITY_MODES[self.durability]}")
            connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        except sqlite3.Error as e:
            raise StoreError(f"cannot open {self.path}: {e}") from None
        return connection

    def _reconnectAfterFork(self):
        """
        In a child after a fork (C{twistd} forks to become a daemon after
        building the server): put the connection made before aside and open
        a new one (a file database; one in memory is the parent's copy).
        """
        if self._closed or self.path == ":memory:":
            return
        self._inherited.append(self._db)
        self._db = self._connect()

    def schema(self, script):
        """
        Create tables and indexes (C{CREATE ... IF NOT EXISTS}) at once.
        """
        try:
            self._db.executescript(script)
        except sqlite3.Error as e:
            raise StoreError(f"cannot prepare {self.path}: {e}") from None

    def read(self, sql, parameters=()):
        """
        @return: the rows of a query over committed data, as a list.
        """
        return self._db.execute(sql, parameters).fetchall()

    def rows(self, sql, parameters=()):
        """
        @return: an iterator over the rows of a query over committed data,
            fetched as they are used (for reading a whole table at start).
        """
        return iter(self._db.execute(sql, parameters))

    def write(self, sql, parameters=(), delay=0.0):
        """
        Queue one statement for the next grouped commit.

        @param delay: seconds that commit may wait for more, unless other
            writes want it sooner.
        """
        self._pending.append((sql, parameters))
        self._scheduleWithin(delay)

    def writeMany(self, sql, sequence):
        """
        Queue one statement run for every parameter tuple of C{sequence}.
        """
        self._pending.append((sql, sequence, True))
        self._schedule()

    def writeLater(self, provider, delay=0.0):
        """
        Queue writes that may still be called off: C{provider(final,
        told)} is called on this thread when the next transaction is put
        together, and returns the C{(sql, rows)} pairs to run then, each
        statement once for every parameter tuple of its C{rows}.  It may
        keep writes for a later transaction (queueing itself again) unless
        C{final} is true (L{flush}, L{close}), and may add to the list
        C{told} the L{Callbacks} to tell when this transaction ends.

        @param delay: seconds that transaction may wait for them (so that
            more are called off first), unless other writes want it sooner.
        """
        self._pending.append((provider,))
        self._scheduleWithin(delay)

    def committed(self):
        """
        @return: a L{Deferred} firing once everything queued so far is
            committed, or failing with L{StoreError}.
        """
        return self._wait(defer.Deferred())

    def whenCommitted(self, onCommitted, onFailure, *args):
        """
        Call C{onCommitted(None, *args)} once everything queued so far is
        committed, or C{onFailure(failure, *args)} (a L{StoreError}): what
        L{committed} does, without a L{Deferred} (the per-message path).
        """
        self._wait(Callbacks(onCommitted, onFailure, args))

    def _wait(self, waiting):
        """
        Fire C{waiting} (a L{Deferred} or L{Callbacks}) at the next commit,
        or now when nothing is queued.

        @return: C{waiting}.
        """
        if self._pending or self._commitUnderWay():
            self._waiting.append(waiting)
            if self._lateCall is None:
                self._schedule()
        else:
            waiting.callback(None)
        return waiting

    def _schedule(self):
        """
        Have the next commit put together on the next turn.
        """
        if self._call is None:
            self._call = self.clock.callLater(0, self.commit)

    def _scheduleWithin(self, delay):
        """
        Have the next commit put together within C{delay} seconds (0: on
        the next turn), unless it is already due sooner.
        """
        if not delay:
            self._schedule()
        elif self._call is None and self._lateCall is None:
            self._lateCall = self.clock.callLater(delay, self._lateDue)

    def _lateDue(self):
        self._lateCall = None
        self._schedule()

    def _commitUnderWay(self):
        """
        @return: whether this process's writer thread is running a
            transaction.
        """
        writer = self._writer
        return writer is not None and writer.busy and writer.pid == _processId

    def commit(self):
        """
        Commit everything queued, in one transaction, and tell those
        waiting for it (threaded: start that commit, unless one is under
        way, after which the next starts).
        """
        self._commit(self.threaded)

    def _commit(self, onThread, final=False):
        """
        L{commit}, on the writer thread or on this one.

        @param final: whether every write queued is to be made now (the
            providers of L{writeLater} give all they hold).
        """
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._commitUnderWay():
            return
        if self._lateCall is not None:
            if self._lateCall.active():
                self._lateCall.cancel()
            self._lateCall = None
        queued, self._pending = self._pending, []
        told = []
        try:
            pending, error = _resolved(queued, final, told), None
        except Exception as e:
            pending, error = [], e
        waiting, self._waiting = told + self._waiting, []
        if error is not None:
            # A provider that cannot give its writes fails this commit, not
            # every later one.
            self.committedBy([], waiting, error)
            return
        if self._closed:
            if pending:
                self.log.error(
                    "{path} is closed: {count} writes not made", path=self.path, count=len(pending)
                )
            for each in waiting:
                each.errback(StoreError(f"{self.path} is closed"))
            return
        if not pending:
            for each in waiting:
                each.callback(None)
            return
        if onThread:
            self._writerThread().start(pending, waiting)
            return
        self.committedBy(pending, waiting, _transact(self._db, pending))

    def _writerThread(self):
        """
        @return: the writer thread, started at the first commit of this
            process: C{twistd} builds the server, then forks to become a
            daemon, and threads do not survive a fork.
        """
        writer = self._writer
        if writer is None or writer.pid != _processId:
            writer = self._writer = _WriterThread(self, self._connect())
        return writer

    def flush(self):
        """
        Commit everything queued before returning: the commit under way on
        the writer thread (if any) is waited for and told, then the rest
        is committed on this thread.
        """
        if self._commitUnderWay():
            self._writer.waitIdle()
        self._commit(onThread=False, final=True)

    def committedBy(self, pending, waiting, error):
        """
        A transaction of C{pending} ended (C{error} L{None}: committed):
        tell those C{waiting}, and start the next commit if more is queued.
        """
        if error is not None:
            self.log.error("cannot write {path}: {e}", path=self.path, e=error)
            failure = StoreError(f"cannot write {self.path}: {error}")
            for each in waiting:
                each.errback(failure)
        else:
            self.commits += 1
            self.writes += len(pending)
            for each in waiting:
                each.callback(None)
        if self._pending or self._waiting:
            self._schedule()

    def close(self):
        """
        Commit what is queued and close the file (once); threaded, the
        commit under way is waited for first.
        """
        if self._closed:
            return
        writer, self._writer = self._writer, None
        if writer is not None and writer.pid == _processId:
            writer.stop()
        self._commit(onThread=False, final=True)
        self._closed = True
        self._db.close()
        _OPEN.discard(self)


def _transact(connection, pending):
    """
    Run queued statements in one transaction on C{connection}.

    @return: L{None}, or the exception that rolled it back.
    """
    try:
        connection.execute("BEGIN")
        for sql, rows in _runs(pending):
            if isinstance(sql, Rows):
                for text, parameters in sql.runs(rows):
                    connection.executemany(text, parameters)
            else:
                connection.executemany(sql, rows)
        connection.execute("COMMIT")
    except Exception as e:
        # Not only sqlite3.Error: a value SQLite cannot take (a lone
        # surrogate, an integer too large) must not leave the
        # connection inside a transaction for good.
        try:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        return e
    return None


class _WriterThread:
    """
    The thread that commits for a threaded L{Database}, one transaction
    at a time, on a connection of its own; the reactor hears of each
    commit through C{callFromThread}.

    @ivar busy: whether a transaction is under way (until the reactor has
        heard of it).
    """

    def __init__(self, database, connection):
        self._database = database
        self._connection = connection
        self._jobs = queue.SimpleQueue()
        self._ended = None
        self._idle = threading.Event()
        self.busy = False
        self.pid = _processId
        self._thread = threading.Thread(target=self._run, name="imxd-database-writer", daemon=True)
        self._thread.start()

    def start(self, pending, waiting):
        """
        Commit C{pending} on the thread, then tell C{waiting}.
        """
        self.busy = True
        self._idle.clear()
        self._jobs.put((pending, waiting))

    def _run(self):
        while True:
            job = self._jobs.get()
            if job is None:
                return
            pending, waiting = job
            try:
                error = _transact(self._connection, pending)
            except BaseException as e:  # the thread must outlive any failure, or nothing commits again
                error = e
            self._ended = (pending, waiting, error)
            self._idle.set()
            self._database.clock.callFromThread(self._tell)

    def waitIdle(self):
        """
        Block until the transaction under way ended, and tell its end now.
        """
        self._idle.wait()
        self._tell()

    def _tell(self):
        """
        On the reactor: pass the transaction's end to the database (once).
        """
        ended, self._ended = self._ended, None
        if ended is None:
            return
        self.busy = False
        self._database.committedBy(*ended)

    def stop(self):
        """
        Let the transaction under way end, stop the thread, and tell its
        end now (the reactor may not turn again).
        """
        self._jobs.put(None)
        self._thread.join()
        self._tell()
        self.busy = False
        self._connection.close()


class Stored:
    """
    A store kept in a L{Database}: its changes are durable when the
    database's grouped commit says so.

    @ivar database: the L{Database}.
    """

    def __init__(self, database):
        self.database = database

    def committed(self):
        """
        @return: a L{Deferred} firing once every change so far is durable.
        """
        return self.database.committed()

    def whenCommitted(self, onCommitted, onFailure, *args):
        """
        See L{Database.whenCommitted}.
        """
        self.database.whenCommitted(onCommitted, onFailure, *args)


def _resolved(pending, final, told):
    """
    @param final: passed to each provider: whether it must give all it
        holds.
    @param told: a list each provider may add L{Callbacks} to, told when
        this transaction ends.
    @return: the queued statements, with the writes that each provider
        queued by L{Database.writeLater} gives now in its place.
    """
    resolved = []
    error = None
    for statement in pending:
        if len(statement) == 1:
            # Every provider is asked, even after one failed: none may keep
            # rows that no later commit would ask for.
            try:
                given = statement[0](final, told)
            except Exception as e:
                error = error or e
                continue
            resolved.extend((sql, rows, True) for sql, rows in given if rows)
        else:
            resolved.append(statement)
    if error is not None:
        raise error
    return resolved


def _runs(pending):
    """
    Group queued statements into runs of the same SQL, in order, so that
    each run is one C{executemany} (thousands of single-row inserts and
    deletes in a busy turn cost one call each otherwise).

    @return: C{(sql, rows)} pairs.
    """
    runs = []
    for statement in pending:
        sql = statement[0]
        rows = statement[1] if len(statement) == 3 else (statement[1],)
        if runs and runs[-1][0] == sql:
            runs[-1][1].extend(rows)
        else:
            runs.append((sql, list(rows)))
    return runs
