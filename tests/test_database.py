"""
Tests for L{imxd.store.Database}: committing on a thread of its own, and
writes that may be called off until their commit is put together.
"""

import queue
import subprocess
import sys

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from imxd.callbacks import Callbacks
from imxd.router import Router
from imxd.store import Database, OutboundStore, SeenStore, StoreError
from imxd.store.database import Rows
from imxd.store import database as databaseModule
from imxd.store.seen import PRUNE_CHUNK
from imxd.wire import EncodeError
from tests.network import message

#: Seconds a test waits for the writer thread at most.
WAIT = 10.0


class ThreadClock(Clock):
    """
    A L{Clock} that also takes calls from other threads, run when the test
    says (L{runFromThreads}), as the reactor's thread would.
    """

    def __init__(self):
        super().__init__()
        self.fromThreads = queue.SimpleQueue()

    def callFromThread(self, f, *args, **kwargs):
        self.fromThreads.put((f, args, kwargs))

    def runFromThreads(self):
        """
        Wait (at most L{WAIT} seconds) for one call from another thread and
        run it, then run the calls scheduled now.
        """
        f, args, kwargs = self.fromThreads.get(timeout=WAIT)
        f(*args, **kwargs)
        self.advance(0)


class ThreadedTests(SynchronousTestCase):
    """
    A threaded L{Database} commits on its writer thread; the reactor hears
    of each commit and tells those waiting.
    """

    def setUp(self):
        self.clock = ThreadClock()
        self.path = self.mktemp()
        self.database = self.open()
        self.told = []

    def open(self):
        database = Database(self.path, self.clock, threaded=True)
        self.addCleanup(database.close)
        database.schema("CREATE TABLE IF NOT EXISTS t (x INTEGER)")
        return database

    def tell(self, result, name):
        self.told.append((name, self.database.read("SELECT x FROM t ORDER BY x")))

    def failed(self, failure, name):
        self.told.append((name, failure.value))

    def test_committedOnThread(self):
        """
        Those waiting are told only once the thread committed and the
        reactor heard of it; the rows are readable then.
        """
        self.assertTrue(self.database.threaded)
        self.database.write("INSERT INTO t VALUES (1)")
        self.database.whenCommitted(self.tell, self.failed, "first")
        self.clock.advance(0)
        self.assertEqual(self.told, [])
        self.clock.runFromThreads()
        self.assertEqual(self.told, [("first", [(1,)])])
        self.assertEqual(self.database.commits, 1)

    def test_nextCommitAfterThisOne(self):
        """
        Writes queued while a commit is under way go in the next one, and
        a wait begun meanwhile (even with nothing more queued) waits for
        the one under way.
        """
        self.database.write("INSERT INTO t VALUES (1)")
        self.clock.advance(0)
        self.database.whenCommitted(self.tell, self.failed, "during")
        self.database.write("INSERT INTO t VALUES (2)")
        self.database.whenCommitted(self.tell, self.failed, "second")
        self.clock.advance(0)
        self.assertEqual(self.told, [])
        self.clock.runFromThreads()
        self.clock.runFromThreads()
        self.assertEqual(self.told, [("during", [(1,), (2,)]), ("second", [(1,), (2,)])])
        self.assertEqual(self.database.commits, 2)

    def test_waitWhileBusy(self):
        """
        With nothing queued but a commit under way, a wait ends with it.
        """
        self.database.write("INSERT INTO t VALUES (1)")
        self.clock.advance(0)
        self.database.whenCommitted(self.tell, self.failed, "busy")
        self.assertEqual(self.told, [])
        self.clock.runFromThreads()
        self.assertEqual(self.told, [("busy", [(1,)])])

    def test_failure(self):
        """
        A transaction that fails is rolled back and reported as
        L{StoreError}; the next one commits.
        """
        self.database.write("INSERT INTO missing VALUES (1)")
        self.database.whenCommitted(self.tell, self.failed, "bad")
        self.clock.advance(0)
        self.clock.runFromThreads()
        self.assertEqual(len(self.told), 1)
        self.assertIsInstance(self.told[0][1], StoreError)
        self.database.write("INSERT INTO t VALUES (3)")
        self.database.whenCommitted(self.tell, self.failed, "good")
        self.clock.advance(0)
        self.clock.runFromThreads()
        self.assertEqual(self.told[1], ("good", [(3,)]))

    def test_closeWaits(self):
        """
        L{Database.close} lets the commit under way end, tells its waiters,
        commits what is still queued, and the rows are in the file.
        """
        self.database.write("INSERT INTO t VALUES (1)")
        self.database.whenCommitted(self.tell, self.failed, "first")
        self.clock.advance(0)
        self.database.write("INSERT INTO t VALUES (2)")
        self.database.whenCommitted(self.tell, self.failed, "second")
        self.database.close()
        self.assertEqual([name for name, _ in self.told], ["first", "second"])
        reopened = Database(self.path, Clock())
        self.addCleanup(reopened.close)
        self.assertEqual(reopened.read("SELECT x FROM t ORDER BY x"), [(1,), (2,)])

    def test_memoryRefused(self):
        """
        A database in memory cannot be threaded: each connection would
        have its own.
        """
        self.assertRaises(StoreError, Database, ":memory:", self.clock, threaded=True)


