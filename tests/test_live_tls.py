"""
Integration tests: STARTTLS between real imxd processes on loopback
(issue 5, C{docs/protocol.md} section 11).

Every server is a real C{twistd -n imxd} with C{spool} backends
(L{tests.live.Server}), on an address from 127.0.0.51 to 127.0.0.58 that no
other test uses.  The servers find each other through static C{[[peer]]}
tables (C{host} and C{port}), not DNS, so nothing here listens outside that
range; the configured DNS server (127.0.0.59) answers nothing.  Certificates
come from one trustme CA per test, trusted through C{[server.tls] ca_file}.

Each test starts its own servers and stops them by PID at cleanup; every
wait is bounded (L{tests.live.waitFor}, socket timeouts).
"""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import ssl
import tempfile
import unittest

import trustme

from imxd.wire import (
    PREAMBLE,
    VERSION_MAX,
    VERSION_MIN,
    FrameDecoder,
    Hello,
    StartTLS,
    StartTLSProceed,
    decodeRecord,
    encodeRecord,
)
from tests.live import Server, freePort, waitFor

#: Where the servers' configuration points DNS: nothing listens there, so a
#: lookup that the static peers should have made unnecessary fails at once.
NO_DNS = "127.0.0.59"

#: Seconds a raw socket operation may take.
SOCKET_TIMEOUT = 5.0


class TLSServer(Server):
    """
    A L{Server} whose configuration also has a C{[server.tls]} table, a
    certificate and key per hosted domain that has one, and a static
    C{[[peer]]} (host and port) for every domain of the other servers.
    """

    def __init__(self, base, name, host, domains, tls, certificates=None):
        """
        @param tls: the C{[server.tls]} keys, C{{name: TOML value}}.
        @param certificates: C{{hosted domain: (certificate, key)}} paths.
        """
        options = {
            domain: [f"certificate = {_q(certificate)}", f"key = {_q(key)}"]
            for domain, (certificate, key) in (certificates or {}).items()
        }
        super().__init__(base, name, host, domains, domainOptions=options)
        self.tls = dict(tls)
        self.peers = []

    def peerWith(self, others) -> None:
        """
        Reach every domain of C{others} at its server's address.
        """
        self.peers = [
            (domain, other.host, other.port)
            for other in others
            if other is not self
            for domain in other.domains
        ]

    def config(self, dnsPort: int) -> str:
        """
        @return: L{Server}'s configuration with C{[server.tls]} added to
            C{[server]} (before the first C{[[domain]]}), DNS pointed at
            L{NO_DNS}, and the C{[[peer]]} tables appended.
        """
        head, marker, domains = super().config(dnsPort).partition("[[domain]]")
        dns = f"127.0.0.1:{dnsPort}"
        if not marker or dns not in head:
            raise AssertionError(f"unexpected configuration from Server:\n{head}")
        head = head.replace(dns, f"{NO_DNS}:{dnsPort}")
        tls = ["[server.tls]", *(f"{key} = {value}" for key, value in self.tls.items())]
        peers = []
        for domain, host, port in self.peers:
            peers += ["[[peer]]", f'domain = "{domain}"', f'host = "{host}"', f"port = {port}"]
        return head + "\n".join(tls) + "\n" + marker + domains + "\n".join(peers) + "\n"

    def logLines(self, *fragments: str) -> list:
        """
        @return: the lines of the log that contain every one of C{fragments}.
        """
        return [
            line for line in self.output().splitlines()
            if all(fragment in line for fragment in fragments)
        ]


