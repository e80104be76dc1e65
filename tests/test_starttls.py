"""
Tests for STARTTLS on peer connections (C{docs/protocol.md} section 11):
the upgrade and the second HELLO, the refusal of plaintext after STARTTLS,
certificates chosen by SNI, the peer's certificate judged against its
domain, client certificates in place of dial-back, and the TLS policy.

The servers are in memory (L{tests.network}) and the TLS is real: pyOpenSSL
over memory BIOs, with certificates made by trustme.
"""

from __future__ import annotations

import datetime
import os

import trustme
from cryptography import x509
from twisted.trial.unittest import SynchronousTestCase

from imxd.peer import PeerFactory, PeerSettings, PeerState, Refused, RemoteError
from imxd.tls import CertificateStore, TLSPolicy
from imxd.wire import ErrorCode, Ping, StartTLS, encodeRecord

from tests.certificates import CertificatesMixin
from tests.network import Network, Stranger, message


class TLSNetworkMixin(CertificatesMixin):
    """
    A network, a CA and a way to give servers certificates.
    """

    def setUp(self):
        super().setUp()
        self.network = Network()

    def serving(self, host, domain, mode="offered", certificate=None):
        """
        Start a server hosting C{domain} with a certificate (by default a
        valid one for C{domain}) and TLS policy C{mode}.
        """
        certificate = certificate or self.certificate(domain, domain)
        return self.network.server(
            host, [domain], tls=self.policy({domain: certificate}, {domain: mode})
        )

    def stranger(self, server, capabilities=()):
        """
        Connect a raw IMX peer announcing C{capabilities} to C{server} from
        10.6.6.6 and finish HELLO.
        """
        protocol = Stranger(
            PeerFactory(self.network.clock, PeerSettings(), capabilities=capabilities)
        )
        self.network.connect(server, protocol, "10.6.6.6", server.host, 5275)
        self.network.flush()
        return protocol

    def fakeBeta(self, protocolClass):
        """
        Publish beta.test at 10.0.0.2, served by raw C{protocolClass}
        peers that announce C{starttls}.
        """
        factory = PeerFactory(self.network.clock, PeerSettings(), capabilities=("starttls",))
        factory.buildProtocol = lambda addr: protocolClass(factory)
        self.network.servers[("10.0.0.2", 5275)] = factory
        self.network.publish("beta.test", (0, 0, 5275, "imx.10.0.0.2"))

    def policy(self, certificates, modes, peers=None, verify=True):
        """
        @param certificates: C{{domain: (certificate, key)}}.
        @param modes: C{{hosted domain: mode}}.
        """
        return TLSPolicy(CertificateStore(certificates, self.caFile), modes, peers, verify)

    def send(self, federation, record, pair):
        """
        Send C{record} for C{pair} through C{federation}'s pool.

        @return: the answer, or the failure's exception.
        """
        results = []
        federation.pool.send(pair, record).addBoth(results.append)
        self.network.flush()
        self.assertEqual(len(results), 1, "no answer")
        result = results[0]
        return result.value if hasattr(result, "value") else result

    def only(self, connections):
        self.assertEqual(len(connections), 1)
        return next(iter(connections))