class ThreadedRobustnessTests(SynchronousTestCase):
    """
    What the review of the writer thread found: pruning in chunks, a
    transaction that raises anything, L{Database.flush}, and a fork.
    """

    def setUp(self):
        self.clock = ThreadClock()
        self.path = self.mktemp()

    def test_pruneChunksOnce(self):
        """
        Pruning reads the next chunk only once the last one is committed,
        so each expired id is deleted once (read before the commit, the
        same rows came back on every turn).
        """
        filled = Database(self.path, Clock())
        seen = SeenStore(filled)
        for n in range(2 * PRUNE_CHUNK + 10):
            seen.add("a.test", f"m-{n}", 0.0)
        filled.close()
        database = Database(self.path, self.clock, threaded=True)
        self.addCleanup(database.close)
        store = SeenStore(database)
        chunks = []

        def prune(before):
            chunks.append(before)
            if len(chunks) > 10:
                raise AssertionError("the same expired ids were read again and again")
            return SeenStore.prune(store, before)

        store.prune = prune
        router = Router(None, None, self.clock, store, dedupeWindow=10)
        self.clock.advance(100)
        router.start()
        self.addCleanup(router.stop)
        for _ in range(3):
            self.clock.advance(0)
            self.clock.runFromThreads()
        self.assertEqual(database.read("SELECT COUNT(*) FROM seen"), [(0,)])
        self.assertEqual((database.writes, len(chunks)), (3, 4))

    def test_threadOutlivesAnyFailure(self):
        """
        A transaction that raises even a L{BaseException} fails its waiters
        with L{StoreError}; the thread goes on and the next commit works.
        """
        database = Database(self.path, self.clock, threaded=True)
        self.addCleanup(database.close)
        database.schema("CREATE TABLE t (x INTEGER)")
        failures = []
        real = databaseModule._transact
        calls = []

        def interrupted(connection, pending):
            calls.append(1)
            if len(calls) == 1:
                raise KeyboardInterrupt()
            return real(connection, pending)

        self.patch(databaseModule, "_transact", interrupted)
        database.write("INSERT INTO t VALUES (1)")
        database.whenCommitted(None, lambda f: failures.append(f.value))
        self.clock.advance(0)
        self.clock.runFromThreads()
        self.assertIsInstance(failures[0], StoreError)
        database.write("INSERT INTO t VALUES (2)")
        database.whenCommitted(lambda r: failures.append("ok"), None)
        self.clock.advance(0)
        self.clock.runFromThreads()
        self.assertEqual(failures[1], "ok")
        self.assertEqual(database.read("SELECT x FROM t"), [(2,)])

    def test_flush(self):
        """
        L{Database.flush} waits for the commit under way, then commits the
        rest before returning.
        """
        database = Database(self.path, self.clock, threaded=True)
        self.addCleanup(database.close)
        database.schema("CREATE TABLE t (x INTEGER)")
        told = []
        database.write("INSERT INTO t VALUES (1)")
        database.whenCommitted(lambda r: told.append(1), None)
        self.clock.advance(0)
        database.write("INSERT INTO t VALUES (2)")
        database.whenCommitted(lambda r: told.append(2), None)
        database.flush()
        self.assertEqual(told, [1, 2])
        self.assertEqual(database.read("SELECT x FROM t ORDER BY x"), [(1,), (2,)])

    def test_afterFork(self):
        """
        A threaded database made before a fork (as C{twistd} makes the
        server, then forks to become a daemon) commits in the child: its
        writer thread starts there, and the child reads and writes on a
        connection of its own, not on the one the parent opened.
        """
        script = FORK_SCRIPT.format(path=self.path)
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
        )
        self.assertEqual(
            done.stdout.split(),
            ["child-connection-new", "child-committed", "parent-saw-1"],
            done.stderr,
        )