def _q(text: str) -> str:
    """
    @return: C{text} as a TOML basic string.
    """
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class LiveTLS:
    """
    A CA, certificates it issues, and servers started and stopped by PID.
    """

    def setUp(self):
        self.base = tempfile.mkdtemp(prefix="imxd-live-tls-")
        self.servers = []
        self.addCleanup(self.stopAll)
        self.ca = trustme.CA()
        self.caFile = os.path.join(self.base, "ca.pem")
        self.ca.cert_pem.write_to_path(self.caFile)

    def certificate(self, name, domain, **validity):
        """
        @return: C{(certificate, key)} paths of a leaf whose only
            subjectAltName is C{domain}.
        """
        leaf = self.ca.issue_cert(domain, **validity)
        certificate = os.path.join(self.base, f"{name}.pem")
        key = os.path.join(self.base, f"{name}.key")
        leaf.cert_chain_pems[0].write_to_path(certificate)
        leaf.private_key_pem.write_to_path(key)
        return certificate, key

    def server(self, name, host, domains, policy, certificates=None, verify=True):
        """
        Make (not start) a server with C{[server.tls] policy} and the test CA.
        """
        server = TLSServer(
            self.base, name, host, domains,
            tls={"policy": _q(policy), "verify": str(verify).lower(), "ca_file": _q(self.caFile)},
            certificates=certificates,
        )
        self.servers.append(server)
        return server

    def startAll(self):
        """
        Give every server a static peer entry for the others' domains, start
        them all and wait (bounded) until each listens.
        """
        dnsPort = freePort(NO_DNS)
        for server in self.servers:
            server.peerWith(self.servers)
        for server in self.servers:
            server.start(dnsPort)
        for server in self.servers:
            server.waitListening()

    def stopAll(self):
        for server in self.servers:
            server.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def logs(self):
        """
        @return: every server's log, for failure messages.
        """
        return "\n".join(f"--- {s.name} ---\n{s.output()}" for s in self.servers)

    def delivered(self, server, domain, sender, body):
        """
        Wait (bounded) for the message from C{sender} with C{body} in
        C{domain}'s inbox on C{server}.
        """
        def arrived():
            return [
                m for m in server.inbox(domain) if m["from"] == sender and m["body"] == body
            ]

        try:
            return waitFor(arrived, f"{sender} -> {domain}: {body!r}")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.logs()}") from None

    def sendAndWait(self, server, sender, recipient, body):
        """
        Send through C{server}'s spool and wait until the receiving server
        accepted it.
        """
        name = server.send(sender, recipient, body)
        try:
            server.waitSent(sender.split("@")[1], name)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.logs()}") from None
        return name

    def waitLog(self, server, *fragments):
        """
        Wait (bounded) for a line of C{server}'s log that contains every one
        of C{fragments}.

        @return: the first such line.
        """
        try:
            return waitFor(lambda: server.logLines(*fragments),
                           f"{server.name} to log {fragments}")[0]
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.logs()}") from None

    def senderFailure(self, server, domain, name):
        """
        Wait (bounded) until the spool of C{domain} on C{server} reports the
        outbox file C{name} refused (moved to C{failed/} with its report),
        or the sending server's outbox logs that its destination failed and
        the message waits for another try.  Either way the message was not
        delivered.

        @return: the refusal as C{"<code> <token>: <text>"} for a report,
            or the log line.
        """
        def refused():
            outcome = server.outcome(domain, name)
            if outcome == "delivered":
                raise AssertionError(f"{name} was delivered\n{self.logs()}")
            if isinstance(outcome, dict):
                return f"{outcome['code']} {outcome['error']}: {outcome['text']}"
            lines = server.logLines("outbox: ", " failed (", "messages wait")
            return lines[0] if lines else None

        try:
            return waitFor(refused, f"{name} to be refused")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.logs()}") from None