class UpgradeTests(TLSNetworkMixin, SynchronousTestCase):
    """
    Two servers that offer TLS upgrade, HELLO again, and exchange Data
    inside TLS.
    """

    def test_upgradeAndHelloAgain(self):
        """
        The connection is upgraded before any pair is authenticated; both
        sides send HELLO again inside TLS, announcing C{tls-cert-auth}; the
        message is delivered.
        """
        alpha = self.serving("10.0.0.1", "alpha.test")
        beta = self.serving("10.0.0.2", "beta.test")
        answer = self.send(
            alpha, message("ann@alpha.test", "bob@beta.test"), ("alpha.test", "beta.test")
        )
        self.assertNotIsInstance(answer, Exception)
        self.assertEqual(len(beta.aggregator.domain("beta.test").backend.messages), 1)
        outbound = self.only(alpha.pool.connections("beta.test"))
        inbound = self.only(beta._inbound())
        for connection in (outbound, inbound):
            self.assertTrue(connection.tlsActive)
            self.assertTrue(connection.tlsDescription.startswith("TLSv1."))
            self.assertIn("tls-cert-auth", connection.peerHello.capabilities)
            self.assertNotIn("starttls", connection.peerHello.capabilities)
        self.assertEqual(alpha.counters["handshakes"], 2)
        self.assertEqual(beta.counters["handshakes"], 2)
        # Alpha's certificate is valid for alpha.test: no dial-back.
        self.assertEqual(beta.counters["pairs-certified"], 1)
        self.assertEqual(beta.counters["dialbacks-started"], 0)

    def test_dialbackInsideTLSWithoutClientCertificate(self):
        """
        An originator with no certificate of its own still upgrades (it only
        checks the receiver's certificate); its pair is then authenticated
        by dial-back, inside TLS.
        """
        alpha = self.network.server(
            "10.0.0.1", ["alpha.test"], tls=self.policy({}, {"alpha.test": "offered"})
        )
        beta = self.serving("10.0.0.2", "beta.test")
        answer = self.send(
            alpha, message("ann@alpha.test", "bob@beta.test"), ("alpha.test", "beta.test")
        )
        self.assertNotIsInstance(answer, Exception)
        inbound = [c for c in beta._inbound() if c.receivablePairs]
        self.assertEqual(len(inbound), 1)
        self.assertTrue(inbound[0].tlsActive)
        self.assertEqual(beta.counters["pairs-certified"], 0)
        self.assertEqual(beta.counters["dialbacks-started"], 1)
        self.assertEqual(beta.counters["pairs-authenticated"], 1)

    def test_clientCertificateForAnotherDomain(self):
        """
        A client certificate authenticates only the domains it is valid
        for: on a connection opened for alpha.test, a pair from omega.test
        (another hosted domain with a certificate of its own) is
        authenticated by dial-back.
        """
        alpha = self.network.server(
            "10.0.0.1",
            ["alpha.test", "omega.test"],
            tls=self.policy(
                {
                    "alpha.test": self.certificate("a", "alpha.test"),
                    "omega.test": self.certificate("o", "omega.test"),
                },
                {"alpha.test": "offered", "omega.test": "offered"},
            ),
        )
        beta = self.serving("10.0.0.2", "beta.test")
        for sender in ("ann@alpha.test", "oz@omega.test"):
            answer = self.send(
                alpha,
                message(sender, "bob@beta.test", messageId=sender),
                (sender.split("@")[1], "beta.test"),
            )
            self.assertNotIsInstance(answer, Exception)
        self.only(alpha.pool.connections("beta.test"))
        self.assertEqual(beta.counters["pairs-certified"], 1)
        self.assertEqual(beta.counters["dialbacks-started"], 1)
        self.assertEqual(beta.counters["pairs-authenticated"], 1)

    def test_sniSelectsEachDomainsCertificate(self):
        """
        A server hosting three domains, each with its own certificate,
        presents the one of the domain dialled: the originator's check
        against that domain passes for each, and the certificate it saw
        names exactly that domain.
        """
        domains = ["beta.test", "gamma.test", "delta.test"]
        certificates = {d: self.certificate(d, d) for d in domains}
        alpha = self.serving("10.0.0.1", "alpha.test", "required")
        self.network.server(
            "10.0.0.2",
            domains,
            tls=self.policy(certificates, {d: "required" for d in domains}),
        )
        for domain in domains:
            answer = self.send(
                alpha, message("ann@alpha.test", f"bob@{domain}"), ("alpha.test", domain)
            )
            self.assertNotIsInstance(answer, Exception)
            connection = self.only(alpha.pool.connections(domain))
            self.assertTrue(connection.tlsActive)
            seen = connection.transport.getHandle().get_peer_certificate().to_cryptography()
            names = seen.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value.get_values_for_type(x509.DNSName)
            self.assertEqual(names, [domain])

    def test_oneCertificateForSeveralDomains(self):
        """
        One certificate whose SAN names two hosted domains serves both.
        """
        shared = self.certificate("shared", "beta.test", "gamma.test")
        alpha = self.serving("10.0.0.1", "alpha.test", "required")
        self.network.server(
            "10.0.0.2",
            ["beta.test", "gamma.test"],
            tls=self.policy(
                {"beta.test": shared, "gamma.test": shared},
                {"beta.test": "required", "gamma.test": "required"},
            ),
        )
        for domain in ("beta.test", "gamma.test"):
            answer = self.send(
                alpha, message("ann@alpha.test", f"bob@{domain}"), ("alpha.test", domain)
            )
            self.assertNotIsInstance(answer, Exception)


