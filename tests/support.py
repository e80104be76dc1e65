"""
Helpers for integration tests that run real C{twistd imxd} processes on
loopback.

Every process is started with a bounded wait and killed by its PID when the
test ends.  The command is C{python -c "...twistd run()"} with the
interpreter running the tests, so the processes see exactly the environment
that C{make test} built (the installed imxd and its twistd dropin), nothing
added to C{PYTHONPATH}.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
WAIT = 20.0

GOOD = """\
[server]
state_dir = "state"
listen = ["tcp:port={port}:interface=127.0.0.1"]

[[domain]]
name = "alpha.test"
backend = "memory"

[[domain]]
name = "beta.test"
backend = "memory"
"""


def freePort() -> int:
    """
    @return: a TCP port on 127.0.0.1 that was free a moment ago.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accepts(port: int) -> bool:
    """
    @return: whether 127.0.0.1:C{port} accepts a TCP connection.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


class LaunchTestsMixin:
    """
    Run twistd in a fresh directory.
    """

    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)

    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.base, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def twistd(self, *args: str) -> subprocess.CompletedProcess:
        """
        Run twistd to completion (killed after L{WAIT} seconds), with its
        standard error merged into its output.
        """
        return subprocess.run(
            [*TWISTD, *args],
            cwd=self.base,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=WAIT,
            text=True,
        )

    def spawn(self, *args: str) -> subprocess.Popen:
        """
        Start twistd in the background; it is killed by PID at cleanup.
        """
        process = subprocess.Popen(
            [*TWISTD, *args],
            cwd=self.base,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.addCleanup(self.reap, process)
        return process

    def reap(self, process: subprocess.Popen) -> None:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.communicate(timeout=WAIT)

    def startOnAnyPort(self, config: str) -> tuple:
        """
        Write C{config} (listening on port 0) and start C{twistd -n imxd}
        on it; read its log (bounded) until the listener names the port
        the kernel chose (so that no other process can take the port
        between choosing and binding it), then wait until the server
        greets a connection.

        @return: C{(process, port, log lines read so far)}.
        """
        path = self.write("imxd.toml", config)
        process = self.spawn("-n", "--pidfile=", "imxd", "--config", path)
        deadline = time.monotonic() + WAIT
        read = ""
        descriptor = process.stdout.fileno()
        while time.monotonic() < deadline:
            ready, _, _ = select.select([descriptor], [], [], 0.5)
            if not ready:
                continue
            # Read the descriptor itself, never through the file object's
            # buffer, so that communicate() later gets the rest intact.
            chunk = os.read(descriptor, 65536).decode("utf-8", "replace")
            if not chunk:
                raise AssertionError("twistd exited before listening:\n" + read)
            read += chunk
            found = re.search(r"imx-listener-0 listening on 127\.0\.0\.1:(\d+)", read)
            if found:
                port = int(found.group(1))
                # The listener is bound before the reactor runs; once the
                # server greets a connection, the reactor (and its signal
                # handlers) is running.
                with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as greeted:
                    if not greeted.recv(1):
                        raise AssertionError("twistd closed the connection unanswered")
                return process, port, [read]
        raise AssertionError("twistd never listened:\n" + read)

    def startServer(self, config: str, port: int) -> subprocess.Popen:
        """
        Write C{config} and start C{twistd -n imxd} on it; wait (bounded)
        until 127.0.0.1:C{port} accepts connections.
        """
        path = self.write("imxd.toml", config)
        process = self.spawn("-n", "--pidfile=", "imxd", "--config", path)
        deadline = time.monotonic() + WAIT
        while not accepts(port):
            if process.poll() is not None:
                raise AssertionError(
                    "twistd exited before listening:\n" + process.communicate()[0]
                )
            if time.monotonic() > deadline:
                raise AssertionError("twistd never listened")
            time.sleep(0.1)
        return process
