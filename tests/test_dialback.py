"""
Tests for L{imxd.dialback}: tokens, secrets and the server secret file.
"""

import os
import stat

from twisted.trial.unittest import SynchronousTestCase

from imxd.dialback import (
    SECRET_SIZE,
    DialbackError,
    DialbackSecrets,
    DialbackTokens,
    TokenClaims,
    loadOrCreateSecret,
)

KEY = bytes(range(32))
NOW = 1_700_000_000

#: The known answer: checked once against `openssl dgst -sha256 -mac HMAC`.
KNOWN_TOKEN = bytes.fromhex(
    "01" "6553f13c" "0000000000000007" "05" "6e6f646531"
    "7469b9daa98e97dc25e991502bec33336c014e0c0d23a5f43d5eebfc136df868"
)


class TokenTests(SynchronousTestCase):
    """
    The originator's stateless tokens.
    """

    def setUp(self):
        self.tokens = DialbackTokens(KEY, "node1", lifetime=60)

    def test_knownAnswer(self):
        """
        A token is version, expiry, connection id, node, and an
        HMAC-SHA256 over the pair and those fields, byte for byte.
        """
        self.assertEqual(
            self.tokens.issue("b.example", "a.example", 7, NOW), KNOWN_TOKEN
        )

    def test_verify(self):
        """
        A fresh token verifies and names its connection and node.
        """
        self.assertEqual(
            self.tokens.verify(KNOWN_TOKEN, "b.example", "a.example", NOW + 60),
            TokenClaims("b.example", "a.example", 7, "node1", NOW + 60),
        )

    def test_anotherNodeSharingTheSecret(self):
        """
        Any node that holds the same secret verifies the token.
        """
        other = DialbackTokens(KEY, "node2")
        self.assertEqual(
            other.verify(KNOWN_TOKEN, "b.example", "a.example", NOW).node, "node1"
        )

    def test_expired(self):
        """
        A token past its expiry is refused.
        """
        error = self.assertRaises(
            DialbackError,
            self.tokens.verify,
            KNOWN_TOKEN,
            "b.example",
            "a.example",
            NOW + 61,
        )
        self.assertIn("expired", str(error))

    def test_otherPair(self):
        """
        A token for another domain pair (either direction, or another
        receiving domain) is refused.
        """
        for pair in [
            ("a.example", "b.example"),
            ("b.example", "c.example"),
            ("evil.example", "a.example"),
        ]:
            error = self.assertRaises(
                DialbackError, self.tokens.verify, KNOWN_TOKEN, *pair, NOW
            )
            self.assertIn("not issued by this service", str(error))

    def test_otherSecret(self):
        """
        A token signed with another server secret is refused.
        """
        other = DialbackTokens(b"x" * 32, "node1")
        self.assertRaises(
            DialbackError, other.verify, KNOWN_TOKEN, "b.example", "a.example", NOW
        )

    def test_tampered(self):
        """
        Changing any byte of a token (connection id, expiry, mac) makes it
        invalid, and a truncated or padded token is refused.
        """
        for index in range(len(KNOWN_TOKEN)):
            token = bytearray(KNOWN_TOKEN)
            token[index] ^= 0x01
            self.assertRaises(
                DialbackError,
                self.tokens.verify,
                bytes(token),
                "b.example",
                "a.example",
                NOW,
            )
        for token in (KNOWN_TOKEN[:-1], KNOWN_TOKEN + b"\x00", b"", b"\x01" * 10):
            self.assertRaises(
                DialbackError, self.tokens.verify, token, "b.example", "a.example", NOW
            )