FORK_SCRIPT = """
import os, sys
from twisted.internet import reactor
from imxd.store import Database
database = Database({path!r}, reactor, threaded=True)
database.schema("CREATE TABLE t (x INTEGER)")
before = database._db
child = os.fork()
if child == 0:
    print("child-connection-" + ("new" if database._db is not before else "inherited"), flush=True)
    database.write("INSERT INTO t VALUES (1)")
    def committed(result):
        print("child-committed", flush=True)
        reactor.stop()
    database.whenCommitted(committed, lambda f: reactor.stop())
    reactor.callLater(20, reactor.stop)
    reactor.run()
    database.close()
    os._exit(0)
os.waitpid(child, 0)
print("parent-saw-" + str(database.read("SELECT COUNT(*) FROM t")[0][0]), flush=True)
"""


class WrittenWhileRemovedTests(SynchronousTestCase):
    """
    A message removed while the transaction that writes it is under way on
    the writer thread is deleted by the next transaction.
    """

    def test_removedWhileWriting(self):
        """
        Its removal is a write to wait for, and once both transactions end
        nothing of it is left.
        """
        clock = ThreadClock()
        database = Database(self.mktemp(), clock, threaded=True)
        self.addCleanup(database.close)
        store = OutboundStore(database)
        entry = store.add("a.test", "b.test", message("alice@a.test", "bob@b.test", "m1"), 0.0)
        written = store.committed()
        clock.advance(0)
        self.assertTrue(store.remove(entry.seq))
        removed = store.committed()
        clock.runFromThreads()
        self.successResultOf(written)
        self.assertNoResult(removed)
        clock.runFromThreads()
        self.successResultOf(removed)
        self.assertEqual(store.load(), [])