class VerificationTests(TLSNetworkMixin, SynchronousTestCase):
    """
    The originator judges the receiver's certificate against the domain it
    dialled; each failure is refused with ERROR tls-failed naming why, and
    the send fails with that reason.
    """

    def refusal(self, betaCertificate, peers=None, verify=True):
        """
        Send from alpha to beta, whose certificate is C{betaCertificate}.

        @return: the send's failure, or its answer.
        """
        self.alpha = self.network.server(
            "10.0.0.1",
            ["alpha.test"],
            tls=self.policy({}, {"alpha.test": "offered"}, peers, verify),
        )
        self.beta = self.serving("10.0.0.2", "beta.test", certificate=betaCertificate)
        return self.send(
            self.alpha, message("ann@alpha.test", "bob@beta.test"), ("alpha.test", "beta.test")
        )

    def assertRefusedFor(self, failure, reason):
        self.assertIsInstance(failure, Refused)
        self.assertIn(f"531 tls-failed: certificate of beta.test: {reason}", failure.text)
        self.assertEqual(self.beta.aggregator.domain("beta.test").backend.messages, [])
        self.assertGreaterEqual(self.alpha.counters["tls-failures"], 1)
        # Beta heard why, in an ERROR inside TLS.
        self.assertGreaterEqual(self.beta.counters["errors-received"], 1)

    def test_wrongDomain(self):
        self.assertRefusedFor(
            self.refusal(self.certificate("b", "other.test")),
            "certificate is not valid for beta.test",
        )

    def test_expired(self):
        past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)
        self.assertRefusedFor(
            self.refusal(self.certificate("b", "beta.test", not_after=past)),
            "certificate has expired",
        )

    def test_unknownIssuer(self):
        self.assertRefusedFor(
            self.refusal(self.certificate("b", "beta.test", ca=trustme.CA())),
            "certificate issuer is unknown",
        )

    def test_selfSigned(self):
        pair = self.selfSigned("self")
        self.assertRefusedFor(self.refusal(pair), "certificate is self-signed")

    def test_verificationOffForOnePeer(self):
        """
        With C{tls_verify = false} for beta, its bad certificate is
        accepted: the connection is encrypted and the pair is
        authenticated by dial-back.
        """
        answer = self.refusal(
            self.certificate("b", "other.test"), peers={"beta.test": (None, False)}
        )
        self.assertNotIsInstance(answer, Exception)
        self.assertTrue(self.only(self.alpha.pool.connections("beta.test")).tlsActive)
        self.assertEqual(self.beta.counters["pairs-authenticated"], 1)

    def test_verificationOffServerWide(self):
        """
        With verification off for the server, a self-signed certificate is
        accepted.
        """
        pair = self.selfSigned("self")
        self.assertNotIsInstance(self.refusal(pair, verify=False), Exception)


class Injector(Stranger):
    """
    A receiving peer that answers STARTTLS with PROCEED followed at once by
    a plaintext PING: what an attacker on the path would inject.
    """

    def _handleStartTLS(self, record):
        from imxd.wire import StartTLSProceed

        self.transport.write(
            encodeRecord(StartTLSProceed(tag=record.tag)) + encodeRecord(Ping(tag=77))
        )


