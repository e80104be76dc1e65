"""
Integration tests: real C{twistd imxd} processes on loopback, launched and
stopped as an operator would.
"""

from __future__ import annotations

import os
import signal
import socket

from twisted.trial.unittest import SynchronousTestCase

from tests.support import GOOD, WAIT, LaunchTestsMixin, accepts, freePort

class HelpTests(LaunchTestsMixin, SynchronousTestCase):
    """
    twistd finds the imxd plugin and documents its options.
    """

    def test_twistdListsImxd(self) -> None:
        """
        C{twistd --help} lists the C{imxd} command.
        """
        result = self.twistd("--help")
        self.assertEqual(result.returncode, 0, result.stdout)
        self.assertIn("imxd", result.stdout.split("Commands:")[-1])
        self.assertIn("IMX federation server", result.stdout)

    def test_imxdHelp(self) -> None:
        """
        C{twistd imxd --help} documents C{--config} and does not need a
        configuration file.
        """
        result = self.twistd("imxd", "--help")
        self.assertEqual(result.returncode, 0, result.stdout)
        self.assertIn("--config", result.stdout)
        self.assertIn("etc/imxd.toml", result.stdout)


class BadConfigTests(LaunchTestsMixin, SynchronousTestCase):
    """
    A bad configuration stops twistd at once with one line, no traceback.
    """

    def assertOneLineFailure(self, text: str, key: str, problem: str) -> None:
        path = self.write("bad.toml", text)
        result = self.twistd("-n", "--pidfile=", "imxd", "--config", path)
        self.assertNotEqual(result.returncode, 0, result.stdout)
        lines = [line for line in result.stdout.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, result.stdout)
        self.assertNotIn("Traceback", result.stdout)
        self.assertTrue(lines[0].startswith(f"imxd: {path}: {key}: "), lines[0])
        self.assertIn(problem, lines[0])
        self.assertFalse(os.path.exists(os.path.join(self.base, "state")))

    def test_unknownKey(self) -> None:
        """
        An unknown key is reported with its dotted name.
        """
        self.assertOneLineFailure(
            GOOD.format(port=5275).replace("[server]\n", "[server]\nlistne = []\n"),
            "server.listne",
            "unknown key",
        )

    def test_badDomain(self) -> None:
        """
        A bad hosted domain name is reported with its index.
        """
        self.assertOneLineFailure(
            GOOD.format(port=5275).replace("beta.test", "beta..test"),
            "domain[1].name",
            "empty label",
        )

    def test_missingCertificate(self) -> None:
        """
        A certificate file that does not exist is reported.
        """
        self.assertOneLineFailure(
            GOOD.format(port=5275)
            + 'certificate = "beta.pem"\nkey = "beta.key"\n',
            "domain[1].certificate",
            "file not found",
        )

    def test_exposedDialbackSecret(self) -> None:
        """
        A dial-back secret file that others can read stops start-up.
        """
        os.makedirs(os.path.join(self.base, "state"))
        secretFile = os.path.join(self.base, "state", "dialback.secret")
        with open(secretFile, "w") as f:
            f.write("00" * 32)
        os.chmod(secretFile, 0o644)
        path = self.write("good.toml", GOOD.format(port=5275))
        result = self.twistd("-n", "--pidfile=", "imxd", "--config", path)
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(
            result.stdout.strip(),
            f"imxd: {path}: server.dialback_secret_file: {secretFile}: readable by"
            " group or others (mode 0644); run chmod 600",
        )

    def test_missingFile(self) -> None:
        """
        A configuration file that does not exist is reported in one line.
        """
        path = os.path.join(self.base, "absent.toml")
        result = self.twistd("-n", "--pidfile=", "imxd", "--config", path)
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(result.stdout.strip(), f"imxd: {path}: file not found")


class RunTests(LaunchTestsMixin, SynchronousTestCase):
    """
    A good configuration starts a server that listens and stops on SIGTERM.
    """

    def test_listenAndStop(self) -> None:
        """
        twistd listens on the configured port, logs the hosted domains, and
        shuts down cleanly when sent SIGTERM.
        """
        process, port, lines = self.startOnAnyPort(GOOD.format(port=0))
        self.assertTrue(accepts(port))
        self.assertTrue(os.path.isdir(os.path.join(self.base, "state")))
        secretFile = os.path.join(self.base, "state", "dialback.secret")
        self.assertEqual(os.stat(secretFile).st_mode & 0o777, 0o600)
        database = os.path.join(self.base, "state", "imxd.sqlite3")
        self.assertEqual(os.stat(database).st_mode & 0o777, 0o600)
        os.kill(process.pid, signal.SIGTERM)
        rest, _ = process.communicate(timeout=WAIT)
        output = "".join(lines) + rest
        # twistd ends by re-raising the signal it was stopped with.
        self.assertIn(process.returncode, (0, -signal.SIGTERM), output)
        self.assertIn("Server Shut Down.", output)
        self.assertIn("Hosting alpha.test", output)
        self.assertIn("Hosting beta.test", output)
        self.assertIn(f"imx-listener-0 listening on 127.0.0.1:{port}", output)
        self.assertNotIn("Traceback", output)

    def test_portInUse(self) -> None:
        """
        A listen endpoint whose port is taken stops start-up with one line
        naming the listener and a non-zero exit.
        """
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen(1)
            port = busy.getsockname()[1]
            path = self.write("good.toml", GOOD.format(port=port))
            result = self.twistd("-n", "--pidfile=", "imxd", "--config", path)
        self.assertNotEqual(result.returncode, 0, result.stdout)
        self.assertNotIn("Traceback", result.stdout)
        self.assertIn(
            f"imxd: imx-listener-0 cannot listen on tcp:port={port}:interface=127.0.0.1",
            result.stdout,
        )
