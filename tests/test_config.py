"""
Tests for L{imxd.config}.
"""

from __future__ import annotations

import copy
import os

from twisted.trial.unittest import SynchronousTestCase

from imxd.config import (
    Config,
    ConfigError,
    DomainConfig,
    LimitsConfig,
    PeerConfig,
    TLSConfig,
    PolicyConfig,
    ServerConfig,
    TimeoutsConfig,
    loadConfig,
    parseConfig,
)

FULL = """\
[server]
state_dir = "state"
dialback_secret_file = "secret/dialback.key"
listen = ["tcp:port=5275:interface=127.0.0.1", "tcp:port=0:interface=127.0.0.2"]
dns_servers = ["127.0.0.53", "127.0.0.1:5353", "::1", "[::1]:5300"]
software = "imxd/0.1"

[server.timeouts]
handshake = 5
dialback = 7.5
idle = 300.0
keepalive = 30

[server.limits]
max_record_size = 16384
max_connections_total = 10
max_connections_per_address = 3
max_connections_per_domain = 2
max_pending_dialbacks_per_address = 1
max_outbound_per_peer = 1

[[peer]]
domain = "Partner.Example"
host = "127.0.0.5"

[[peer]]
domain = "other.example"
host = "imx.other.example"
port = 5300

[[domain]]
name = "Alpha.TEST"
backend = "memory"
certificate = "alpha.pem"
key = "alpha.key"

[domain.policy]
blocked_domains = ["Spam.Example", "spam.example", "junk.example"]
tls = "required"

[[domain]]
name = "beta.test"
backend = "memory"
"""


def minimal(**server) -> dict:
    """
    @return: the smallest valid document, with C{server} as its server
        table when given.
    """
    data = {"domain": [{"name": "alpha.test", "backend": "memory"}]}
    if server:
        data["server"] = server
    return data