Injector.stateTables = {
    state: dict(table) for state, table in Stranger.stateTables.items()
}
Injector.stateTables[PeerState.OPEN][StartTLS] = Injector._handleStartTLS


class InjectionTests(TLSNetworkMixin, SynchronousTestCase):
    """
    Octets that follow STARTTLS (or STARTTLS_PROCEED) in plaintext are never
    taken as records: the connection is refused.
    """

    def test_plaintextAfterStartTLS(self):
        """
        A peer that writes STARTTLS and a PING in one go gets ERROR
        bad-sequence and the connection is closed; the PING is not
        answered and TLS never starts.
        """
        beta = self.serving("10.0.0.2", "beta.test")
        stranger = self.stranger(beta, capabilities=("starttls",))
        self.assertIn("starttls", stranger.peerHello.capabilities)
        stranger.transport.write(encodeRecord(StartTLS(tag=1)) + encodeRecord(Ping(tag=2)))
        self.network.flush()
        self.assertIs(stranger.state, PeerState.CLOSED)
        codes = [(r.tag, getattr(r, "code", None), type(r).__name__) for r in stranger.received[1:]]
        self.assertEqual(codes, [(0, ErrorCode.BAD_SEQUENCE, "Error")])
        self.assertIn("plaintext after STARTTLS", stranger.received[-1].text)
        self.assertEqual(beta.counters["tls-injections-refused"], 1)
        self.assertEqual(beta.counters["tls-upgrades"], 0)

    def test_plaintextAfterProceed(self):
        """
        An originator that finds a record after STARTTLS_PROCEED in the
        same read refuses the connection rather than take it.
        """
        alpha = self.network.server(
            "10.0.0.1", ["alpha.test"], tls=self.policy({}, {"alpha.test": "offered"})
        )
        self.fakeBeta(Injector)
        failure = self.send(
            alpha, message("ann@alpha.test", "bob@beta.test"), ("alpha.test", "beta.test")
        )
        self.assertIsInstance(failure, Refused)
        self.assertIn("plaintext after STARTTLS_PROCEED", failure.text)
        self.assertEqual(alpha.counters["tls-injections-refused"], 1)
        self.assertEqual(alpha.counters["tls-upgrades"], 0)


