"""
Tests for L{imxd.tap}, L{imxd.aggregator} and the twistd dropin.
"""

from __future__ import annotations

import gc
import os
import stat

import attrs
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from imxd.aggregator import Aggregator, VirtualDomain
from imxd.backend.memory import MemoryBackend
from imxd.peer import PeerFactory, PeerSettings
from imxd.admin import AdminFactory
from imxd.federation import Federation
from imxd.tap import GC_THRESHOLDS, Options, makeService, settleGarbageCollector, socketPath

CONFIG = """\
[server]
state_dir = "state"
listen = ["tcp:port=0:interface=127.0.0.1", "tcp:port=0:interface=127.0.0.2"]
software = "imxd-test"

[server.timeouts]
handshake = 3
keepalive = 20
idle = 90

[server.limits]
max_record_size = 32768

[[domain]]
name = "Alpha.test"
backend = "memory"

[[domain]]
name = "beta.test"
backend = "memory"
"""


class TapTestsMixin:
    """
    Write a configuration file in a fresh directory.
    """

    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.path = os.path.join(self.base, "imxd.toml")
        with open(self.path, "w") as f:
            f.write(CONFIG)

    def options(self, *extra: str) -> Options:
        options = Options()
        options.parseOptions(["--config", self.path, *extra])
        return options

    def makeService(self, options: Options, reactor: object) -> object:
        """
        L{makeService}, closing its database (and so its writer thread)
        when the test ends.
        """
        service = makeService(options, reactor)
        self.addCleanup(service.database.close)
        return service


class OptionsTests(TapTestsMixin, SynchronousTestCase):
    """
    L{Options} reads C{--config} and validates the file it names.
    """

    def test_config(self) -> None:
        """
        C{--config} names the file, which is loaded into C{config}.
        """
        options = self.options()
        self.assertEqual(options["config"], self.path)
        self.assertEqual(options.config.path, self.path)
        self.assertEqual(
            [d.name for d in options.config.domains], ["alpha.test", "beta.test"]
        )

    def test_shortOption(self) -> None:
        """
        C{-c} is the short form of C{--config}.
        """
        options = Options()
        options.parseOptions(["-c", self.path])
        self.assertEqual(options["config"], self.path)

    def test_default(self) -> None:
        """
        The default configuration file is C{etc/imxd.toml}.
        """
        self.assertEqual(Options()["config"], "etc/imxd.toml")

    def test_help(self) -> None:
        """
        The help text documents C{--config}.
        """
        self.assertIn("--config", str(Options()))

    def test_badConfig(self) -> None:
        """
        A bad configuration ends the program with one line naming the
        file, the key and the problem.
        """
        with open(self.path, "a") as f:
            f.write("colour = 'blue'\n")
        error = self.assertRaises(SystemExit, self.options)
        message = error.args[0]
        self.assertEqual(
            message.split(": ", 3)[:3], ["imxd", self.path, "domain[1].colour"]
        )
        self.assertNotIn("\n", message)

    def test_missingConfig(self) -> None:
        """
        A missing configuration file ends the program with one line.
        """
        options = Options()
        error = self.assertRaises(
            SystemExit, options.parseOptions, ["--config", self.path + ".nope"]
        )
        self.assertEqual(error.args[0], f"imxd: {self.path}.nope: file not found")

    def test_unknownOption(self) -> None:
        """
        An unknown option is a usage error.
        """
        self.assertRaises(usage.UsageError, Options().parseOptions, ["--colour"])