class TLSPeeringTests(LiveTLS, unittest.TestCase):
    """
    STARTTLS, certificate choice and certificate checks between real
    processes.
    """

    def test_requiredBothWays(self):
        """
        Two servers that require TLS exchange messages in both directions:
        each message is delivered, both servers report their connections
        encrypted (C{connections-tls}, C{peer.<domain>.tls} on the sender,
        C{inbound.<id>.tls} on the receiver, all C{TLSv1.x}), and each
        receiver authenticated the sender's domain by its client
        certificate, without dial-back.
        """
        alpha = self.server("A", "127.0.0.51", ["alpha.test"], "required",
                            {"alpha.test": self.certificate("alpha", "alpha.test")})
        beta = self.server("B", "127.0.0.52", ["beta.test"], "required",
                           {"beta.test": self.certificate("beta", "beta.test")})
        self.startAll()

        self.sendAndWait(alpha, "ann@alpha.test", "bob@beta.test", "over TLS, A to B")
        self.delivered(beta, "beta.test", "ann@alpha.test", "over TLS, A to B")
        self.sendAndWait(beta, "bob@beta.test", "ann@alpha.test", "over TLS, B to A")
        self.delivered(alpha, "alpha.test", "bob@beta.test", "over TLS, B to A")

        for sender, receiver, remote in ((alpha, beta, "beta.test"), (beta, alpha, "alpha.test")):
            sent, received = sender.status(), receiver.status()
            self.assertGreaterEqual(int(sent["connections-tls"]), 1, sent)
            self.assertGreaterEqual(int(received["connections-tls"]), 1, received)
            self.assertTrue(sent.get(f"peer.{remote}.tls", "").startswith("TLSv1."), sent)
            inbound = [v for k, v in received.items()
                       if k.startswith("inbound.") and k.endswith(".tls")]
            self.assertTrue(inbound, received)
            self.assertTrue(all(v.startswith("TLSv1.") for v in inbound), received)
            self.assertGreaterEqual(int(received.get("count.pairs-certified", 0)), 1, received)
            self.assertGreaterEqual(int(received.get("count.tls-upgrades", 0)), 1, received)
            self.assertEqual(int(received.get("count.dialbacks-started", 0)), 0, received)
        self.assertTrue(alpha.logLines("TLS with peer 127.0.0.52:", "(TLSv1."), alpha.output())
        self.assertTrue(beta.logLines("TLS with peer 127.0.0.51:", "(TLSv1."), beta.output())
        self.assertEqual(len(alpha.inbox("alpha.test")), 1)
        self.assertEqual(len(beta.inbox("beta.test")), 1)

    def test_plaintextPeerRefused(self):
        """
        A server that requires TLS refuses a peer with TLS off: the
        message is not delivered, the sender's spool reports it refused
        with C{530 tls-required}, and the strict server logs the
        C{530 tls-required} refusal of the peer's address.
        """
        plain = self.server("P", "127.0.0.53", ["plain.test"], "off")
        strict = self.server("R", "127.0.0.54", ["strict.test"], "required",
                             {"strict.test": self.certificate("strict", "strict.test")})
        self.startAll()

        name = plain.send("pat@plain.test", "sam@strict.test", "in the clear")
        self.assertIn("530 tls-required", self.senderFailure(plain, "plain.test", name))
        self.waitLog(strict, "refusing peer ", ": 530 tls-required: this server requires TLS")
        self.assertEqual(strict.inbox("strict.test"), [])
        self.assertEqual(int(strict.status()["connections-tls"]), 0)
        self.assertNotIn("count.pairs-authenticated", strict.status())

    def test_aggregatorCertificatePerDomain(self):
        """
        An aggregator hosting three domains, each with its own certificate,
        presents the right one for each: a client that requires TLS and
        checks certificates against the dialled domain delivers a message
        to each domain over its own TLS connection; and a raw client (plain
        C{socket}, C{imxd.wire} records, Python C{ssl} with SNI and host
        name checking) that asks for STARTTLS with TO_DOMAIN and SNI set to
        each domain gets a certificate whose subjectAltName is exactly that
        domain, then the aggregator's HELLO inside TLS.
        """
        domains = ["one.test", "two.test", "three.test"]
        client = self.server("C", "127.0.0.55", ["client.test"], "required",
                             {"client.test": self.certificate("client", "client.test")})
        aggregator = self.server(
            "G", "127.0.0.56", domains, "required",
            {d: self.certificate(d.split(".")[0], d) for d in domains},
        )
        self.startAll()

        names = [client.send("cy@client.test", f"user@{d}", f"to {d}") for d in domains]
        for name in names:
            try:
                client.waitSent("client.test", name)
            except AssertionError as e:
                raise AssertionError(f"{e}\n{self.logs()}") from None
        for domain in domains:
            self.delivered(aggregator, domain, "cy@client.test", f"to {domain}")
            self.assertEqual(len(aggregator.inbox(domain)), 1)
        status = client.status()
        for domain in domains:
            self.assertTrue(status.get(f"peer.{domain}.tls", "").startswith("TLSv1."), status)
        self.assertGreaterEqual(int(aggregator.status()["count.pairs-certified"]), 3)

        for domain in domains:
            with self.subTest(domain=domain):
                certificate, hello = self.rawStartTLS(aggregator, domain)
                self.assertEqual(certificate["subjectAltName"], (("DNS", domain),))
                self.assertIn("tls-cert-auth", hello.capabilities)
                self.assertNotIn("starttls", hello.capabilities)

    def rawStartTLS(self, server, domain):
        """
        Connect to C{server} without imxd's client: HELLO (TO_DOMAIN
        C{domain}, capability C{starttls}), STARTTLS, STARTTLS_PROCEED,
        then a TLS handshake with SNI C{domain} checked against the test CA
        and C{domain}; read the server's preamble and HELLO inside TLS.

        @return: the server's certificate (C{ssl} dict form) and its HELLO
            inside TLS.
        """
        connection = socket.create_connection((server.host, server.port), timeout=SOCKET_TIMEOUT)
        try:
            decoder = FrameDecoder(1 << 20, expectPreamble=True)
            connection.sendall(PREAMBLE + encodeRecord(Hello(
                versionMin=VERSION_MIN, versionMax=VERSION_MAX,
                capabilities=("starttls",), maxRecord=65536,
                software="test-live-tls", toDomain=domain,
            )))
            hello = self.nextRecord(connection, decoder)
            self.assertIsInstance(hello, Hello)
            self.assertIn("starttls", hello.capabilities)
            connection.sendall(encodeRecord(StartTLS(tag=7)))
            proceed = self.nextRecord(connection, decoder)
            self.assertIsInstance(proceed, StartTLSProceed)
            self.assertEqual(proceed.tag, 7)
            self.assertEqual(decoder.buffered(), 0)
            context = ssl.create_default_context(cafile=self.caFile)
            self.assertTrue(context.check_hostname)
            protected = context.wrap_socket(connection, server_hostname=domain)
            connection = protected
            self.assertTrue(protected.version().startswith("TLSv1."))
            certificate = protected.getpeercert()
            inside = self.nextRecord(protected, FrameDecoder(1 << 20, expectPreamble=True))
            self.assertIsInstance(inside, Hello)
            return certificate, inside
        finally:
            connection.close()

    def nextRecord(self, connection, decoder):
        """
        @return: the next record read from C{connection} (bounded by its
            timeout and by a count of reads).
        """
        frames = []
        for _ in range(100):
            data = connection.recv(65536)
            if not data:
                self.fail("the server closed the connection")
            frames = decoder.feed(data)
            if frames:
                break
        self.assertEqual(len(frames), 1, frames)
        return decodeRecord(frames[0])

    def test_expiredCertificateRefused(self):
        """
        A peer whose certificate has expired is refused by a server that
        checks certificates: the message is not delivered, the sender's
        spool reports it refused with C{531 tls-failed}, and the sender's
        log names the reason, C{certificate has expired}, for the dialled
        domain.
        """
        alpha = self.server("A", "127.0.0.57", ["alpha.test"], "required",
                            {"alpha.test": self.certificate("alpha", "alpha.test")})
        yesterday = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)
        stale = self.server("S", "127.0.0.58", ["stale.test"], "required",
                            {"stale.test": self.certificate("stale", "stale.test",
                                                            not_after=yesterday)})
        self.startAll()

        name = alpha.send("ann@alpha.test", "sid@stale.test", "never to arrive")
        refusal = self.senderFailure(alpha, "alpha.test", name)
        self.assertIn("531 tls-failed", refusal)
        self.assertIn("certificate of stale.test: certificate has expired", refusal)
        self.assertTrue(
            alpha.logLines("refusing peer 127.0.0.58:",
                           "531 tls-failed: certificate of stale.test: certificate has expired"),
            alpha.output(),
        )
        self.assertNotEqual(alpha.outcome("alpha.test", name), "delivered")
        self.assertEqual(stale.inbox("stale.test"), [])
        self.assertEqual(int(alpha.status().get("count.tls-upgrades", 0)), 0)
        self.assertGreaterEqual(int(alpha.status().get("count.tls-failures", 0)), 1)