class SecretTests(SynchronousTestCase):
    """
    The receiver's secrets: single use, one connection, one pair, short
    lived.
    """

    PAIR = ("b.example", "a.example")

    def setUp(self):
        self.secrets = DialbackSecrets(lifetime=15.0)

    def test_coinAndConsume(self):
        """
        A secret echoed on its connection for its pair in time is accepted,
        once.
        """
        secret = self.secrets.coin("conn1", self.PAIR, 100.0)
        self.assertEqual(len(secret), SECRET_SIZE)
        self.assertEqual(self.secrets.pending(), 1)
        self.secrets.consume(secret, "conn1", self.PAIR, 110.0)
        self.assertEqual(self.secrets.pending(), 0)
        error = self.assertRaises(
            DialbackError, self.secrets.consume, secret, "conn1", self.PAIR, 110.0
        )
        self.assertIn("no dial-back is pending", str(error))

    def test_randomAndDistinct(self):
        """
        Secrets come from the random source and differ each time.
        """
        coined = {self.secrets.coin(f"c{i}", self.PAIR, 0.0) for i in range(100)}
        self.assertEqual(len(coined), 100)

    def test_wrongConnection(self):
        """
        A secret echoed on another connection is refused, and burnt: not
        even its own connection can use it afterwards.
        """
        secret = self.secrets.coin("conn1", self.PAIR, 100.0)
        error = self.assertRaises(
            DialbackError, self.secrets.consume, secret, "conn2", self.PAIR, 100.0
        )
        self.assertIn("another connection", str(error))
        self.assertRaises(
            DialbackError, self.secrets.consume, secret, "conn1", self.PAIR, 100.0
        )

    def test_wrongPair(self):
        """
        A secret echoed for another domain pair is refused.
        """
        secret = self.secrets.coin("conn1", self.PAIR, 100.0)
        self.assertRaises(
            DialbackError,
            self.secrets.consume,
            secret,
            "conn1",
            ("c.example", "a.example"),
            100.0,
        )

    def test_expired(self):
        """
        A secret echoed after its lifetime is refused and consumed.
        """
        secret = self.secrets.coin("conn1", self.PAIR, 100.0)
        error = self.assertRaises(
            DialbackError, self.secrets.consume, secret, "conn1", self.PAIR, 115.5
        )
        self.assertIn("expired", str(error))
        self.assertEqual(self.secrets.pending(), 0)

    def test_wrongSecret(self):
        """
        A guessed secret is refused and the real one is burnt.
        """
        secret = self.secrets.coin("conn1", self.PAIR, 100.0)
        self.assertRaises(
            DialbackError,
            self.secrets.consume,
            bytes(SECRET_SIZE),
            "conn1",
            self.PAIR,
            100.0,
        )
        self.assertRaises(
            DialbackError, self.secrets.consume, secret, "conn1", self.PAIR, 100.0
        )

    def test_recoinReplaces(self):
        """
        Coining again for the same connection and pair invalidates the
        earlier secret.
        """
        first = self.secrets.coin("conn1", self.PAIR, 100.0)
        second = self.secrets.coin("conn1", self.PAIR, 101.0)
        self.assertEqual(self.secrets.pending(), 1)
        self.assertRaises(
            DialbackError, self.secrets.consume, first, "conn1", self.PAIR, 101.0
        )
        self.secrets.coin("conn1", self.PAIR, 102.0)
        self.assertRaises(
            DialbackError, self.secrets.consume, second, "conn1", self.PAIR, 102.0
        )

    def test_expireAndForget(self):
        """
        Expired secrets are purged; a closed connection's secrets go with
        it; counts are kept per connection.
        """
        self.secrets.coin("conn1", self.PAIR, 100.0)
        self.secrets.coin("conn1", ("c.example", "a.example"), 110.0)
        self.secrets.coin("conn2", self.PAIR, 110.0)
        self.assertEqual(self.secrets.pending("conn1"), 2)
        self.assertEqual(self.secrets.expire(120.0), 1)
        self.assertEqual(self.secrets.pending(), 2)
        self.secrets.forgetConnection("conn1")
        self.assertEqual(self.secrets.pending(), 1)
        self.assertEqual(self.secrets.pending("conn2"), 1)


class SecretFileTests(SynchronousTestCase):
    """
    The server secret file.
    """

    def setUp(self):
        self.base = self.mktemp()
        os.makedirs(self.base)
        self.path = os.path.join(self.base, "dialback.secret")

    def test_createdOnce(self):
        """
        The file is created with mode 0600 on first use and read back the
        same afterwards.
        """
        secret = loadOrCreateSecret(self.path, randomBytes=lambda n: b"\x07" * n)
        self.assertEqual(secret, b"\x07" * 32)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(loadOrCreateSecret(self.path), secret)

    def test_groupReadable(self):
        """
        A secret file that others can read is refused with the fix.
        """
        loadOrCreateSecret(self.path)
        os.chmod(self.path, 0o644)
        error = self.assertRaises(DialbackError, loadOrCreateSecret, self.path)
        self.assertIn("chmod 600", str(error))

    def test_malformed(self):
        """
        A file that is not hex, or too short, is refused.
        """
        for text in ("not hex", "abcd"):
            with open(self.path, "w") as f:
                f.write(text)
            os.chmod(self.path, 0o600)
            self.assertRaises(DialbackError, loadOrCreateSecret, self.path)

    def test_cannotCreate(self):
        """
        A directory that does not exist is reported.
        """
        error = self.assertRaises(
            DialbackError,
            loadOrCreateSecret,
            os.path.join(self.base, "absent", "secret"),
        )
        self.assertIn("cannot create", str(error))