class PolicyTests(TLSNetworkMixin, SynchronousTestCase):
    """
    TLS off, offered and required, server-wide, per hosted domain and per
    peer.
    """

    def servers(self, alphaTLS, betaTLS):
        self.alpha = self.network.server("10.0.0.1", ["alpha.test"], tls=alphaTLS)
        self.beta = self.network.server("10.0.0.2", ["beta.test"], tls=betaTLS)

    def betaOffering(self, mode="offered"):
        return self.policy({"beta.test": self.certificate("b", "beta.test")}, {"beta.test": mode})

    def sendAlphaToBeta(self):
        return self.send(
            self.alpha, message("ann@alpha.test", "bob@beta.test"), ("alpha.test", "beta.test")
        )

    def test_offeredFallsBackToPlaintext(self):
        """
        An originator that offers TLS talks plaintext to a peer without it.
        """
        self.servers(self.policy({}, {"alpha.test": "offered"}), None)
        self.assertNotIsInstance(self.sendAlphaToBeta(), Exception)
        self.assertFalse(self.only(self.alpha.pool.connections("beta.test")).tlsActive)

    def test_offTalksPlaintext(self):
        """
        With TLS off the originator does not ask for STARTTLS even when the
        peer offers it.
        """
        self.servers(self.policy({}, {"alpha.test": "off"}), self.betaOffering())
        self.assertNotIsInstance(self.sendAlphaToBeta(), Exception)
        self.assertFalse(self.only(self.alpha.pool.connections("beta.test")).tlsActive)
        self.assertEqual(self.beta.counters["tls-upgrades"], 0)

    def test_originatorRequiresPeerWithout(self):
        """
        An originator that requires TLS refuses a peer that does not offer
        STARTTLS with ERROR tls-required, and the send fails saying so.
        """
        self.servers(self.policy({}, {"alpha.test": "required"}), None)
        failure = self.sendAlphaToBeta()
        self.assertIsInstance(failure, Refused)
        self.assertIn("530 tls-required", failure.text)
        self.assertIn("does not offer STARTTLS", failure.text)
        self.assertEqual(self.beta.aggregator.domain("beta.test").backend.messages, [])
        self.assertEqual(self.beta.counters["errors-received"], 1)

    def test_receiverRequiresPeerWithout(self):
        """
        A receiver whose every domain requires TLS refuses, after HELLO, a
        peer that does not offer STARTTLS.
        """
        self.servers(None, self.betaOffering("required"))
        failure = self.sendAlphaToBeta()
        # Temporary (the peer may enable TLS), quoting the refusal.
        self.assertIsInstance(failure, Refused)
        self.assertTrue(failure.temporary)
        self.assertIn("530 tls-required", failure.text)
        self.assertIn("does not offer STARTTLS", failure.text)
        self.assertEqual(self.beta.counters["connections-refused"], 1)

    def test_peerOverrideRequires(self):
        """
        A C{[[peer]]} override to C{required} holds even when the hosted
        domain only offers TLS.
        """
        self.servers(
            self.policy({}, {"alpha.test": "offered"}, peers={"beta.test": ("required", None)}),
            None,
        )
        failure = self.sendAlphaToBeta()
        self.assertIsInstance(failure, Refused)
        self.assertIn("530 tls-required", failure.text)

    def test_peerOverrideOff(self):
        """
        A C{[[peer]]} override to C{off} talks plaintext to that peer even
        though the hosted domain requires TLS.
        """
        self.servers(
            self.policy(
                {"alpha.test": self.certificate("a", "alpha.test")},
                {"alpha.test": "required"},
                peers={"beta.test": ("off", None)},
            ),
            self.betaOffering(),
        )
        self.assertNotIsInstance(self.sendAlphaToBeta(), Exception)
        self.assertFalse(self.only(self.alpha.pool.connections("beta.test")).tlsActive)

    def test_peerOverrideOffAccepted(self):
        """
        A server that requires TLS for every hosted domain but has TLS off
        for one peer accepts that peer's plaintext connection and its
        traffic, while other plaintext peers are refused after HELLO.
        """
        self.servers(
            None,
            self.policy(
                {"beta.test": self.certificate("b", "beta.test")},
                {"beta.test": "required"},
                peers={"alpha.test": ("off", None)},
            ),
        )
        self.assertNotIsInstance(self.sendAlphaToBeta(), Exception)
        omega = self.network.server("10.0.0.3", ["omega.test"], tls=None)
        failure = self.send(
            omega, message("oz@omega.test", "bob@beta.test"), ("omega.test", "beta.test")
        )
        self.assertIsInstance(failure, Refused)
        self.assertEqual(failure.code, ErrorCode.TLS_REQUIRED)
        self.assertIn("beta.test requires TLS with omega.test", failure.text)

    def test_oneHostedDomainRequires(self):
        """
        On a server where one hosted domain requires TLS and another only
        offers it, a plaintext connection carries the second's pairs and
        refuses the first's with tls-required.
        """
        alphaTLS = self.policy(
            {"alpha.test": self.certificate("a", "alpha.test")},
            {"alpha.test": "required", "omega.test": "offered"},
        )
        self.alpha = self.network.server("10.0.0.1", ["alpha.test", "omega.test"], tls=alphaTLS)
        self.beta = self.network.server("10.0.0.2", ["beta.test"], tls=None)
        self.assertNotIsInstance(
            self.send(
                self.alpha, message("oz@omega.test", "bob@beta.test"), ("omega.test", "beta.test")
            ),
            Exception,
        )
        failure = self.sendAlphaToBeta()
        # The plaintext connection omega's message used is not reused for
        # alpha.test: a new one is opened requiring TLS, and refused.
        self.assertIsInstance(failure, Refused)
        self.assertTrue(failure.temporary)
        self.assertIn("530 tls-required", failure.text)
        self.assertIn("does not offer STARTTLS", failure.text)
        connections = self.alpha.pool.connections("beta.test")
        self.assertEqual([c.tlsActive for c in connections], [False])

    def test_plaintextDialbackRefusedForRequiringDomain(self):
        """
        A DIALBACK_KEY on a plaintext connection for a hosted domain that
        requires TLS is refused with tls-required (the connection stays).
        """
        from imxd.wire import DialbackKey

        betaTLS = self.policy(
            {"beta.test": self.certificate("b", "beta.test")},
            {"beta.test": "required", "omega.test": "offered"},
        )
        beta = self.network.server("10.0.0.2", ["beta.test", "omega.test"], tls=betaTLS)
        stranger = self.stranger(beta)
        answer = self.network.answer(
            stranger, DialbackKey(fromDomain="x.test", toDomain="beta.test", token=b"t" * 16)
        )
        self.assertIsInstance(answer, RemoteError)
        self.assertEqual(answer.code, ErrorCode.TLS_REQUIRED)
        self.assertIs(stranger.state, PeerState.OPEN)

    def test_startTLSNotOffered(self):
        """
        STARTTLS sent to a server that offers no TLS is answered with
        tls-failed, and the connection goes on in plaintext.
        """
        beta = self.network.server("10.0.0.2", ["beta.test"], tls=None)
        stranger = self.stranger(beta)
        answer = self.network.answer(stranger, StartTLS())
        self.assertIsInstance(answer, RemoteError)
        self.assertEqual(answer.code, ErrorCode.TLS_FAILED)
        self.assertIs(stranger.state, PeerState.OPEN)

    def test_startTLSAfterDialbackRefused(self):
        """
        STARTTLS after a pair is authenticated in plaintext is refused:
        nothing authenticated before the upgrade may carry into TLS.
        """
        self.servers(None, self.betaOffering())
        self.assertNotIsInstance(self.sendAlphaToBeta(), Exception)
        [inbound] = [c for c in self.beta._inbound() if c.receivablePairs]
        self.assertIsNotNone(inbound.upgradeRefusal())
        self.assertIn("dial-back", inbound.upgradeRefusal())