class MakeServiceTests(TapTestsMixin, SynchronousTestCase):
    """
    L{makeService} builds the Aggregator with its domains and listeners.
    """

    def setUp(self) -> None:
        super().setUp()
        self.reactor = MemoryReactorClock()
        self.service = self.makeService(self.options(), self.reactor)

    def test_garbageCollectorSettledOnceRunning(self) -> None:
        """
        Once the reactor runs, the objects made at start are frozen out of
        the garbage collector's scans and its young generation is
        collected less often.
        """
        self.assertIn(
            (settleGarbageCollector, (), {}), self.reactor.whenRunningHooks
        )
        before = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *before)
        self.addCleanup(gc.unfreeze)
        settleGarbageCollector()
        self.assertEqual(gc.get_threshold(), GC_THRESHOLDS)
        self.assertGreater(gc.get_freeze_count(), 0)

    def test_databaseThreaded(self) -> None:
        """
        The server's database commits on a thread of its own, so that the
        reactor is not held while SQLite writes and waits for the disk.
        """
        self.assertTrue(self.service.database.threaded)

    def test_aggregator(self) -> None:
        """
        The service is an L{Aggregator} holding the configuration, with one
        L{VirtualDomain} child, named after it, per hosted domain.
        """
        self.assertIsInstance(self.service, Aggregator)
        self.assertEqual(self.service.config.path, self.path)
        self.assertEqual(
            self.service.hostedDomains(), frozenset({"alpha.test", "beta.test"})
        )
        for name in ["alpha.test", "beta.test"]:
            domain = self.service.getServiceNamed(name)
            self.assertIsInstance(domain, VirtualDomain)
            self.assertIs(self.service.domain(name), domain)
            self.assertEqual(domain.config.name, name)
            self.assertIsInstance(domain.backend, MemoryBackend)
            self.assertEqual(domain.backend.domain, name)
        self.assertIsNone(self.service.domain("gamma.test"))
        self.assertIsNone(self.service.domain("Alpha.test"))

    def test_listeners(self) -> None:
        """
        Each listen endpoint gets a named L{StreamServerEndpointService}
        child serving one shared L{Federation} whose settings come from
        the configuration; the admin endpoint is one more child.
        """
        listeners = [self.service.getServiceNamed(f"imx-listener-{i}") for i in (0, 1)]
        for listener in listeners:
            self.assertIsInstance(listener, StreamServerEndpointService)
        self.assertIs(listeners[0].factory, listeners[1].factory)
        factory = listeners[0].factory
        self.assertIsInstance(factory, PeerFactory)
        self.assertIs(factory.clock, self.reactor)
        self.assertEqual(
            factory.settings,
            PeerSettings(
                hostedDomains=frozenset({"alpha.test", "beta.test"}),
                handshakeTimeout=3.0,
                keepaliveInterval=20.0,
                idleTimeout=90.0,
                maxRecordSize=32768,
                software="imxd-test",
            ),
        )
        self.assertIsInstance(factory, Federation)
        admin = self.service.getServiceNamed("admin")
        self.assertIsInstance(admin.factory, AdminFactory)
        self.assertEqual(len(list(self.service)), 5)

    def test_stateDirectory(self) -> None:
        """
        The state directory is created with mode 0700.
        """
        state = os.path.join(self.base, "state")
        self.assertTrue(os.path.isdir(state))
        self.assertEqual(stat.S_IMODE(os.stat(state).st_mode), 0o700)

    def test_existingStateDirectory(self) -> None:
        """
        An existing state directory is kept.
        """
        state = os.path.join(self.base, "state")
        marker = os.path.join(state, "marker")
        open(marker, "w").close()
        self.makeService(self.options(), self.reactor)
        self.assertTrue(os.path.exists(marker))

    def test_start(self) -> None:
        """
        Starting the service listens on every endpoint and logs one line
        per hosted domain and per listener; stopping it stops listening.
        """
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.service.privilegedStartService()
        self.service.startService()
        self.assertEqual(
            [(port[0], port[3]) for port in self.reactor.tcpServers],
            [(0, "127.0.0.1"), (0, "127.0.0.2")],
        )
        texts = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.info]
        self.assertEqual(len([t for t in texts if t.startswith("Hosting ")]), 2)
        self.assertEqual(
            len([t for t in texts if t.startswith("imx-listener-")]), 2, texts
        )
        self.successResultOf(self.service.stopService())
        self.assertFalse(self.service.running)


class AdminSocketTests(TapTestsMixin, SynchronousTestCase):
    """
    The admin endpoint listens on a UNIX socket whose path fits.
    """

    def test_adminListens(self) -> None:
        """
        Starting the service listens on the admin socket, mode 0600 (by a
        relative path when the test directory's absolute one is too long).
        """
        reactor = MemoryReactorClock()
        service = self.makeService(self.options(), reactor)
        service.privilegedStartService()
        [(path, factory, backlog, mode, wantPID)] = reactor.unixServers
        self.assertEqual(
            os.path.abspath(path), os.path.join(self.base, "state", "admin.sock")
        )
        self.assertIsInstance(factory, AdminFactory)
        self.assertEqual((mode, wantPID), (0o600, True))

    def test_longPath(self) -> None:
        """
        A path longer than a UNIX socket address holds is bound relative to
        the current directory; one too long either way stops start-up with
        one line.
        """
        config = self.options().config
        deep = os.path.join(self.base, *["d" * 50] * 3)
        os.makedirs(deep)
        long = attrs.evolve(
            config, server=attrs.evolve(config.server, adminSocket=os.path.join(deep, "s"))
        )
        here = os.getcwd()
        self.addCleanup(os.chdir, here)
        os.chdir(deep)
        self.assertEqual(socketPath(long), "s")
        os.chdir("/")
        error = self.assertRaises(SystemExit, socketPath, long)
        self.assertIn("server.admin_socket: path longer", error.args[0])


class BackendErrorTests(TapTestsMixin, SynchronousTestCase):
    """
    A backend that cannot be built stops start-up with one line.
    """

    def test_spoolNotCreatable(self) -> None:
        """
        A spool directory that cannot be created (a file is in the way)
        stops start-up with one line naming the domain and the path.
        """
        open(os.path.join(self.base, "blocker"), "w").close()
        with open(self.path, "a") as f:
            f.write(
                '[[domain]]\nname = "gamma.test"\nbackend = "spool"\n'
                'backend_options = { directory = "blocker/spool" }\n'
            )
        error = self.assertRaises(SystemExit, makeService, self.options(), MemoryReactorClock())
        self.assertIn("gamma.test: spool directory", error.args[0])
        self.assertTrue(error.args[0].startswith(f"imxd: {self.path}: "))
        self.assertNotIn("\n", error.args[0])


