"""
Tests for L{imxd.tls}: certificates per hosted domain chosen by SNI, and
the check of a peer's certificate against its domain, each failure with a
reason an operator can act on.  Certificates come from trustme; handshakes
run in memory.
"""

from __future__ import annotations

import datetime

import trustme
from OpenSSL import SSL
from twisted.trial.unittest import SynchronousTestCase

from imxd.tls import CertificateStore, TLSError
from tests.certificates import CertificatesMixin

MAX_ROUNDS = 50


def handshake(serverContext, clientContext, serverName=None):
    """
    Run a TLS handshake between two in-memory connections.

    @return: C{(server connection, client connection)}.
    """
    server = SSL.Connection(serverContext, None)
    server.set_accept_state()
    client = SSL.Connection(clientContext, None)
    client.set_connect_state()
    if serverName:
        client.set_tlsext_host_name(serverName.encode("ascii"))
    done = {server: False, client: False}
    for _ in range(MAX_ROUNDS):
        for connection in (client, server):
            if not done[connection]:
                try:
                    connection.do_handshake()
                    done[connection] = True
                except SSL.WantReadError:
                    pass
        for source, sink in ((client, server), (server, client)):
            try:
                sink.bio_write(source.bio_read(65536))
            except SSL.WantReadError:
                pass
        if all(done.values()):
            return server, client
    raise AssertionError("the handshake never finished")


class CertificateStoreTests(CertificatesMixin, SynchronousTestCase):
    """
    Hosted domains' certificates, and peer checks.
    """

    def store(self, certificates, caFile=None, verify=True):
        return CertificateStore(certificates, caFile or self.caFile, verify)

    def test_sniSelectsTheDomainsCertificate(self):
        """
        Of three hosted domains (one certificate covering two of them by
        SAN), SNI selects the right certificate; the peer checks it
        against the domain it dialled.
        """
        alpha = self.certificate("alpha", "alpha.test")
        shared = self.certificate("shared", "beta.test", "gamma.test")
        server = self.store({"alpha.test": alpha, "beta.test": shared, "gamma.test": shared})
        client = self.store({})
        for domain in ("alpha.test", "beta.test", "gamma.test"):
            _, connection = handshake(
                server.serverContext("alpha.test"), client.clientContext(), domain
            )
            self.assertIsNone(client.peerProblem(connection, domain), domain)
        _, connection = handshake(server.serverContext("alpha.test"), client.clientContext(), "gamma.test")
        self.assertEqual(client.peerProblem(connection, "alpha.test"), "certificate is not valid for alpha.test")

    def test_tls12AtLeast(self):
        """
        The handshake is TLS 1.2 or later; a client offering only TLS 1.1
        is refused.
        """
        server = self.store({"alpha.test": self.certificate("alpha", "alpha.test")})
        _, connection = handshake(server.serverContext("alpha.test"), self.store({}).clientContext(), "alpha.test")
        self.assertIn(connection.get_protocol_version_name(), ("TLSv1.2", "TLSv1.3"))
        old = SSL.Context(SSL.TLS_METHOD)
        old.set_max_proto_version(SSL.TLS1_1_VERSION)
        self.assertRaises(SSL.Error, handshake, server.serverContext("alpha.test"), old, "alpha.test")

    def refusal(self, serverPair, expect, caFile=None):
        server = self.store({"alpha.test": serverPair})
        client = self.store({}, caFile)
        _, connection = handshake(server.serverContext("alpha.test"), client.clientContext(), "alpha.test")
        return client.peerProblem(connection, expect)

    def test_wrongDomain(self):
        self.assertEqual(
            self.refusal(self.certificate("other", "other.test"), "alpha.test"),
            "certificate is not valid for alpha.test",
        )

    def test_expired(self):
        past = datetime.datetime(2020, 1, 1)
        pair = self.certificate("old", "alpha.test", not_before=past, not_after=past + datetime.timedelta(days=1))
        self.assertEqual(self.refusal(pair, "alpha.test"), "certificate has expired")

    def test_unknownIssuer(self):
        pair = self.certificate("s", "alpha.test", ca=trustme.CA())
        self.assertEqual(self.refusal(pair, "alpha.test"), "certificate issuer is unknown")

    def test_selfSigned(self):
        pair = self.selfSigned("self")
        self.assertEqual(self.refusal(pair, "alpha.test"), "certificate is self-signed")

    def test_verificationOff(self):
        """
        With verification off (an operator's per-peer choice) any
        certificate passes.
        """
        server = self.store({"alpha.test": self.certificate("other", "other.test")})
        client = self.store({}, verify=False)
        _, connection = handshake(server.serverContext("alpha.test"), client.clientContext(), "alpha.test")
        self.assertIsNone(client.peerProblem(connection, "alpha.test"))

    def test_clientCertificate(self):
        """
        The receiving side asks for a client certificate: one valid for the
        originating domain passes its check; none is reported as such.
        """
        server = self.store({"alpha.test": self.certificate("alpha", "alpha.test")})
        originator = self.store({"beta.test": self.certificate("beta", "beta.test")})
        connection, _ = handshake(
            server.serverContext("alpha.test"), originator.clientContext("beta.test"), "alpha.test"
        )
        self.assertIsNone(server.peerProblem(connection, "beta.test"))
        self.assertEqual(server.peerProblem(connection, "gamma.test"), "certificate is not valid for gamma.test")
        connection, _ = handshake(
            server.serverContext("alpha.test"), self.store({}).clientContext(), "alpha.test"
        )
        self.assertEqual(server.peerProblem(connection, "beta.test"), "no certificate was presented")

    def test_unusableFiles(self):
        """
        A missing certificate, a key that does not match, or a bad CA
        bundle is one line naming the file.
        """
        alpha = self.certificate("alpha", "alpha.test")
        beta = self.certificate("beta", "beta.test")
        for certificates, caFile, words in [
            ({"a.test": ("/nonexistent.pem", alpha[1])}, None, "/nonexistent.pem: cannot use the certificate"),
            ({"a.test": (alpha[0], beta[1])}, None, f"{beta[1]}: cannot use the key"),
            ({"a.test": alpha}, alpha[1], f"{alpha[1]}: cannot load CA bundle"),
        ]:
            with self.assertRaises(TLSError) as caught:
                CertificateStore(certificates, caFile or self.caFile)
            self.assertIn(words, str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))