class WriteLaterTests(SynchronousTestCase):
    """
    Writes queued with L{Database.writeLater} are asked for when the next
    transaction is put together, which may wait for them.
    """

    def setUp(self):
        self.clock = Clock()
        self.database = Database(":memory:", self.clock)
        self.database.schema("CREATE TABLE t (x INTEGER)")
        self.rows = []

    def provider(self, final, told):
        rows, self.rows = self.rows, []
        return [("INSERT INTO t VALUES (?)", [(x,) for x in rows])]

    def values(self):
        return [x for (x,) in self.database.read("SELECT x FROM t ORDER BY x")]

    def test_askedWhenPutTogether(self):
        """
        The provider is asked when the commit is put together, so what it
        holds then is written, and what it dropped before is not.
        """
        self.rows = [1, 2, 3]
        self.database.writeLater(self.provider)
        self.rows.remove(2)
        self.rows.append(4)
        self.clock.advance(0)
        self.assertEqual(self.values(), [1, 3, 4])

    def test_delay(self):
        """
        The commit waits C{delay} for the provider's writes, and those
        waiting for it are told then.
        """
        self.rows = [1]
        self.database.writeLater(self.provider, 0.005)
        committed = self.database.committed()
        self.clock.advance(0.004)
        self.assertNoResult(committed)
        self.assertEqual(self.values(), [])
        self.clock.advance(0.001)
        self.successResultOf(committed)
        self.assertEqual(self.values(), [1])

    def test_otherWritesComeSooner(self):
        """
        A plain write queued meanwhile brings the commit forward, with the
        provider's writes in it.
        """
        self.rows = [1]
        self.database.writeLater(self.provider, 0.005)
        self.clock.advance(0.001)
        self.database.write("INSERT INTO t VALUES (?)", (2,))
        self.clock.advance(0)
        self.assertEqual(self.values(), [1, 2])

    def test_providerFails(self):
        """
        A provider that raises fails that commit (those waiting hear a
        L{StoreError}), and the next commit works.
        """

        def broken(final, told):
            raise ValueError("no rows today")

        self.database.writeLater(broken)
        failed = self.database.committed()
        self.clock.advance(0)
        self.failureResultOf(failed, StoreError)
        self.database.write("INSERT INTO t VALUES (?)", (7,))
        done = self.database.committed()
        self.clock.advance(0)
        self.successResultOf(done)
        self.assertEqual(self.values(), [7])
        self.flushLoggedErrors()

    def test_everyProviderAsked(self):
        """
        When one provider raises, the others are still asked (none keeps
        rows that no later commit would ask for), and those waiting on
        their writes hear of the failure.
        """
        told = []

        def broken(final, waiting):
            raise ValueError("no rows today")

        def other(final, waiting):
            waiting.append(Callbacks(told.append, lambda f: told.append(f.value), ()))
            return [("INSERT INTO t VALUES (?)", [(1,)])]

        self.database.writeLater(broken)
        self.database.writeLater(other)
        self.clock.advance(0)
        [failure] = told
        self.assertIsInstance(failure, StoreError)
        self.assertEqual(self.values(), [])
        self.flushLoggedErrors()

    def test_nothingLeft(self):
        """
        When the provider has nothing left to write, no transaction is run
        and those waiting are told at once.
        """
        self.database.writeLater(self.provider, 0.005)
        committed = self.database.committed()
        self.clock.advance(0.005)
        self.successResultOf(committed)
        self.assertEqual(self.database.commits, 0)


class OutboundStoreWriteBehindTests(SynchronousTestCase):
    """
    L{OutboundStore} writes a message only if it is still there when its
    commit is put together.
    """

    def setUp(self):
        self.clock = Clock()
        self.database = Database(":memory:", self.clock)
        self.store = OutboundStore(self.database, writeBehind=0.005)

    def add(self, messageId):
        return self.store.add("a.test", "b.test", message("alice@a.test", "bob@b.test", messageId), 0.0)

    def test_removedBeforeWritten(self):
        """
        A message removed within C{writeBehind} is never written: its
        removal is nothing to wait for; one written is deleted with a
        commit that waits C{writeBehind} too.
        """
        first, second = self.add("m1"), self.add("m2")
        self.assertFalse(self.store.remove(first.seq))
        self.clock.advance(0.005)
        self.assertEqual([e.record.messageId for e in self.store.load()], ["m2"])
        self.assertEqual(self.database.writes, 1)
        self.assertTrue(self.store.remove(second.seq))
        self.clock.advance(0.004)
        self.assertEqual(len(self.store.load()), 1)
        self.clock.advance(0.001)
        self.assertEqual(self.store.load(), [])

    def test_writtenOnceOldEnough(self):
        """
        A commit writes only the messages added at least C{writeBehind}
        ago; the others wait for a later one, and each is told when it is
        written.
        """
        told = []
        first = self.add("m1")
        self.store.whenWritten(first.seq, lambda _, name: told.append(name), None, "m1")
        self.clock.advance(0.003)
        second = self.add("m2")
        self.store.whenWritten(second.seq, lambda _, name: told.append(name), None, "m2")
        self.clock.advance(0.002)
        self.assertEqual([e.record.messageId for e in self.store.load()], ["m1"])
        self.assertEqual(told, ["m1"])
        self.clock.advance(0.002)
        self.assertEqual(told, ["m1"])
        self.clock.advance(0.001)
        self.assertEqual([e.record.messageId for e in self.store.load()], ["m1", "m2"])
        self.assertEqual(told, ["m1", "m2"])

    def test_churnQueuesOnce(self):
        """
        However messages come and go before they are written, the store is
        queued with the database once, not once per emptying.
        """
        for n in range(200):
            kept = self.add(f"k{n}")
            self.store.remove(self.add(f"e{n}").seq)
            self.clock.advance(0.001)
            self.assertLessEqual(len(self.database._pending), 1)
            self.store.remove(kept.seq)
            self.clock.advance(0.001)
        self.assertLessEqual(len(self.database._pending), 1)
        self.assertEqual(self.database.writes, 0)

    def test_clockSetBack(self):
        """
        A message stamped later than the clock now says (the clock was set
        back) is written with the next commit, not held until the clock
        catches up.
        """
        self.clock.advance(1000)
        self.add("m1")
        self.clock.rightNow = 100.0
        # Another write brings the commit forward (the clock's own timers
        # wait for the time they were set for).
        self.database.write("DELETE FROM outbound WHERE seq = ?", (0,))
        self.clock.advance(0)
        self.assertEqual([e.record.messageId for e in self.store.load()], ["m1"])

    def test_notWaiting(self):
        """
        C{whenWritten} for a message that is not waiting to be written
        calls neither function.
        """
        entry = self.add("m1")
        self.clock.advance(0.005)
        told = []
        self.store.whenWritten(entry.seq, told.append, told.append)
        self.store.whenWritten(12345, told.append, told.append)
        self.clock.advance(0.1)
        self.assertEqual(told, [])

    def test_flushWritesAll(self):
        """
        L{Database.flush} (at shutdown) writes every message, however
        young.
        """
        self.add("m1")
        self.database.flush()
        self.assertEqual([e.record.messageId for e in self.store.load()], ["m1"])

    def test_unencodableRefusedAtOnce(self):
        """
        A message that cannot be encoded is refused when added, not when
        its commit is put together.
        """
        self.assertRaises(EncodeError, self.add, "x" * 200)
        self.clock.advance(0.005)
        self.assertEqual(self.store.load(), [])


