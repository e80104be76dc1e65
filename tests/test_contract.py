"""
The backend contract (L{imxd.testing.BackendContractMixin}) run against
every adapter imxd ships.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from imxd.backend.memory import MemoryBackend
from imxd.backend.spool import SpoolBackend
from imxd.testing import BackendContractMixin


class MemoryBackendContractTests(BackendContractMixin, SynchronousTestCase):
    """
    The C{memory} adapter keeps the contract.
    """

    def makeBackend(self):
        return MemoryBackend(self.domainName)


class SpoolBackendContractTests(BackendContractMixin, SynchronousTestCase):
    """
    The C{spool} adapter keeps the contract.
    """

    def makeBackend(self):
        return SpoolBackend(self.domainName, os.path.abspath(self.mktemp()), 1.0)
