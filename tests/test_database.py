"""
Tests for L{imxd.store.Database} committing on a thread of its own.
"""

import queue

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from imxd.store import Database, StoreError

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