class LocalBackendServiceTests(TapTestsMixin, SynchronousTestCase):
    """
    Local domains share one client API listener per distinct address.
    """

    def addLocal(self, name, database, listen):
        with open(self.path, "a") as f:
            f.write(
                f'[[domain]]\nname = "{name}"\nbackend = "local"\n'
                f'backend_options = {{ database = "{database}", listen = "{listen}" }}\n'
            )

    def test_sharedListeners(self) -> None:
        """
        Two domains naming one address share a listener serving both;
        a third address gets its own.
        """
        self.addLocal("gamma.test", "accounts.sqlite", "tcp:8280:interface=127.0.0.1")
        self.addLocal("delta.test", "accounts.sqlite", "tcp:8280:interface=127.0.0.1")
        self.addLocal("eps.test", "other.sqlite", "tcp:8281:interface=127.0.0.1")
        service = self.makeService(self.options(), MemoryReactorClock())
        first = service.getServiceNamed("client-api-0")
        second = service.getServiceNamed("client-api-1")
        self.assertEqual(sorted(first.api.backends), ["delta.test", "gamma.test"])
        self.assertEqual(sorted(second.api.backends), ["eps.test"])
        [listener] = list(first)
        self.assertEqual(listener.description, "tcp:8280:interface=127.0.0.1")
        self.assertTrue(os.path.exists(os.path.join(self.base, "accounts.sqlite")))

    def test_databaseNotOpenable(self) -> None:
        """
        A database that cannot be opened stops start-up with one line
        naming the domain and the path.
        """
        os.mkdir(os.path.join(self.base, "adirectory"))
        self.addLocal("gamma.test", "adirectory", "tcp:8280")
        error = self.assertRaises(SystemExit, makeService, self.options(), MemoryReactorClock())
        self.assertIn("gamma.test: local database", error.args[0])
        self.assertNotIn("\n", error.args[0])


class TLSStartTests(TapTestsMixin, SynchronousTestCase):
    """
    Certificates are loaded at start-up: a domain that requires TLS starts
    with a usable certificate, and an unusable one stops start-up with one
    line naming the file.
    """

    def addTLSDomain(self, certificate, key):
        with open(self.path, "a") as f:
            f.write(
                '[[domain]]\nname = "gamma.test"\nbackend = "memory"\n'
                f'certificate = "{certificate}"\nkey = "{key}"\n'
                '[domain.policy]\ntls = "required"\n'
            )

    def test_required(self) -> None:
        """
        C{tls = "required"} with a certificate and key starts, and the
        federation offers TLS for it.
        """
        import trustme

        leaf = trustme.CA().issue_cert("gamma.test")
        leaf.cert_chain_pems[0].write_to_path(os.path.join(self.base, "cert.pem"))
        leaf.private_key_pem.write_to_path(os.path.join(self.base, "key.pem"))
        self.addTLSDomain("cert.pem", "key.pem")
        service = self.makeService(self.options(), MemoryReactorClock())
        tls = service.federation.tls
        self.assertEqual(tls.pairMode("gamma.test", "peer.test"), "required")
        self.assertEqual(tls.store.domains, {"gamma.test"})
        self.assertTrue(tls.offers())

    def test_unusableCertificate(self) -> None:
        """
        A certificate file that is not PEM stops start-up with one line
        naming the file.
        """
        for name in ("cert.pem", "key.pem"):
            with open(os.path.join(self.base, name), "w") as f:
                f.write("not PEM\n")
        self.addTLSDomain("cert.pem", "key.pem")
        error = self.assertRaises(SystemExit, makeService, self.options(), MemoryReactorClock())
        self.assertEqual(
            error.args[0].split(": ", 3)[:3],
            ["imxd", self.path, os.path.join(self.base, "cert.pem")],
        )
        self.assertNotIn("\n", error.args[0])


class PluginTests(SynchronousTestCase):
    """
    The twistd dropin names the tap module.
    """

    def test_serviceMaker(self) -> None:
        """
        C{twisted.plugins.imxd_plugin} has a service maker called C{imxd}
        that uses L{imxd.tap}.
        """
        from twisted.plugins import imxd_plugin

        maker = imxd_plugin.imxd
        self.assertTrue(IServiceMaker.providedBy(maker))
        self.assertEqual(maker.tapname, "imxd")
        self.assertIs(maker.options, Options)
        self.assertIs(maker.makeService, makeService)

    def test_discovered(self) -> None:
        """
        The plugin system finds the C{imxd} service maker.
        """
        from twisted import plugin

        names = [maker.tapname for maker in plugin.getPlugins(IServiceMaker)]
        self.assertIn("imxd", names)
