"""
Dial-back primitives (draft 6.3.1, C{docs/protocol.md} section 10): the
originator's stateless tokens, the receiver's short-lived secrets, and the
per-server secret file they are signed with.

Pure: no I/O except L{loadOrCreateSecret}, time passed in by the caller.
"""

import hashlib
import hmac
import os
import stat
import struct

import attrs

TOKEN_VERSION = 1
TOKEN_LABEL = b"imx-dialback-token"
MAC_SIZE = 32
SECRET_SIZE = 16
SERVER_SECRET_SIZE = 32
_FIXED = struct.Struct(">BIQB")


class DialbackError(Exception):
    """
    A token or secret was refused; the message says why, for the log and
    the ERROR record's TEXT.
    """


@attrs.frozen
class TokenClaims:
    """
    What a valid token says: it was issued by this service for C{Connection
    1} (C{connectionId} on C{node}) and the pair C{fromDomain → toDomain}.
    """

    fromDomain: str
    toDomain: str
    connectionId: int
    node: str
    expiry: int


def loadOrCreateSecret(path, randomBytes=os.urandom):
    """
    Read the server's dial-back secret, creating it (mode 0600, 32 random
    bytes written as hex) on first start.  Every node of one service shares
    this file so that any node can check another's tokens.

    @param path: the secret file's path.
    @param randomBytes: source of randomness, for tests.
    @return: the secret.
    @raise DialbackError: the file is unreadable, malformed, too short, or
        readable by group or others.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as e:
        raise DialbackError(f"{path}: cannot create: {e.strerror}") from None
    else:
        with os.fdopen(fd, "w") as f:
            f.write(randomBytes(SERVER_SECRET_SIZE).hex() + "\n")
    try:
        mode = os.stat(path).st_mode
        with open(path) as f:
            text = f.read().strip()
    except OSError as e:
        raise DialbackError(f"{path}: cannot read: {e.strerror}") from None
    if stat.S_IMODE(mode) & 0o077:
        raise DialbackError(
            f"{path}: readable by group or others (mode {stat.S_IMODE(mode):04o});"
            " run chmod 600"
        )
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise DialbackError(f"{path}: not a hex string") from None
    if len(secret) < SECRET_SIZE:
        raise DialbackError(
            f"{path}: {len(secret)} bytes; at least {SECRET_SIZE} are required"
        )
    return secret


class DialbackTokens:
    """
    Issue and check the originator's tokens (the DIALBACK_KEY TOKEN field).

    A token is C{01 | expiry u32 | connection id u64 | node length u8 |
    node | mac}, the mac being HMAC-SHA256 under the server secret of
    C{"imx-dialback-token" 00 from 00 to 00} and everything before it.  No
    state is kept: any node holding the secret can check any token.
    """

    def __init__(self, secret, node, lifetime=60):
        """
        @param secret: the server secret (L{loadOrCreateSecret}).
        @param node: this node's name, at most 255 UTF-8 bytes.
        @param lifetime: seconds a token stays valid.
        """
        self._secret = secret
        self.node = node
        self._nodeBytes = node.encode("utf-8")
        if len(self._nodeBytes) > 255:
            raise ValueError("node name longer than 255 bytes")
        self.lifetime = lifetime

    def _mac(self, fromDomain, toDomain, signed):
        """
        @return: the mac over a pair and the signed part of a token.
        """
        message = b"\x00".join(
            (TOKEN_LABEL, fromDomain.encode("ascii"), toDomain.encode("ascii"), signed)
        )
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def issue(self, fromDomain, toDomain, connectionId, now):
        """
        Make the token for Connection 1 (C{connectionId}) and the pair
        C{fromDomain → toDomain}.

        @param now: the current time, Unix seconds.
        @return: the token bytes.
        """
        expiry = int(now) + self.lifetime
        signed = (
            _FIXED.pack(TOKEN_VERSION, expiry, connectionId, len(self._nodeBytes))
            + self._nodeBytes
        )
        return signed + self._mac(fromDomain, toDomain, signed)

    def verify(self, token, fromDomain, toDomain, now):
        """
        Check a token that a DIALBACK_VERIFY brought back.

        @param fromDomain: the originating domain (this service's).
        @param toDomain: the receiving domain that asks.
        @param now: the current time, Unix seconds.
        @return: the L{TokenClaims}.
        @raise DialbackError: malformed, not issued by this service for
            this pair, or expired.
        """
        if len(token) < _FIXED.size + MAC_SIZE:
            raise DialbackError("token too short")
        version, expiry, connectionId, nodeLength = _FIXED.unpack_from(token)
        if version != TOKEN_VERSION:
            raise DialbackError(f"unknown token version {version}")
        signedLength = _FIXED.size + nodeLength
        if len(token) != signedLength + MAC_SIZE:
            raise DialbackError("token length does not match its node name")
        signed, mac = token[:signedLength], token[signedLength:]
        if not hmac.compare_digest(mac, self._mac(fromDomain, toDomain, signed)):
            raise DialbackError(
                f"token was not issued by this service for {fromDomain} -> {toDomain}"
            )
        if now > expiry:
            raise DialbackError(f"token expired {int(now) - expiry} s ago")
        try:
            node = token[_FIXED.size : signedLength].decode("utf-8")
        except UnicodeDecodeError:
            raise DialbackError("token node name is not UTF-8") from None
        return TokenClaims(fromDomain, toDomain, connectionId, node, expiry)


@attrs.define
class _Coined:
    secret: bytes
    expiry: float


class DialbackSecrets:
    """
    The receiver's secrets: coined for one (connection, pair), used once,
    valid for C{lifetime} seconds.

    @ivar lifetime: seconds a secret stays valid.
    """

    def __init__(self, lifetime=15.0, randomBytes=os.urandom):
        """
        @param lifetime: seconds a secret stays valid (the dial-back timeout).
        @param randomBytes: source of randomness, for tests.
        """
        self.lifetime = lifetime
        self._randomBytes = randomBytes
        self._byKey = {}
        self._keyBySecret = {}

    def coin(self, connection, pair, now):
        """
        Coin a fresh secret for C{pair} on C{connection}, replacing any
        earlier one for the same key.

        @param connection: a hashable identity of Connection 1.
        @param pair: C{(fromDomain, toDomain)}.
        @return: the secret (L{SECRET_SIZE} random bytes).
        """
        self._drop((connection, pair))
        secret = self._randomBytes(SECRET_SIZE)
        self._byKey[(connection, pair)] = _Coined(secret, now + self.lifetime)
        self._keyBySecret[secret] = (connection, pair)
        return secret

    def consume(self, secret, connection, pair, now):
        """
        Check a secret echoed by DIALBACK_SECRET on C{connection}.  Whatever
        the outcome, the secret can never be used again; a secret seen on
        the wrong connection or for the wrong pair is burnt too.

        @raise DialbackError: unknown, used, expired, or coined for another
            connection or pair.
        """
        key = (connection, pair)
        owner = self._keyBySecret.get(secret)
        if owner is not None and owner != key:
            self._drop(owner)
            raise DialbackError(
                "secret was coined for another connection or domain pair"
            )
        coined = self._byKey.get(key)
        if coined is None:
            raise DialbackError("no dial-back is pending for this pair here")
        self._drop(key)
        if not hmac.compare_digest(coined.secret, secret):
            raise DialbackError("secret does not match")
        if now > coined.expiry:
            raise DialbackError("secret expired")

    def pending(self, connection=None):
        """
        @param connection: count only this connection's secrets, if given.
        @return: how many secrets are outstanding.
        """
        if connection is None:
            return len(self._byKey)
        return sum(1 for c, _ in self._byKey if c == connection)

    def expire(self, now):
        """
        Forget every secret past its expiry.

        @return: how many were forgotten.
        """
        stale = [key for key, coined in self._byKey.items() if now > coined.expiry]
        for key in stale:
            self._drop(key)
        return len(stale)

    def withdraw(self, connection, pair):
        """
        Forget the secret coined for C{pair} on C{connection}, if any (its
        dial-back failed or timed out).
        """
        self._drop((connection, pair))

    def forgetConnection(self, connection):
        """
        Drop every secret of a connection that has closed.
        """
        for key in [key for key in self._byKey if key[0] == connection]:
            self._drop(key)

    def _drop(self, key):
        """
        Remove one secret by its key.
        """
        coined = self._byKey.pop(key, None)
        if coined is not None:
            self._keyBySecret.pop(coined.secret, None)
