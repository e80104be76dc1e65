"""
Tests for L{imxd.callbacks}: plain callbacks behind a Deferred's face.
"""

from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from imxd.callbacks import Callbacks
from imxd.store import Database, StoreError


class CallbacksTests(SynchronousTestCase):
    """
    L{Callbacks} tells one of its two functions, with its arguments.
    """

    def setUp(self):
        self.told = []

    def onResult(self, result, *args):
        self.told.append(("result", result, args))

    def onFailure(self, failure, *args):
        self.told.append(("failure", failure.value, args))

    def test_callback(self):
        """
        C{callback} calls C{onResult} with the result and the arguments.
        """
        Callbacks(self.onResult, self.onFailure, (1, "x")).callback("answer")
        self.assertEqual(self.told, [("result", "answer", (1, "x"))])

    def test_errbackException(self):
        """
        C{errback} with an exception calls C{onFailure} with a L{Failure}
        of it.
        """
        error = ValueError("no")
        Callbacks(self.onResult, self.onFailure, (2,)).errback(error)
        self.assertEqual(self.told, [("failure", error, (2,))])

    def test_errbackFailure(self):
        """
        A L{Failure} is passed on as it is.
        """
        failure = Failure(KeyError("k"))
        seen = []
        Callbacks(self.onResult, lambda f: seen.append(f)).errback(failure)
        self.assertIs(seen[0], failure)

    def test_errbackCurrent(self):
        """
        C{errback()} inside an C{except} block reports the exception being
        handled.
        """
        try:
            raise RuntimeError("now")
        except RuntimeError:
            Callbacks(self.onResult, self.onFailure).errback()
        self.assertEqual(len(self.told), 1)
        self.assertIsInstance(self.told[0][1], RuntimeError)

    def test_raisingCallbackLogged(self):
        """
        What a function raises is logged, not passed to whoever fired: the
        next one waiting is still told.
        """

        def broken(result):
            raise ZeroDivisionError()

        waiting = [Callbacks(broken, self.onFailure), Callbacks(self.onResult, self.onFailure)]
        for each in waiting:
            each.callback("done")
        self.assertEqual(self.told, [("result", "done", ())])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_raisingErrbackLogged(self):
        """
        The same for C{onFailure}.
        """

        def broken(failure):
            raise ZeroDivisionError()

        Callbacks(self.onResult, broken).errback(ValueError())
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class WhenCommittedTests(SynchronousTestCase):
    """
    L{Database.whenCommitted} is L{Database.committed} without a Deferred.
    """

    def setUp(self):
        self.clock = Clock()
        self.database = Database(":memory:", self.clock)
        self.database.schema("CREATE TABLE t (x INTEGER)")
        self.told = []

    def test_nothingQueued(self):
        """
        With nothing queued, it is told at once.
        """
        self.database.whenCommitted(lambda r, a: self.told.append(("ok", a)), None, "a")
        self.assertEqual(self.told, [("ok", "a")])

    def test_afterCommit(self):
        """
        With writes queued, it is told by the commit, after them, and the
        rows are readable by then.
        """
        self.database.write("INSERT INTO t VALUES (1)")

        def committed(result, marker):
            self.told.append((marker, self.database.read("SELECT x FROM t")))

        self.database.whenCommitted(committed, None, "m")
        self.assertEqual(self.told, [])
        self.clock.advance(0)
        self.assertEqual(self.told, [("m", [(1,)])])

    def test_failedCommit(self):
        """
        A commit that fails tells C{onFailure} with a L{StoreError}.
        """
        self.database.write("INSERT INTO missing VALUES (1)")
        self.database.whenCommitted(None, lambda f: self.told.append(f.value))
        self.clock.advance(0)
        self.assertEqual(len(self.told), 1)
        self.assertIsInstance(self.told[0], StoreError)
        self.flushLoggedErrors()
