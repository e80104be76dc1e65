"""
TLS for peering (draft 6.3.2, C{docs/protocol.md} section 11): the hosted
domains' certificates, chosen by SNI, and the check of a peer's certificate
against the peer's I{domain} with RFC 6125 rules (service_identity).

This module builds pyOpenSSL contexts and judges certificates; the STARTTLS
exchange on a connection is the peer protocol's.  Peer certificates are
verified during the handshake without aborting it, so that the refusal can
name the reason (wrong domain, expired, unknown issuer, self-signed) in an
ERROR an operator can act on.
"""

from __future__ import annotations

from typing import Mapping, Optional

import ssl

from OpenSSL import SSL, crypto
from service_identity import CertificateError, VerificationError
from service_identity.pyopenssl import verify_hostname
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from zope.interface import implementer

__all__ = ["TLSError", "CertificateStore", "TLSPolicy", "verifyReason", "describe"]

#: OpenSSL X509 verification error codes and the reasons operators read.
_VERIFY_REASONS = {
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "certificate is self-signed",
    19: "certificate chain ends in an untrusted self-signed certificate",
    20: "certificate issuer is unknown",
    21: "certificate issuer is unknown",
    2: "certificate issuer is unknown",
    23: "certificate has been revoked",
    26: "certificate is not for this purpose",
}

#: Ciphers for TLS 1.2 (TLS 1.3 suites are OpenSSL's defaults): forward
#: secrecy and AEAD only.
_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20"


class TLSError(Exception):
    """
    A certificate or key cannot be used; the message names the file and
    the problem in one line.
    """


def _baseContext() -> SSL.Context:
    """
    A context with imxd's TLS settings.  It asks for the peer's
    certificate and takes whatever comes: the certificate is judged after
    the handshake (L{CertificateStore.peerProblem}), against one trust
    store shared by every context, so that the refusal can say why and
    many hosted domains do not each hold a copy of the CAs.
    """
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
    context.set_cipher_list(_CIPHERS)
    context.set_verify(SSL.VERIFY_PEER, _takeAny)
    return context


def _takeAny(connection, certificate, code, depth, ok) -> bool:
    return True


def _trustStore(caFile: Optional[str]) -> crypto.X509Store:
    """
    @return: the CAs trusted for peers' certificates: C{caFile}, or the
        system's (OpenSSL's default file and directory).
    @raise TLSError: C{caFile} cannot be loaded.
    """
    store = crypto.X509Store()
    if caFile:
        try:
            store.load_locations(caFile)
        except crypto.Error as e:
            raise TLSError(f"{caFile}: cannot load CA bundle: {_text(e)}") from None
        return store
    paths = ssl.get_default_verify_paths()
    for cafile, capath in ((paths.cafile, None), (None, paths.capath)):
        if cafile or capath:
            try:
                store.load_locations(cafile, capath)
            except crypto.Error:
                pass
    return store


def _loadPair(context: SSL.Context, certificate: str, key: str) -> None:
    try:
        context.use_certificate_chain_file(certificate)
    except (SSL.Error, OSError) as e:
        raise TLSError(f"{certificate}: cannot use the certificate: {_text(e)}") from None
    try:
        context.use_privatekey_file(key)
        context.check_privatekey()
    except (SSL.Error, OSError) as e:
        raise TLSError(f"{key}: cannot use the key with {certificate}: {_text(e)}") from None


def _text(error: Exception) -> str:
    if isinstance(error, SSL.Error) and error.args and isinstance(error.args[0], list):
        return "; ".join(str(item[-1]) for item in error.args[0]) or "OpenSSL error"
    return str(error) or type(error).__name__


def verifyReason(code: int) -> str:
    """
    @return: the reason an operator reads for an OpenSSL verify error code.
    """
    return _VERIFY_REASONS.get(code, f"certificate verification failed (OpenSSL error {code})")