class ConfigTestsMixin:
    """
    Helpers for configuration tests.
    """

    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.path = os.path.join(self.base, "imxd.toml")

    def write(self, text: str, name: str = "imxd.toml") -> str:
        path = os.path.join(self.base, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def parse(self, data: dict) -> Config:
        return parseConfig(data, self.path, self.base)

    def assertConfigError(self, data: dict, key: str, *problemParts: str) -> ConfigError:
        """
        Assert that C{data} is refused with a L{ConfigError} at C{key} whose
        problem contains every one of C{problemParts}, and whose one-line
        message names the file, the key and the problem.
        """
        error = self.assertRaises(ConfigError, self.parse, data)
        self.assertEqual(error.path, self.path)
        self.assertEqual(error.key, key)
        for part in problemParts:
            self.assertIn(part, error.problem)
        self.assertEqual(str(error), f"{self.path}: {key}: {error.problem}")
        self.assertNotIn("\n", str(error))
        return error


class ValidConfigTests(ConfigTestsMixin, SynchronousTestCase):
    """
    Valid configurations become the expected immutable objects.
    """

    def test_minimal(self) -> None:
        """
        A document with only one domain gets every documented default, with
        paths relative to the base directory.
        """
        config = self.parse(minimal())
        state = os.path.join(self.base, "state")
        self.assertEqual(
            config,
            Config(
                path=self.path,
                server=ServerConfig(
                    stateDirectory=state,
                    dialbackSecretFile=os.path.join(state, "dialback.secret"),
                    adminSocket=os.path.join(state, "admin.sock"),
                    listen=("tcp:port=5275:interface=127.0.0.1",),
                    dnsServers=(),
                    software="imxd",
                    timeouts=TimeoutsConfig(10.0, 15.0, 600.0, 60.0, 10.0),
                    limits=LimitsConfig(65536, 1000, 16, 4, 8, 2),
                ),
                domains=(
                    DomainConfig(
                        name="alpha.test",
                        backend="memory",
                        backendOptions={},
                        certificate=None,
                        key=None,
                        policy=PolicyConfig((), "offered"),
                    ),
                ),
                peers=(),
            ),
        )

    def test_full(self) -> None:
        """
        Every key of a full file is read, converted and normalised.
        """
        self.write("", "alpha.pem")
        self.write("", "alpha.key")
        os.mkdir(os.path.join(self.base, "secret"))
        config = loadConfig(self.write(FULL))
        server = config.server
        self.assertEqual(config.path, self.path)
        self.assertEqual(server.stateDirectory, os.path.join(self.base, "state"))
        self.assertEqual(
            server.dialbackSecretFile, os.path.join(self.base, "secret", "dialback.key")
        )
        self.assertEqual(
            server.listen,
            ("tcp:port=5275:interface=127.0.0.1", "tcp:port=0:interface=127.0.0.2"),
        )
        self.assertEqual(
            server.dnsServers,
            (("127.0.0.53", 53), ("127.0.0.1", 5353), ("::1", 53), ("::1", 5300)),
        )
        self.assertEqual(server.software, "imxd/0.1")
        self.assertEqual(server.timeouts, TimeoutsConfig(5.0, 7.5, 300.0, 30.0))
        self.assertIsInstance(server.timeouts.handshake, float)
        self.assertEqual(server.limits, LimitsConfig(16384, 10, 3, 2, 1, 1))
        self.assertEqual(
            config.peers,
            (
                PeerConfig("partner.example", "127.0.0.5", 5275),
                PeerConfig("other.example", "imx.other.example", 5300),
            ),
        )
        alpha, beta = config.domains
        self.assertEqual(alpha.name, "alpha.test")
        self.assertEqual(alpha.certificate, os.path.join(self.base, "alpha.pem"))
        self.assertEqual(alpha.key, os.path.join(self.base, "alpha.key"))
        self.assertEqual(
            alpha.policy, PolicyConfig(("spam.example", "junk.example"), "required")
        )
        self.assertEqual(beta.name, "beta.test")
        self.assertIs(config.domain("beta.test"), beta)
        self.assertIsNone(config.domain("gamma.test"))

    def test_immutable(self) -> None:
        """
        The configuration objects and their collections cannot be changed.
        """
        config = self.parse(minimal())
        domain = config.domains[0]
        self.assertRaises(AttributeError, setattr, config, "path", "x")
        self.assertRaises(AttributeError, setattr, config.server.limits, "maxRecordSize", 1)


        def mutate() -> None:
            domain.backendOptions["x"] = 1  # type: ignore[index]

        self.assertRaises(TypeError, mutate)
        self.assertIsInstance(config.server.listen, tuple)
        self.assertIsInstance(config.domains, tuple)

    def test_independentOfInput(self) -> None:
        """
        Changing the parsed document afterwards does not change the
        configuration.
        """
        data = minimal(listen=["tcp:port=1"])
        config = self.parse(data)
        before = copy.deepcopy(config.server.listen)
        data["server"]["listen"].append("tcp:port=2")
        self.assertEqual(config.server.listen, before)

    def test_exampleConfig(self) -> None:
        """
        The example C{etc/imxd.toml} is valid and hosts C{alpha.test} and
        C{beta.test} on the C{local} backend (one database and one client
        API on loopback) and C{gamma.test} on a spool under C{state/}.
        """
        here = os.path.dirname(os.path.abspath(__file__))
        path = os.path.join(os.path.dirname(here), "etc", "imxd.toml")
        config = loadConfig(path)
        self.assertEqual(
            [(d.name, d.backend) for d in config.domains],
            [("alpha.test", "local"), ("beta.test", "local"), ("gamma.test", "spool")],
        )
        state = os.path.join(os.path.dirname(here), "state")
        for domain in config.domains[:2]:
            self.assertEqual(
                domain.backendOptions["database"], os.path.join(state, "local.sqlite")
            )
            self.assertEqual(domain.backendOptions["listen"], "tcp:8280:interface=127.0.0.1")
        self.assertEqual(
            config.domains[2].backendOptions["directory"],
            os.path.join(state, "spool-gamma.test"),
        )
        self.assertEqual(config.server.listen, ("tcp:port=5275:interface=127.0.0.1",))
        self.assertEqual(
            config.server.stateDirectory, os.path.join(os.path.dirname(here), "state")
        )


class TLSConfigTests(ConfigTestsMixin, SynchronousTestCase):
    """
    C{[server.tls]}, the domains' C{policy.tls} and the peers' overrides.
    """

    def test_defaults(self) -> None:
        """
        Without TLS settings, TLS is offered, certificates are verified
        against the system's CAs, and domains and peers follow the server.
        """
        data = minimal()
        data["peer"] = [{"domain": "p.test", "host": "127.0.0.5"}]
        config = self.parse(data)
        self.assertEqual(config.server.tls, TLSConfig("offered", True, None))
        self.assertEqual(config.domains[0].policy.tls, "offered")
        self.assertEqual((config.peers[0].tls, config.peers[0].tlsVerify), (None, None))

    def test_serverPolicyIsTheDomainsDefault(self) -> None:
        """
        A domain that leaves C{policy.tls} out takes C{server.tls.policy};
        one that sets it keeps its own.
        """
        self.write("", "ca.pem")
        data = minimal(tls={"policy": "off", "verify": False, "ca_file": "ca.pem"})
        data["domain"].append({"name": "beta.test", "backend": "memory", "policy": {"tls": "offered"}})
        config = self.parse(data)
        self.assertEqual(config.server.tls, TLSConfig("off", False, os.path.join(self.base, "ca.pem")))
        self.assertEqual([d.policy.tls for d in config.domains], ["off", "offered"])

    def test_peerOverridesWithoutAddress(self) -> None:
        """
        A C{[[peer]]} may set only TLS overrides and leave the address to
        discovery.
        """
        data = minimal()
        data["peer"] = [{"domain": "P.test", "tls": "off", "tls_verify": False}]
        self.assertEqual(
            self.parse(data).peers, (PeerConfig("p.test", None, 5275, "off", False),)
        )


class InvalidConfigTests(ConfigTestsMixin, SynchronousTestCase):
    """
    Every class of mistake gives a L{ConfigError} naming the file, the
    dotted key and the problem.
    """

    def test_unknownTopLevelKey(self) -> None:
        """
        An unknown key at the top level is named.
        """
        data = minimal()
        data["domains"] = []
        self.assertConfigError(data, "domains", "unknown key", "domain")

    def test_unknownNestedKey(self) -> None:
        """
        An unknown key in a nested table is named with its full dotted key,
        and the known keys are listed.
        """
        self.assertConfigError(
            minimal(timeouts={"idel": 5}), "server.timeouts.idel", "unknown key", "idle"
        )

    def test_unknownKeyInArrayOfTables(self) -> None:
        """
        An unknown key in the second C{[[domain]]} is named with its index.
        """
        data = minimal()
        data["domain"].append({"name": "b.test", "backend": "memory", "colour": 1})
        data["domain"].append({"name": "c.test", "backend": "memory", "policy": {"x": 1}})
        self.assertConfigError(data, "domain[1].colour", "unknown key")
        del data["domain"][1]
        self.assertConfigError(data, "domain[1].policy.x", "unknown key")

    def test_wrongType(self) -> None:
        """
        A value of the wrong type is refused, naming the expected and the
        given type.
        """
        self.assertConfigError(
            minimal(software=5), "server.software", "expected a string", "integer"
        )
        self.assertConfigError(
            minimal(listen="tcp:port=1"), "server.listen", "expected an array"
        )
        self.assertConfigError(
            minimal(timeouts={"idle": "600"}), "server.timeouts.idle", "expected a number"
        )
        self.assertConfigError(minimal(timeouts=5), "server.timeouts", "expected a table")
        self.assertConfigError(
            {"domain": {"name": "alpha.test", "backend": "memory"}},
            "domain",
            "array of tables",
        )

    def test_boolIsNotInt(self) -> None:
        """
        A boolean is not accepted where an integer or a number is expected.
        """
        self.assertConfigError(
            minimal(limits={"max_outbound_per_peer": True}),
            "server.limits.max_outbound_per_peer",
            "expected an integer",
            "boolean",
        )
        self.assertConfigError(
            minimal(timeouts={"handshake": True}), "server.timeouts.handshake", "boolean"
        )

    def test_floatIsNotInt(self) -> None:
        """
        A float is not accepted where an integer is expected.
        """
        self.assertConfigError(
            minimal(limits={"max_connections_total": 10.0}),
            "server.limits.max_connections_total",
            "expected an integer",
        )

    def test_outOfRange(self) -> None:
        """
        Values outside their documented range are refused with the range.
        """
        self.assertConfigError(
            minimal(limits={"max_record_size": 1024}),
            "server.limits.max_record_size",
            "16384",
            "16777216",
        )
        self.assertConfigError(
            minimal(limits={"max_record_size": 16777217}), "server.limits.max_record_size"
        )
        self.assertConfigError(
            minimal(limits={"max_connections_per_domain": 0}),
            "server.limits.max_connections_per_domain",
            "at least 1",
        )
        self.assertConfigError(
            minimal(timeouts={"idle": 0}), "server.timeouts.idle", "greater than 0"
        )
        self.assertConfigError(
            minimal(timeouts={"idle": -1.5}), "server.timeouts.idle", "greater than 0"
        )
        self.assertConfigError(
            minimal(timeouts={"idle": float("inf")}), "server.timeouts.idle", "finite"
        )
        data = minimal()
        data["peer"] = [{"domain": "p.test", "host": "127.0.0.5", "port": 70000}]
        self.assertConfigError(data, "peer[0].port", "65535")

    def test_writeBehind(self) -> None:
        """
        C{server.queue.write_behind} is 50 ms unless set, may be 0, and is
        refused outside 0 to 1 second or when not a number.
        """
        self.assertEqual(self.parse(minimal()).server.queue.writeBehind, 0.05)
        self.assertEqual(self.parse(minimal(queue={"write_behind": 0})).server.queue.writeBehind, 0.0)
        for bad in (-0.001, 1.5, float("nan")):
            self.assertConfigError(
                minimal(queue={"write_behind": bad}), "server.queue.write_behind", "0 to 1"
            )
        self.assertConfigError(
            minimal(queue={"write_behind": True}), "server.queue.write_behind", "number of seconds"
        )

    def test_badOneOf(self) -> None:
        """
        C{tls} must be one of its three values.
        """
        data = minimal()
        data["domain"][0]["policy"] = {"tls": "maybe"}
        self.assertConfigError(data, "domain[0].policy.tls", "'off'", "'maybe'")

    def test_badDomainName(self) -> None:
        """
        Bad domain names are refused wherever they appear, with the reason
        given by L{imxd.address.normaliseDomain}.
        """
        data = minimal()
        data["domain"][0]["name"] = "bad..test"
        self.assertConfigError(data, "domain[0].name", "bad..test", "empty label")
        data = minimal()
        data["domain"][0]["policy"] = {"blocked_domains": ["ok.test", "not a domain"]}
        self.assertConfigError(data, "domain[0].policy.blocked_domains[1]", "whitespace")
        data = minimal()
        data["peer"] = [{"domain": "127.0.0.1", "host": "127.0.0.5"}]
        self.assertConfigError(data, "peer[0].domain", "IP address")

    def test_badPeerHost(self) -> None:
        """
        A peer's host must be an IP address or a host name.
        """
        data = minimal()
        data["peer"] = [{"domain": "p.test", "host": "no such host"}]
        self.assertConfigError(data, "peer[0].host", "not an IP address")

    def test_missingRequired(self) -> None:
        """
        Required keys are named when missing, and at least one domain is
        required.
        """
        self.assertConfigError({}, "domain", "at least 1")
        self.assertConfigError({"domain": []}, "domain", "at least 1")
        self.assertConfigError({"domain": [{"name": "a.test"}]}, "domain[0].backend", "missing")
        data = minimal()
        data["peer"] = [{"domain": "p.test"}]
        self.assertConfigError(data, "peer[0]", "give host, tls or tls_verify")

    def test_duplicateDomain(self) -> None:
        """
        Two hosted domains that are equal once normalised are refused.
        """
        data = minimal()
        data["domain"].append({"name": "Alpha.test", "backend": "memory"})
        self.assertConfigError(data, "domain[1].name", "duplicate of domain[0].name")

    def test_duplicatePeer(self) -> None:
        """
        Two peers for the same domain are refused.
        """
        data = minimal()
        data["peer"] = [
            {"domain": "p.test", "host": "127.0.0.5"},
            {"domain": "P.TEST.", "host": "127.0.0.6"},
        ]
        self.assertConfigError(data, "peer[1].domain", "duplicate of peer[0].domain")

    def test_peerIsHosted(self) -> None:
        """
        A hosted domain cannot also be a static peer.
        """
        data = minimal()
        data["peer"] = [{"domain": "ALPHA.test", "host": "127.0.0.5"}]
        self.assertConfigError(data, "peer[0].domain", "hosted here")

    def test_missingCertificate(self) -> None:
        """
        A certificate or key file that does not exist is refused, and each
        needs the other.
        """
        self.write("", "key.pem")
        data = minimal()
        data["domain"][0].update(certificate="nope.pem", key="key.pem")
        error = self.assertConfigError(data, "domain[0].certificate", "file not found")
        self.assertIn(os.path.join(self.base, "nope.pem"), error.problem)
        data["domain"][0].update(certificate="key.pem", key="")
        self.assertConfigError(data, "domain[0].key", "required")
        data["domain"][0].update(certificate="", key="key.pem")
        self.assertConfigError(data, "domain[0].certificate", "required")

    def test_tlsRequiredNeedsCertificate(self) -> None:
        """
        C{tls = "required"} is refused for a domain without a certificate.
        """
        data = minimal()
        data["domain"][0]["policy"] = {"tls": "required"}
        self.assertConfigError(data, "domain[0].policy.tls", "certificate")

    def test_serverTLSRequiredNeedsCertificates(self) -> None:
        """
        C{server.tls.policy = "required"} holds for every domain that does
        not say otherwise, so each of those needs a certificate; the error
        names the server key and the domain.
        """
        self.assertConfigError(
            minimal(tls={"policy": "required"}), "server.tls.policy", "alpha.test"
        )
        data = minimal(tls={"policy": "required"})
        data["domain"][0]["policy"] = {"tls": "offered"}
        self.assertEqual(self.parse(data).domains[0].policy.tls, "offered")

    def test_peerTLSRequiredNeedsACertificate(self) -> None:
        """
        A peer with C{tls = "required"} on a server with no certificate at
        all could never connect to it over TLS: refused at its key.
        """
        data = minimal()
        data["peer"] = [{"domain": "p.test", "tls": "required"}]
        self.assertConfigError(data, "peer[0].tls", "certificate")

    def test_badTLSSettings(self) -> None:
        """
        TLS settings of the wrong kind are refused at their key.
        """
        self.assertConfigError(minimal(tls={"policy": "always"}), "server.tls.policy", "'always'")
        self.assertConfigError(minimal(tls={"verify": "yes"}), "server.tls.verify", "true or false")
        self.assertConfigError(minimal(tls={"ca_file": "none.pem"}), "server.tls.ca_file", "not found")
        self.assertConfigError(minimal(tls={"colour": 1}), "server.tls.colour", "unknown key")
        data = minimal()
        data["peer"] = [{"domain": "p.test", "tls": "sometimes"}]
        self.assertConfigError(data, "peer[0].tls", "'sometimes'")
        data["peer"] = [{"domain": "p.test", "tls_verify": 0}]
        self.assertConfigError(data, "peer[0].tls_verify", "true or false")

    def test_badEndpoint(self) -> None:
        """
        A listen endpoint that Twisted cannot parse is refused, naming its
        index.
        """
        self.assertConfigError(
            minimal(listen=["tcp:port=1", "bogus:port=5"]),
            "server.listen[1]",
            "bogus:port=5",
        )
        self.assertConfigError(minimal(listen=["tcp:port=abc"]), "server.listen[0]")
        self.assertConfigError(minimal(listen=["tcp:port=99999"]), "server.listen[0]", "65535")
        self.assertConfigError(minimal(listen=[]), "server.listen", "at least 1")

    def test_badDnsServer(self) -> None:
        """
        DNS servers must be IP literals with an optional port from 1 to
        65535.
        """
        for bad in ["dns.example", "127.0.0.1:0", "127.0.0.1:99999", "127.0.0.1:x",
                    "[::1", "[::1]x", "::1:53:", ""]:
            self.assertConfigError(minimal(dns_servers=[bad]), "server.dns_servers[0]")

    def test_badSoftware(self) -> None:
        """
        The product token must be non-empty printable ASCII without spaces.
        """
        for bad in ["", "imxd 1.0", "imxd\n", "x" * 65]:
            self.assertConfigError(minimal(software=bad), "server.software")

    def test_badBackend(self) -> None:
        """
        An unknown backend kind is refused at C{backend}, listing the known
        kinds; options the kind refuses are refused at C{backend_options}.
        """
        data = minimal()
        data["domain"][0]["backend"] = "nosuch"
        self.assertConfigError(data, "domain[0].backend", "nosuch", "memory")
        data = minimal()
        data["domain"][0]["backend_options"] = {"path": "x"}
        self.assertConfigError(data, "domain[0].backend_options", "'path'")
        data["domain"][0]["backend_options"] = []
        self.assertConfigError(data, "domain[0].backend_options", "expected a table")

    def test_stateDirectory(self) -> None:
        """
        The state directory's parent must exist, and an existing state
        directory must be a directory; a dial-back secret file needs an
        existing directory.
        """
        self.assertConfigError(
            minimal(state_dir="no/such"), "server.state_dir", "parent directory"
        )
        self.write("", "afile")
        self.assertConfigError(minimal(state_dir="afile"), "server.state_dir", "not a directory")
        self.assertConfigError(
            minimal(dialback_secret_file="nodir/secret"),
            "server.dialback_secret_file",
            "does not exist",
        )
        config = self.parse(minimal(state_dir="new", dialback_secret_file="new/s"))
        self.assertEqual(config.server.dialbackSecretFile, os.path.join(self.base, "new", "s"))

    def test_adminSocket(self) -> None:
        """
        The admin socket defaults to C{<state_dir>/admin.sock}; a path given
        is relative to the configuration file and needs an existing
        directory (or the state directory, created at start).
        """
        config = self.parse(minimal(state_dir="new"))
        self.assertEqual(
            config.server.adminSocket, os.path.join(self.base, "new", "admin.sock")
        )
        config = self.parse(minimal(state_dir="new", admin_socket="new/ctl"))
        self.assertEqual(config.server.adminSocket, os.path.join(self.base, "new", "ctl"))
        config = self.parse(minimal(admin_socket="imxd.sock"))
        self.assertEqual(config.server.adminSocket, os.path.join(self.base, "imxd.sock"))
        self.assertConfigError(
            minimal(admin_socket="nodir/ctl"), "server.admin_socket", "does not exist"
        )
        self.assertConfigError(minimal(admin_socket=5), "server.admin_socket", "string")

    def test_connectTimeout(self) -> None:
        """
        C{server.timeouts.connect} is a positive number of seconds,
        10 by default.
        """
        self.assertEqual(self.parse(minimal()).server.timeouts.connect, 10.0)
        config = self.parse({**minimal(), "server": {"timeouts": {"connect": 2}}})
        self.assertEqual(config.server.timeouts.connect, 2.0)
        self.assertConfigError(
            {**minimal(), "server": {"timeouts": {"connect": 0}}},
            "server.timeouts.connect",
        )

    def test_tomlSyntaxError(self) -> None:
        """
        A TOML syntax error names the file, line and column, on one line.
        """
        path = self.write('[server]\nsoftware = "imxd"\nlisten = [tcp]\n')
        error = self.assertRaises(ConfigError, loadConfig, path)
        self.assertIsNone(error.key)
        self.assertIn("TOML syntax error", error.problem)
        self.assertIn("line 3", error.problem)
        self.assertIn("column", error.problem)
        self.assertTrue(str(error).startswith(f"{path}: TOML syntax error"))
        self.assertNotIn("\n", str(error))

    def test_missingFile(self) -> None:
        """
        A missing file is named.
        """
        path = os.path.join(self.base, "absent.toml")
        error = self.assertRaises(ConfigError, loadConfig, path)
        self.assertEqual(str(error), f"{path}: file not found")

    def test_directoryIsNotAFile(self) -> None:
        """
        A directory given as the configuration file is refused.
        """
        error = self.assertRaises(ConfigError, loadConfig, self.base)
        self.assertIn("directory", error.problem)

    def test_notUtf8(self) -> None:
        """
        A file that is not UTF-8 is refused.
        """
        path = os.path.join(self.base, "latin1.toml")
        with open(path, "wb") as f:
            f.write(b'software = "caf\xe9"\n')
        error = self.assertRaises(ConfigError, loadConfig, path)
        self.assertIn("UTF-8", error.problem)

    def test_unreadableFile(self) -> None:
        """
        A file that cannot be read is refused with the reason.  (A path
        through a regular file fails for root too, unlike a mode-0 file.)
        """
        path = os.path.join(self.write(""), "imxd.toml")
        error = self.assertRaises(ConfigError, loadConfig, path)
        self.assertIn("cannot read", error.problem)
        self.assertIn("Not a directory", error.problem)

    def test_loadRelativeToFile(self) -> None:
        """
        Relative paths in a loaded file are relative to the file's
        directory, not the current directory.
        """
        sub = os.path.join(self.base, "etc")
        os.mkdir(sub)
        path = os.path.join(sub, "imxd.toml")
        with open(path, "w") as f:
            f.write('[server]\nstate_dir = "../var"\n[[domain]]\nname = "a.test"\nbackend = "memory"\n')
        config = loadConfig(path)
        self.assertEqual(config.server.stateDirectory, os.path.join(self.base, "var"))