class HandshakeFailureTests(TLSNetworkMixin, SynchronousTestCase):
    """
    An upgrade that does not finish: the connection is closed, counted and
    logged, never left half open.
    """

    def upgradedStranger(self):
        """
        @return: C{(beta, stranger)}: a raw peer that has sent STARTTLS to
            beta and received PROCEED, but has not started TLS.
        """
        from imxd.wire import StartTLSProceed

        beta = self.serving("10.0.0.2", "beta.test")
        stranger = self.stranger(beta, capabilities=("starttls",))
        stranger.transport.write(encodeRecord(StartTLS(tag=1)))
        self.network.flush()
        self.assertIsInstance(stranger.received[-1], StartTLSProceed)
        return beta, stranger

    def test_garbageInsteadOfTLS(self):
        """
        Octets that are not TLS after PROCEED fail the handshake: the
        connection closes and the failure is counted.
        """
        beta, stranger = self.upgradedStranger()
        stranger.transport.write(b"\x16\x03\x01\x00\x05hello, not a TLS record")
        self.network.flush()
        self.assertEqual(beta.connections, set())
        self.assertEqual(beta.counters["tls-failures"], 1)
        self.assertEqual(beta.counters["tls-upgrades"], 0)

    def test_silentAfterProceed(self):
        """
        A peer that never starts TLS after PROCEED is dropped after the
        handshake timeout.
        """
        beta, stranger = self.upgradedStranger()
        self.network.advance(9)
        self.assertEqual(len(beta.connections), 1)
        self.network.advance(2)
        self.network.advance(6)
        self.assertEqual(beta.connections, set())