class CertificateStore:
    """
    The certificates of the hosted domains and the trust anchors for peers.

    @ivar domains: the hosted domains that have a certificate.
    """

    def __init__(
        self,
        certificates: Mapping[str, tuple[str, str]],
        caFile: Optional[str] = None,
        verify: bool = True,
    ) -> None:
        """
        @param certificates: C{{domain: (certificate path, key path)}};
            one certificate may serve several domains (its SAN names them).
        @param caFile: a PEM bundle of trusted CAs, or L{None} for the
            system's.
        @param verify: check peer certificates; off only for operators who
            choose so per peer.
        @raise TLSError: a certificate or key cannot be used.
        """
        self.caFile = caFile
        self.verify = verify
        self._byPair: dict[tuple[str, str], SSL.Context] = {}
        self._byDomain: dict[str, SSL.Context] = {}
        for domain, pair in sorted(certificates.items()):
            context = self._byPair.get(pair)
            if context is None:
                context = self._serving(*pair)
                self._byPair[pair] = context
            self._byDomain[domain] = context
        self.domains = frozenset(self._byDomain)
        self._anonymous: Optional[SSL.Context] = None
        self._trusted = _trustStore(caFile)

    def _serving(self, certificate: str, key: str) -> SSL.Context:
        context = _baseContext()
        _loadPair(context, certificate, key)
        context.set_tlsext_servername_callback(self._selectBySNI)
        return context

    def _selectBySNI(self, connection: SSL.Connection) -> None:
        name = connection.get_servername()
        if name is None:
            return
        context = self._byDomain.get(name.decode("ascii", "replace").lower().rstrip("."))
        if context is not None:
            connection.set_context(context)

    def serverContext(self, domain: str) -> Optional[SSL.Context]:
        """
        The context for accepting TLS on a connection opened for C{domain}
        (a HELLO's TO_DOMAIN); SNI may switch it to another hosted
        domain's certificate.

        @return: the context, or L{None} when C{domain} has no certificate.
        """
        return self._byDomain.get(domain)

    def serverConnections(self, domain: Optional[str]) -> Optional["_Connections"]:
        """
        What C{transport.startTLS} needs to accept TLS on a connection
        opened for C{domain} (L{None}: the peer named none, so the first
        certificate serves unless SNI picks another).

        @return: a connection creator, or L{None} when no certificate fits.
        """
        if domain is None:
            context = next(iter(self._byPair.values()), None)
        else:
            context = self.serverContext(domain)
        return None if context is None else _Connections(context)

    def clientConnections(self, serverName: str, ownDomain: Optional[str] = None) -> "_Connections":
        """
        What C{transport.startTLS} needs to start TLS towards the peer
        domain C{serverName} (sent as SNI), presenting C{ownDomain}'s
        certificate when it has one.
        """
        return _Connections(self.clientContext(ownDomain), serverName)

    def clientContext(self, ownDomain: Optional[str] = None) -> SSL.Context:
        """
        The context for starting TLS towards a peer, presenting
        C{ownDomain}'s certificate as a client certificate when it has one.
        """
        context = self._byDomain.get(ownDomain) if ownDomain else None
        if context is not None:
            return context
        if self._anonymous is None:
            self._anonymous = _baseContext()
        return self._anonymous

    def peerProblem(self, connection: SSL.Connection, domain: str) -> Optional[str]:
        """
        Judge the certificate a peer presented for C{domain}, after the
        handshake.

        @return: L{None} when it is valid for C{domain} (or verification is
            off), else the reason in one line.
        """
        if not self.verify:
            return None
        leaf = connection.get_peer_certificate()
        if leaf is None:
            return "no certificate was presented"
        chain = connection.get_peer_cert_chain() or []
        try:
            crypto.X509StoreContext(self._trusted, leaf, chain).verify_certificate()
        except crypto.X509StoreContextError as e:
            return verifyReason(e.errors[0])
        try:
            verify_hostname(connection, domain)
        except (VerificationError, CertificateError):
            # CertificateError: no usable DNS-ID at all (no subjectAltName,
            # or a malformed pattern).
            return f"certificate is not valid for {domain}"
        return None



@implementer(IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator)
class _Connections:
    """
    Makes the pyOpenSSL connection for one TLS upgrade, from a shared
    context, with SNI on the client side.
    """

    def __init__(self, context: SSL.Context, serverName: Optional[str] = None) -> None:
        self._context = context
        self._serverName = serverName

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        if self._serverName:
            connection.set_tlsext_host_name(self._serverName.encode("ascii"))
        return connection

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        return SSL.Connection(self._context, None)