class RowsTests(SynchronousTestCase):
    """
    A L{Rows} statement runs the rows of a transaction as few multi-row
    statements.
    """

    def setUp(self):
        self.clock = Clock()
        self.database = Database(":memory:", self.clock)
        self.database.schema("CREATE TABLE t (a INTEGER PRIMARY KEY, b TEXT)")

    def test_runs(self):
        """
        Rows are cut into statements of C{MANY}, then C{SOME}, then one,
        each with the flattened parameters of its rows, in order.
        """
        statement = Rows("INSERT INTO t (a, b) VALUES ", "(?, ?)")
        rows = [(n, str(n)) for n in range(2 * Rows.MANY + Rows.SOME + 3)]
        runs = statement.runs(rows)
        self.assertEqual(
            [(sql.count("(?, ?)"), len(parameters)) for sql, parameters in runs],
            [(Rows.MANY, 2), (Rows.SOME, 1), (1, 3)],
        )
        self.assertEqual(runs[0][1][1][:4], (Rows.MANY, str(Rows.MANY), Rows.MANY + 1, str(Rows.MANY + 1)))
        self.assertEqual(runs[2][1], rows[-3:])
        self.assertEqual(statement.runs([]), [])

    def test_written(self):
        """
        Writes of L{Rows} statements queued in one turn are all committed,
        inserts and deletes in the order queued.
        """
        insert = Rows("INSERT INTO t (a, b) VALUES ", "(?, ?)")
        delete = Rows("DELETE FROM t WHERE a IN (", "?", ")")
        for n in range(Rows.MANY + Rows.SOME + 5):
            self.database.write(insert, (n, f"v{n}"))
        for n in range(0, Rows.MANY + Rows.SOME + 5, 2):
            self.database.write(delete, (n,))
        self.database.write(insert, (0, "again"))
        self.clock.advance(0)
        values = dict(self.database.read("SELECT a, b FROM t"))
        expected = {n: f"v{n}" for n in range(1, Rows.MANY + Rows.SOME + 5, 2)}
        expected[0] = "again"
        self.assertEqual(values, expected)
