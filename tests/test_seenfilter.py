"""
The dedupe filter in memory (L{imxd.store.seenfilter}) and the dedupe
table that uses it (L{imxd.store.SeenStore}).
"""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from imxd.store import Database, SeenStore
from imxd.store.seenfilter import SeenFilter

#: A first generation small enough for tests that fill several.
SMALL = 1 << 12

_ids = st.text(min_size=1, max_size=40)
_pairs = st.lists(st.tuples(st.sampled_from(["a.test", "b.test", "c.test"]), _ids), max_size=200)


class SeenFilterTests(SynchronousTestCase):
    """
    L{SeenFilter} never forgets a pair it holds, rarely claims one it does
    not, and forgets whole generations by age.
    """

    @settings(max_examples=50, deadline=None)
    @given(_pairs)
    def test_noFalseNegatives(self, pairs):
        """
        Every pair added is answered "perhaps seen".
        """
        seen = SeenFilter()
        for at, (origin, messageId) in enumerate(pairs):
            seen.add(origin, messageId, float(at))
        for origin, messageId in pairs:
            self.assertTrue(seen.mayContain(origin, messageId))

    def test_acrossGenerations(self):
        """
        Pairs stay found when they fill several generations.
        """
        seen = SeenFilter(SMALL)
        count = SMALL * 4
        for n in range(count):
            seen.add("a.test", f"m-{n}", float(n))
        self.assertEqual(seen.generations(), 3)
        self.assertTrue(all(seen.mayContain("a.test", f"m-{n}") for n in range(count)))

    def test_fewFalsePositives(self):
        """
        Of 20,000 pairs never added, under 2 % are answered "perhaps" by
        two full generations (about 0.8 % is expected).
        """
        seen = SeenFilter(SMALL)
        for n in range(SMALL * 3):
            seen.add("a.test", f"m-{n}", float(n))
        wrong = sum(seen.mayContain("a.test", f"new-{n}") for n in range(20000))
        self.assertLess(wrong, 400)

    def test_originMatters(self):
        """
        The same id from another origin is another pair.
        """
        seen = SeenFilter()
        seen.add("a.test", "m1", 0.0)
        self.assertFalse(seen.mayContain("c.test", "m1"))

    def test_forget(self):
        """
        L{SeenFilter.forget} drops the generations whose pairs are all
        older than its time, and keeps those with a newer pair.
        """
        seen = SeenFilter(SMALL)
        for n in range(SMALL + 10):
            seen.add("a.test", f"m-{n}", float(n))
        self.assertEqual(seen.generations(), 2)
        seen.forget(float(SMALL - 1))
        self.assertEqual(seen.generations(), 2)
        seen.forget(float(SMALL))
        self.assertEqual(seen.generations(), 1)
        self.assertTrue(seen.mayContain("a.test", f"m-{SMALL + 5}"))
        self.assertFalse(seen.mayContain("a.test", "m-1"))
        seen.forget(float(2 * SMALL))
        self.assertEqual(seen.generations(), 1)
        self.assertFalse(seen.mayContain("a.test", f"m-{SMALL + 5}"))
        seen.add("a.test", "later", 1e9)
        self.assertTrue(seen.mayContain("a.test", "later"))


class SeenStoreTests(SynchronousTestCase):
    """
    L{SeenStore} reads its table only for ids the filter cannot rule out,
    and fills the filter from the table when it is opened again.
    """

    def setUp(self):
        self.clock = Clock()
        self.path = self.mktemp()
        self.database = Database(self.path, self.clock)
        self.addCleanup(lambda: self.database.close())

    def test_newIdNeedsNoLookup(self):
        """
        Ids never received are answered from the filter alone.
        """
        store = SeenStore(self.database)
        for n in range(100):
            store.add("a.test", f"m-{n}", 0.0)
        self.database.commit()
        self.assertFalse(any(store.contains("a.test", f"new-{n}") for n in range(1000)))
        self.assertLess(store.lookups, 20)

    def test_seenIdLookedUp(self):
        """
        An id received is confirmed in the table; one in the filter but
        not yet committed is not seen.
        """
        store = SeenStore(self.database)
        store.add("a.test", "m1", 0.0)
        self.assertFalse(store.contains("a.test", "m1"))
        self.database.commit()
        self.assertTrue(store.contains("a.test", "m1"))
        self.assertEqual(store.lookups, 2)

    def test_reopened(self):
        """
        Opened again, the store finds what the table holds.
        """
        store = SeenStore(self.database)
        for n in range(3):
            store.add("a.test", f"m-{n}", float(n))
        self.database.close()
        self.database = Database(self.path, self.clock)
        again = SeenStore(self.database)
        self.assertTrue(all(again.contains("a.test", f"m-{n}") for n in range(3)))
        self.assertFalse(again.contains("a.test", "m-3"))

    def test_pruneForgets(self):
        """
        Pruning removes old ids from the table and their generation from
        the filter.
        """
        store = SeenStore(self.database)
        store.add("a.test", "old", 10.0)
        self.database.commit()
        self.assertEqual(store.prune(20.0), 1)
        self.database.commit()
        self.assertFalse(store.filter.mayContain("a.test", "old"))
        self.assertFalse(store.contains("a.test", "old"))
