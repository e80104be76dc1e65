"""
Tests for L{imxd.backend.local.store}: accounts with scrypt passwords,
block lists, subscription decisions, contacts and kept events.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from imxd.backend.local import store
from imxd.backend.local.store import AccountError, AccountStore, checkPassword, hashPassword


class PasswordTests(SynchronousTestCase):
    """
    scrypt hashes.
    """

    def test_roundTrip(self):
        """
        A password checks against its own hash and no other password does.
        """
        stored = hashPassword("correct horse")
        self.assertTrue(stored.startswith(f"scrypt${store.SCRYPT_N}$"))
        self.assertTrue(checkPassword("correct horse", stored))
        self.assertFalse(checkPassword("correct hors", stored))

    def test_salted(self):
        """
        The same password hashes differently each time, and the hash does
        not contain it.
        """
        first, second = hashPassword("pw-secret"), hashPassword("pw-secret")
        self.assertNotEqual(first, second)
        self.assertNotIn("pw-secret", first)

    def test_garbage(self):
        """
        A stored value that is not a hash matches nothing.
        """
        for stored in ("", "plain", "md5$1$2$3$aa$bb", "scrypt$x$8$1$aa$bb"):
            self.assertFalse(checkPassword("x", stored))


class AccountTests(SynchronousTestCase):
    """
    Accounts of several domains in one store.
    """

    def setUp(self):
        self.path = os.path.abspath(self.mktemp())
        self.store = AccountStore(self.path)
        self.addCleanup(self.store.close)

    def test_fileMode(self):
        """
        The database file is readable by its owner only.
        """
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_addAndAuthenticate(self):
        """
        An account is created under its canonical address; the right
        password authenticates it, a wrong one or an unknown user does not.
        """
        self.assertEqual(self.store.addUser("Alice@A.test", "pw", "Alice"), "alice@a.test")
        self.assertEqual(self.store.authenticate("ALICE@a.test", "pw"), "alice@a.test")
        self.assertIsNone(self.store.authenticate("alice@a.test", "wrong"))
        self.assertIsNone(self.store.authenticate("nobody@a.test", "pw"))
        self.assertIsNone(self.store.authenticate("not an address", "pw"))
        self.assertEqual(self.store.alias("alice@a.test"), "Alice")

    def test_passwordNotStored(self):
        """
        The password itself is nowhere in the database file.
        """
        self.store.addUser("alice@a.test", "unguessable-pw-123")
        self.store.close()
        with open(self.path, "rb") as f:
            self.assertNotIn(b"unguessable-pw-123", f.read())
        self.store = AccountStore(self.path)

    def test_duplicate(self):
        """
        An address (once normalised) has one account only.
        """
        self.store.addUser("alice@a.test", "pw")
        self.assertRaises(AccountError, self.store.addUser, "ALICE@a.test", "pw2")

    def test_invalid(self):
        """
        An invalid address or an empty password is refused.
        """
        self.assertRaises(AccountError, self.store.addUser, "no-at-sign", "pw")
        self.assertRaises(AccountError, self.store.addUser, "a@a.test", "")

    def test_listAndRemove(self):
        """
        Users are listed per domain; removing one removes what was kept for
        it.
        """
        for address in ("bob@a.test", "alice@a.test", "carol@b.test"):
            self.store.addUser(address, "pw")
        self.assertEqual(self.store.users("A.test"), ["alice@a.test", "bob@a.test"])
        self.store.block("bob@a.test", "x.test")
        self.store.keep("bob@a.test", {"type": "message"})
        self.store.removeUser("bob@a.test")
        self.assertEqual(self.store.users("a.test"), ["alice@a.test"])
        self.assertEqual(self.store.blocks("bob@a.test"), [])
        self.assertEqual(self.store.kept("bob@a.test"), [])
        self.assertRaises(AccountError, self.store.removeUser, "bob@a.test")

    def test_setPassword(self):
        """
        A new password replaces the old; an unknown account is refused.
        """
        self.store.addUser("alice@a.test", "old")
        self.store.setPassword("alice@a.test", "new")
        self.assertIsNone(self.store.authenticate("alice@a.test", "old"))
        self.assertEqual(self.store.authenticate("alice@a.test", "new"), "alice@a.test")
        self.assertRaises(AccountError, self.store.setPassword, "x@a.test", "pw")

    def test_survivesReopen(self):
        """
        Accounts are on disk: a new store on the same file has them.
        """
        self.store.addUser("alice@a.test", "pw")
        self.store.close()
        self.store = AccountStore(self.path)
        self.assertEqual(self.store.authenticate("alice@a.test", "pw"), "alice@a.test")


class PolicyTests(SynchronousTestCase):
    """
    Block lists, only-granted, decisions, contacts and kept events.
    """

    def setUp(self):
        self.store = AccountStore(":memory:")
        self.store.addUser("alice@a.test", "pw")

    def test_blockAddressAndDomain(self):
        """
        A blocked address or a blocked domain blocks its senders; others
        pass.
        """
        self.store.block("alice@a.test", "Eve@E.test")
        self.store.block("alice@a.test", "spam.test")
        self.assertTrue(self.store.isBlocked("alice@a.test", "eve@e.test"))
        self.assertTrue(self.store.isBlocked("alice@a.test", "anyone@spam.test"))
        self.assertFalse(self.store.isBlocked("alice@a.test", "bob@e.test"))
        self.assertEqual(self.store.blocks("alice@a.test"), ["eve@e.test", "spam.test"])
        self.store.unblock("alice@a.test", "spam.test")
        self.assertFalse(self.store.isBlocked("alice@a.test", "anyone@spam.test"))
        self.assertRaises(AccountError, self.store.block, "alice@a.test", "bad..domain")

    def test_onlyGranted(self):
        """
        The only-granted option is off by default and can be set.
        """
        self.assertFalse(self.store.onlyGranted("alice@a.test"))
        self.store.setOnlyGranted("alice@a.test", True)
        self.assertTrue(self.store.onlyGranted("alice@a.test"))

    def test_decisions(self):
        """
        Decisions are remembered; pending ones are listed.
        """
        self.assertIsNone(self.store.decision("alice@a.test", "bob@b.test"))
        self.store.setDecision("alice@a.test", "bob@b.test", "pending")
        self.store.setDecision("alice@a.test", "carol@c.test", "granted")
        self.assertEqual(self.store.pendingRequests("alice@a.test"), ["bob@b.test"])
        self.store.setDecision("alice@a.test", "bob@b.test", "denied")
        self.assertEqual(self.store.decision("alice@a.test", "bob@b.test"), "denied")
        self.assertEqual(self.store.pendingRequests("alice@a.test"), [])

    def test_contacts(self):
        """
        Wanted subscriptions are remembered with their state.
        """
        self.store.setContact("alice@a.test", "bob@b.test", "pending")
        self.store.setContact("alice@a.test", "bob@b.test", "granted")
        self.assertEqual(self.store.contacts("alice@a.test"), {"bob@b.test": "granted"})
        self.assertEqual(self.store.allContacts("a.test"), [("alice@a.test", "bob@b.test")])
        self.store.removeContact("alice@a.test", "bob@b.test")
        self.assertEqual(self.store.contacts("alice@a.test"), {})

    def test_keptEvents(self):
        """
        Events are kept in order, read after an id, forgotten up to an id,
        and capped per user.
        """
        self.patch(store, "OFFLINE_CAP", 3)
        ids = [self.store.keep("alice@a.test", {"n": n}) for n in range(3)]
        self.assertRaises(AccountError, self.store.keep, "alice@a.test", {"n": 3})
        self.assertEqual([e["n"] for _, e in self.store.kept("alice@a.test")], [0, 1, 2])
        self.assertEqual([e["n"] for _, e in self.store.kept("alice@a.test", ids[0])], [1, 2])
        self.store.forget("alice@a.test", ids[1])
        self.assertEqual([e["n"] for _, e in self.store.kept("alice@a.test")], [2])


class UserCommandTests(SynchronousTestCase):
    """
    C{imxctl user add|passwd|remove|list} on a local domain's database.
    """

    def setUp(self):
        self.patch(store, "SCRYPT_N", 2**4)
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.config = os.path.join(self.directory, "imxd.toml")
        with open(self.config, "w") as f:
            f.write(
                '[server]\nstate_dir = "state"\nlisten = ["tcp:0"]\n'
                '[[domain]]\nname = "a.test"\nbackend = "local"\n'
                'backend_options = { database = "accounts.sqlite" }\n'
                '[[domain]]\nname = "s.test"\nbackend = "spool"\n'
                'backend_options = { directory = "spool" }\n'
            )

    def imxctl(self, *argv, stdin=""):
        import contextlib
        import io

        from imxd import imxctl

        out, err = io.StringIO(), io.StringIO()
        self.patch(imxctl.sys, "stdin", io.StringIO(stdin))
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = imxctl.main(["-c", self.config, "user", *argv])
        return status, out.getvalue(), err.getvalue()

    def store(self):
        opened = AccountStore(os.path.join(self.directory, "accounts.sqlite"))
        self.addCleanup(opened.close)
        return opened

    def test_lifecycle(self):
        """
        An account is added with a password from stdin, listed, given a
        new password and removed; the password is never printed.
        """
        status, out, _ = self.imxctl("add", "Ann@A.test", "--alias", "Ann", "--password-stdin",
                                  stdin="first secret\n")
        self.assertEqual((status, out), (0, "added ann@a.test\n"))
        self.assertEqual(self.store().authenticate("ann@a.test", "first secret"), "ann@a.test")
        self.assertEqual(self.store().alias("ann@a.test"), "Ann")
        self.assertEqual(self.imxctl("list", "a.test")[:2], (0, "ann@a.test\n"))
        status, out, _ = self.imxctl("passwd", "ann@a.test", "--password-stdin", stdin="second\n")
        self.assertEqual(status, 0)
        self.assertNotIn("second", out)
        self.assertIsNone(self.store().authenticate("ann@a.test", "first secret"))
        self.assertEqual(self.store().authenticate("ann@a.test", "second"), "ann@a.test")
        self.assertEqual(self.imxctl("remove", "ann@a.test")[:2], (0, "removed ann@a.test\n"))
        self.assertEqual(self.imxctl("list", "a.test")[:2], (0, ""))

    def test_prompt(self):
        """
        Without --password-stdin the password is asked twice; entries that
        differ are refused.
        """
        import getpass

        answers = iter(["one", "two"])
        self.patch(getpass, "getpass", lambda prompt: next(answers))
        status, _, err = self.imxctl("add", "bo@a.test")
        self.assertEqual((status, err), (1, "imxctl: the passwords differ\n"))
        answers = iter(["same", "same"])
        self.assertEqual(self.imxctl("add", "bo@a.test")[0], 0)
        self.assertEqual(self.store().authenticate("bo@a.test", "same"), "bo@a.test")

    def test_refusals(self):
        """
        Each mistake is one line and exit status 1.
        """
        self.imxctl("add", "ann@a.test", "--password-stdin", stdin="pw\n")
        for argv, stdin, words in [
            (("add", "ann@a.test", "--password-stdin"), "pw\n", "ann@a.test already exists"),
            (("add", "cy@a.test", "--password-stdin"), "\n", "may not be empty"),
            (("add", "cy@s.test", "--password-stdin"), "pw\n", "s.test uses the spool backend"),
            (("add", "cy@z.test", "--password-stdin"), "pw\n", "z.test is not hosted"),
            (("remove", "nobody@a.test"), "", "no such user"),
            (("passwd", "nobody@a.test", "--password-stdin"), "pw\n", "no such user"),
        ]:
            status, _, err = self.imxctl(*argv, stdin=stdin)
            self.assertEqual(status, 1, argv)
            self.assertIn(words, err)
            self.assertEqual(err.count("\n"), 1)


FORK_SCRIPT = """
import os
from imxd.backend.local.store import AccountStore
store = AccountStore({path!r})
store.addUser("ann@a.test", "secret-1")
before = store._db
child = os.fork()
if child == 0:
    print("child-connection-" + ("new" if store._db is not before else "inherited"), flush=True)
    store.addUser("bob@a.test", "secret-2")
    store.close()
    os._exit(0)
os.waitpid(child, 0)
print("parent-sees-" + str(int(store.exists("bob@a.test"))), flush=True)
"""


class ForkTests(SynchronousTestCase):
    """
    The account store in a child after a fork (C{twistd} forks to become a
    daemon after building the server).
    """

    def test_afterFork(self):
        """
        The child reads and writes on a connection of its own, and what it
        writes is in the file.
        """
        script = FORK_SCRIPT.format(path=self.mktemp())
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        self.assertEqual(done.stdout.split(), ["child-connection-new", "parent-sees-1"], done.stderr)
