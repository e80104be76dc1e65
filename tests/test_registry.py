"""
Tests for the backend registry, L{imxd.backend}, and the C{memory} backend.
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from imxd.backend import (
    BackendRegistration,
    backendKinds,
    lookupBackend,
    registerBackend,
    unregisterBackend,
    validateBackendOptions,
)
from imxd.backend.interfaces import IBackend
from imxd.backend.memory import MemoryBackend
from imxd.config import DomainConfig, PolicyConfig


def _validateColour(options, baseDirectory="."):
    unknown = set(options) - {"colour"}
    if unknown:
        raise ValueError(f"unknown option {sorted(unknown)[0]!r}")
    return {"colour": str(options.get("colour", "blue"))}


class RegistryTests(SynchronousTestCase):
    """
    Backend kinds are registered, listed, looked up and asked to validate
    their options.
    """

    def register(self, kind: str = "test-colour") -> BackendRegistration:
        registration = registerBackend(kind, MemoryBackend.fromConfig, _validateColour)
        self.addCleanup(unregisterBackend, kind)
        return registration

    def test_memoryIsBuiltIn(self) -> None:
        """
        The C{memory} kind is registered when the package is imported.
        """
        self.assertIn("memory", backendKinds())
        registration = lookupBackend("memory")
        self.assertEqual(registration.kind, "memory")
        self.assertEqual(registration.factory, MemoryBackend.fromConfig)

    def test_localLoadedOnlyWhenUsed(self) -> None:
        """
        A server without a C{local} domain never loads its web stack and
        HTML sanitiser; validating C{local} options loads it then.
        """
        script = (
            "import sys, imxd.tap, imxd.federation\n"
            "heavy = ('imxd.backend.local', 'twisted.web', 'nh3')\n"
            "print(sorted({m for m in sys.modules if m.startswith(heavy)}))\n"
            "from imxd.backend import validateBackendOptions\n"
            "try:\n    validateBackendOptions('local', {})\nexcept ValueError:\n    pass\n"
            "print('imxd.backend.local.backend' in sys.modules)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.split("\n")[:2], ["[]", "True"])

    def test_register(self) -> None:
        """
        A registered kind is listed, can be looked up, and validates its
        options through its own validator.
        """
        registration = self.register()
        self.assertIn("test-colour", backendKinds())
        self.assertIs(lookupBackend("test-colour"), registration)
        self.assertEqual(
            validateBackendOptions("test-colour", {}), {"colour": "blue"}
        )
        self.assertEqual(
            validateBackendOptions("test-colour", {"colour": "red"}), {"colour": "red"}
        )
        error = self.assertRaises(
            ValueError, validateBackendOptions, "test-colour", {"size": 1}
        )
        self.assertEqual(str(error), "unknown option 'size'")

    def test_registerTwice(self) -> None:
        """
        A kind cannot be registered twice, and a kind must be a non-empty
        string.
        """
        self.register()
        self.assertRaises(
            ValueError, registerBackend, "test-colour", MemoryBackend, _validateColour
        )
        self.assertRaises(ValueError, registerBackend, "", MemoryBackend, _validateColour)

    def test_unregister(self) -> None:
        """
        An unregistered kind is no longer known.
        """
        registerBackend("test-gone", MemoryBackend.fromConfig, _validateColour)
        unregisterBackend("test-gone")
        self.assertNotIn("test-gone", backendKinds())

    def test_unknownKind(self) -> None:
        """
        Looking up or validating an unknown kind fails with a one-line
        message listing the known kinds.
        """
        error = self.assertRaises(KeyError, lookupBackend, "nosuch")
        self.assertIn("memory", error.args[0])
        error = self.assertRaises(ValueError, validateBackendOptions, "nosuch", {})
        self.assertIn("'nosuch'", str(error))
        self.assertIn("memory", str(error))
        self.assertNotIn("\n", str(error))


class MemoryBackendTests(SynchronousTestCase):
    """
    The C{memory} backend records what it is given and takes no options.
    """

    def test_noOptions(self) -> None:
        """
        An empty options table is accepted; any option is refused, named in
        one line.
        """
        self.assertEqual(validateBackendOptions("memory", {}), {})
        error = self.assertRaises(
            ValueError, validateBackendOptions, "memory", {"path": "/tmp", "a": 1}
        )
        self.assertIn("'a'", str(error))
        self.assertIn("no options", str(error))
        self.assertNotIn("\n", str(error))

    def test_interface(self) -> None:
        """
        L{MemoryBackend} provides L{IBackend}.
        """
        self.assertTrue(verifyObject(IBackend, MemoryBackend("alpha.test")))

    def test_fromConfig(self) -> None:
        """
        The factory builds an empty backend for the configured domain.
        """
        config = DomainConfig("alpha.test", "memory", {}, None, None, PolicyConfig())
        backend = lookupBackend("memory").factory(config)
        self.assertIsInstance(backend, MemoryBackend)
        self.assertEqual(backend.domain, "alpha.test")
        self.assertEqual((backend.messages, backend.notifications), ([], []))

    def test_deliver(self) -> None:
        """
        Delivered messages and notifications are recorded in order, and
        each delivery succeeds at once.
        """
        backend = MemoryBackend("alpha.test")
        self.assertIsNone(self.successResultOf(backend.deliverMessage("m1")))
        self.assertIsNone(self.successResultOf(backend.deliverMessage("m2")))
        self.assertIsNone(self.successResultOf(backend.deliverNotification("n1")))
        self.assertEqual(backend.messages, ["m1", "m2"])
        self.assertEqual(backend.notifications, ["n1"])
