"""
`make demo` keeps working: the script runs two imxd processes on loopback
(127.0.0.41 and .42) and the `imx` tool, and exits 0 only if every step
did what it should.
"""

from __future__ import annotations

import os
import subprocess
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO = os.path.join(os.path.dirname(HERE), "demo", "demo.py")


class DemoTests(unittest.TestCase):
    def test_demoPasses(self):
        """
        The demo prints each step and exits 0.
        """
        result = subprocess.run(
            [sys.executable, DEMO], capture_output=True, text=True, timeout=180
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        for words in (
            "alice asks to see bob's presence",
            "bob got subscription-request",
            "alice got presence",
            '"state": "online"',
            "bob got message",
            "<p>Hi <b>Alice</b>!</p>",
            "Done:",
        ):
            self.assertIn(words, result.stdout)