class ReviewRegressionTests(TLSNetworkMixin, SynchronousTestCase):
    """
    Holes found in review: each stays closed.
    """

    def serverAuthOnly(self, name, domain):
        """
        @return: C{(certificate, key)} paths of a leaf whose extended key
            usage is serverAuth only, as public CAs now issue them.
        """
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        issuer = x509.load_pem_x509_certificate(self.ca.cert_pem.bytes())
        caKey = serialization.load_pem_private_key(self.ca.private_key_pem.bytes(), None)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)]))
            .issuer_name(issuer.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(caKey, hashes.SHA256())
        )
        paths = os.path.join(self.directory, f"{name}.pem"), os.path.join(self.directory, f"{name}.key")
        with open(paths[0], "wb") as f:
            f.write(certificate.public_bytes(serialization.Encoding.PEM))
        with open(paths[1], "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        return paths

    def test_dialbackForRequiredPairNeverInPlaintext(self):
        """
        When a hosted domain requires TLS with a peer that does not offer
        it, dial-back's return connection (which carries the secret) is
        refused rather than made in plaintext, so the pair stays
        unauthenticated; another hosted domain that only offers TLS does
        not open the way.
        """
        alpha = self.network.server(
            "10.0.0.1",
            ["alpha.test", "gamma.test"],
            tls=self.policy(
                {"alpha.test": self.certificate("a", "alpha.test")},
                {"alpha.test": "required", "gamma.test": "offered"},
            ),
        )
        beta = self.network.server(
            "10.0.0.2", ["beta.test"], tls=self.policy({}, {"beta.test": "offered"})
        )
        failure = self.send(
            beta, message("bob@beta.test", "ann@alpha.test"), ("beta.test", "alpha.test")
        )
        self.assertIsInstance(failure, Exception)
        self.assertEqual(alpha.aggregator.domain("alpha.test").backend.messages, [])
        # No connection of alpha's to beta carried the secret in plaintext.
        self.assertEqual([c for c in alpha.pool.connections("beta.test") if not c.tlsActive], [])
        self.assertEqual(alpha.counters["pairs-authenticated"], 0)

    def test_relaxedPeerLeavesOthersAlone(self):
        """
        A C{[[peer]]} override changes the mode towards that peer only.
        """
        policy = self.policy(
            {"alpha.test": self.certificate("a", "alpha.test")},
            {"alpha.test": "required"},
            peers={"legacy.test": ("off", None)},
        )
        self.assertEqual(policy.connectionMode("legacy.test"), "off")
        self.assertEqual(policy.connectionMode("beta.test"), "required")
        self.assertEqual(policy.connectionMode(), "offered")
        quiet = self.policy({}, {"alpha.test": "off"}, peers={"beta.test": ("offered", None)})
        self.assertEqual(quiet.connectionMode("gamma.test"), "off")

    def test_refusalsOnOpenConnectionsAreTemporary(self):
        """
        A request in flight when the connection is refused (here: the
        peer sends an oversized record) fails as temporary, quoting why.
        """
        alpha = self.network.server("10.0.0.1", ["alpha.test"])
        beta = self.network.server("10.0.0.2", ["beta.test"])
        self.assertNotIsInstance(
            self.send(alpha, message("ann@alpha.test", "bob@beta.test"), ("alpha.test", "beta.test")),
            Exception,
        )
        inbound = self.only(beta._inbound())
        results = []
        alpha.pool.send(
            ("alpha.test", "beta.test"), message("ann@alpha.test", "bob@beta.test", "m2")
        ).addBoth(results.append)
        inbound.transport.write(b"\x00\xff\xff\xff\x01\x00\x00\x00\x00\x00\x00\x09")
        self.network.flush()
        failure = results[0].value
        self.assertIsInstance(failure, Refused)
        self.assertTrue(failure.temporary)
        self.assertIn("505 record-too-large", failure.text)

    def test_certificateWithoutSubjectAltName(self):
        """
        A certificate with no subjectAltName is judged not valid for the
        domain, both as the receiver's certificate (refused with its
        reason) and as a client certificate (dial-back instead); nothing
        escapes into Twisted.
        """
        caAsLeaf = (
            self.write("ca-leaf.pem", self.ca.cert_pem),
            self.write("ca-leaf.key", self.ca.private_key_pem),
        )
        alpha = self.network.server(
            "10.0.0.1",
            ["alpha.test"],
            tls=self.policy({"alpha.test": caAsLeaf}, {"alpha.test": "offered"},
                            peers={"beta.test": (None, True)}),
        )
        self.serving("10.0.0.2", "beta.test", certificate=caAsLeaf)
        failure = self.send(
            alpha, message("ann@alpha.test", "bob@beta.test"), ("alpha.test", "beta.test")
        )
        self.assertIn("certificate of beta.test: certificate is not valid for beta.test", failure.text)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_serverAuthOnlyClientCertificate(self):
        """
        A client certificate whose extended key usage is serverAuth only
        still authenticates its domain without dial-back.
        """
        alpha = self.serving(
            "10.0.0.1", "alpha.test", certificate=self.serverAuthOnly("a", "alpha.test")
        )
        beta = self.serving("10.0.0.2", "beta.test", certificate=self.serverAuthOnly("b", "beta.test"))
        answer = self.send(
            alpha, message("ann@alpha.test", "bob@beta.test"), ("alpha.test", "beta.test")
        )
        self.assertNotIsInstance(answer, Exception)
        self.assertEqual(beta.counters["pairs-certified"], 1)
        self.assertEqual(beta.counters["dialbacks-started"], 0)

    def test_handshakeClockRunsFromStartTLS(self):
        """
        The handshake timeout covers STARTTLS, TLS and the second HELLO
        together: a peer that finishes TLS late and never sends HELLO is
        dropped one timeout after STARTTLS, not two.
        """
        beta = self.serving("10.0.0.2", "beta.test")
        stranger = self.stranger(beta, capabilities=("starttls",))
        stranger.transport.write(encodeRecord(StartTLS(tag=1)))
        self.network.flush()
        self.network.advance(8)
        stranger.handshakeCompleted = lambda: None
        stranger.dataReceived = lambda data: None
        stranger.transport.startTLS(
            CertificateStore({}, self.caFile).clientConnections("beta.test")
        )
        self.network.flush()
        self.assertEqual(beta.counters["tls-upgrades"], 1)
        self.network.advance(3)
        # Refused at t=10 (ERROR inside TLS, then the close grace).
        self.assertEqual(beta.counters["connections-refused"], 1)
        self.network.advance(6)
        self.assertEqual(beta.connections, set())

    def test_secondStartTLSRefused(self):
        """
        After a STARTTLS answered with tls-failed, a second STARTTLS is a
        bad sequence.
        """
        beta = self.network.server("10.0.0.2", ["beta.test"], tls=None)
        stranger = self.stranger(beta)
        first = self.network.answer(stranger, StartTLS())
        self.assertEqual(first.code, ErrorCode.TLS_FAILED)
        second = self.network.answer(stranger, StartTLS())
        self.assertIsInstance(second, RemoteError)
        self.assertEqual(second.code, ErrorCode.BAD_SEQUENCE)
        self.assertIs(stranger.state, PeerState.CLOSED)

    def test_nothingButTheAnswerWhileUpgrading(self):
        """
        While its STARTTLS awaits the answer, the originator takes nothing
        else: a Data record there is a bad sequence.
        """
        alpha = self.network.server(
            "10.0.0.1", ["alpha.test"], tls=self.policy({}, {"alpha.test": "offered"})
        )
        class Sneaky(Stranger):
            def _handleStartTLS(self, record):
                self.sendRecord(message("bob@beta.test", "ann@alpha.test"))

        Sneaky.stateTables = {state: dict(table) for state, table in Stranger.stateTables.items()}
        Sneaky.stateTables[PeerState.OPEN][StartTLS] = Sneaky._handleStartTLS
        self.fakeBeta(Sneaky)
        failure = self.send(
            alpha, message("ann@alpha.test", "bob@beta.test"), ("alpha.test", "beta.test")
        )
        self.assertIn("Message during the TLS upgrade", failure.text)
        self.assertEqual(alpha.aggregator.domain("alpha.test").backend.messages, [])