def describe(connection: SSL.Connection) -> str:
    """
    @return: the protocol version and cipher of an established TLS
        connection, e.g. C{"TLSv1.3 TLS_AES_256_GCM_SHA384"}, for logs and
        status.
    """
    return f"{connection.get_protocol_version_name()} {connection.get_cipher_name()}"


class TLSPolicy:
    """
    Whether TLS is used, required and checked, for each hosted domain and
    peer (C{docs/operating.md}, "TLS"): a peer's C{[[peer]]} settings
    override the hosted domain's C{policy.tls}, which defaults to
    C{server.tls.policy}.

    @ivar store: the L{CertificateStore}.
    """

    def __init__(self, store: CertificateStore, domainModes: Mapping[str, str],
                 peers: Optional[Mapping[str, tuple]] = None, verify: bool = True) -> None:
        """
        @param store: the hosted domains' certificates and the CAs trusted.
        @param domainModes: C{{hosted domain: "off" | "offered" | "required"}}.
        @param peers: C{{remote domain: (mode or None, verify or None)}}.
        @param verify: whether peers' certificates are checked, unless a
            peer says otherwise.
        """
        self.store = store
        self._domainModes = dict(domainModes)
        self._peers = dict(peers or {})
        self._verify = verify
        self._outbound = _strictestCommon(self._domainModes.values())
        # For connections peers open, a peer's own mode counts too: a
        # server that requires TLS everywhere except with one peer cannot
        # refuse plaintext peers before it knows who they are.
        self._inbound = _strictestCommon(
            [*self._domainModes.values(), *(m for m, _ in self._peers.values() if m)]
        )

    @classmethod
    def fromConfig(cls, config) -> "TLSPolicy":
        """
        Build the policy of a L{imxd.config.Config}.

        @raise TLSError: a certificate, key or CA bundle cannot be used.
        """
        certificates = {
            d.name: (d.certificate, d.key) for d in config.domains if d.certificate
        }
        tls = config.server.tls
        return cls(
            CertificateStore(certificates, tls.caFile),
            {d.name: d.policy.tls for d in config.domains},
            {p.domain: (p.tls, p.tlsVerify) for p in config.peers},
            tls.verify,
        )

    def pairMode(self, hosted: str, remote: str) -> str:
        """
        @return: the TLS mode for traffic between C{hosted} and C{remote}.
        """
        mode = self._peers.get(remote, (None, None))[0]
        return mode or self._domainModes.get(hosted, "offered")

    def connectionMode(self, remote: Optional[str] = None, hosted: Optional[str] = None) -> str:
        """
        The mode of a whole connection.

        For one opened to C{remote} (for the hosted domain C{hosted}): the
        peer's setting if it has one; C{"required"} if C{hosted} requires
        TLS with it; otherwise C{"required"} when every hosted domain
        requires TLS, C{"off"} when none uses it, else C{"offered"}.

        For one a peer opened (C{remote} unknown): the same over the hosted
        domains and every peer setting.
        """
        if remote is None:
            return self._inbound
        mode = self._peers.get(remote, (None, None))[0]
        if mode is not None:
            return mode
        if hosted is not None and self.pairMode(hosted, remote) == "required":
            return "required"
        return self._outbound

    def offers(self) -> bool:
        """
        @return: whether peers connecting here are offered STARTTLS: some
            hosted domain has a certificate and not every one has TLS off.
        """
        return bool(self.store.domains) and self._inbound != "off"

    def verifies(self, remote: str) -> bool:
        """
        @return: whether C{remote}'s certificates are checked.
        """
        verify = self._peers.get(remote, (None, None))[1]
        return self._verify if verify is None else verify


def _strictestCommon(modes) -> str:
    """
    @return: C{"required"} if every mode is, C{"off"} if every mode is,
        else C{"offered"}.
    """
    modes = set(modes)
    if len(modes) == 1:
        return modes.pop()
    return "offered"
