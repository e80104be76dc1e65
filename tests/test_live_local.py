"""
Integration tests: two real imxd processes on loopback, each serving local
domains through the client API, federating through a real DNS server.

P (p.test) on 127.0.0.31; Q (q.test, and r.test, which accepts only
text/plain of at most 2048 octets) on 127.0.0.32.  Users are driven over
HTTP (L{tests.live.APIClient}).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import unittest

from tests.live import APIClient, DNSServer, Server

PASSWORD = "live password"


class LiveLocalTests(unittest.TestCase):
    """
    Every item of the IM semantics across the federation, and its
    refusals, over the client API of two servers.
    """

    @classmethod
    def setUpClass(cls):
        cls.base = tempfile.mkdtemp(prefix="imxd-live-local-")
        cls.dns = DNSServer(cls.base)
        cls.p = Server(cls.base, "P", "127.0.0.31", ["p.test"], backend="local")
        cls.q = Server(
            cls.base, "Q", "127.0.0.32", ["q.test", "r.test"], backend="local",
            domainOptions={"r.test": ['accepted_types = ["text/plain"]', "max_message_size = 2048"]},
        )
        try:
            cls.dns.serve(cls.p, "p.test")
            cls.dns.serve(cls.q, "q.test")
            cls.dns.serve(cls.q, "r.test")
            cls.dns.start()
            for server, domain in ((cls.p, "p.test"), (cls.q, "q.test"), (cls.q, "r.test")):
                for user in ("ann", "bob", "cy", "dee"):
                    server.addUser(f"{user}@{domain}", PASSWORD, alias=user.title())
            for server in (cls.p, cls.q):
                server.start(cls.dns.port)
            for server in (cls.p, cls.q):
                server.waitListening()
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        for server in (cls.p, cls.q):
            server.stop()
        cls.dns.stop()
        shutil.rmtree(cls.base, ignore_errors=True)

    def user(self, address, listen=True):
        server = self.p if address.endswith("@p.test") else self.q
        client = APIClient(server, address, PASSWORD)
        self.addCleanup(client.close)
        if listen:
            client.listen()
        return client

    def test_messagesBothWays(self):
        """
        Plain and html-lite messages cross in both directions, intact and
        sanitised, with the sender's alias.
        """
        ann = self.user("ann@p.test")
        bob = self.user("bob@q.test")
        status, sent = ann.call("POST", "messages", {"to": "bob@q.test", "body": "hello bob " + "y" * 2000})
        self.assertEqual(status, 202)
        message = bob.waitEvent("message", lambda m: m["id"] == sent["id"])
        self.assertEqual(message["body"], "hello bob " + "y" * 2000)
        self.assertEqual(message["attributes"], {"alias": "Ann"})
        bob.call("POST", "messages", {"to": "ann@p.test", "type": "text/html-lite",
                                      "body": "<p>hi <b>ann</b><script>evil()</script></p>"})
        reply = ann.waitEvent("message", lambda m: m["from"] == "bob@q.test")
        self.assertEqual((reply["type"], reply["body"]), ("text/html-lite", "<p>hi <b>ann</b></p>"))

    def test_subscriptionGrantPresence(self):
        """
        cy@p.test subscribes to dee@q.test; dee is asked and grants; cy
        gets the state and dee's presence, then its changes; the
        attributes cy may see include presence, ann's do not.
        """
        cy = self.user("cy@p.test")
        dee = self.user("dee@q.test")
        self.assertEqual(cy.call("POST", "subscriptions", {"to": "dee@q.test"}), (202, {"state": "pending"}))
        dee.waitEvent("subscription-request", lambda d: d["from"] == "cy@p.test")
        self.assertEqual(dee.call("POST", "subscribers/cy@p.test", {"decision": "grant"})[0], 204)
        cy.waitEvent("subscription-state", lambda d: d == {"to": "dee@q.test", "state": "granted"})
        cy.waitEvent("presence", lambda d: d["from"] == "dee@q.test" and d["state"] == "offline")
        dee.call("PUT", "presence", {"state": "away", "status": "lunch"})
        cy.waitEvent("presence", lambda d: d["state"] == "away" and d["status"] == "lunch")
        status, body = cy.call("GET", "attributes/dee@q.test")
        self.assertEqual((status, body["attributes"]["presence"]), (200, "away"))
        ann = self.user("ann@p.test", listen=False)
        self.assertNotIn("presence", ann.call("GET", "attributes/dee@q.test")[1]["attributes"])
        domain = ann.call("GET", "attributes/r.test")[1]["attributes"]
        self.assertEqual((domain["accepted-types"], domain["max-message-size"]), ("text/plain", "2048"))

    def test_deniedSubscription(self):
        """
        A denied request reaches the subscriber as denied.
        """
        bob = self.user("bob@p.test")
        ann = self.user("ann@r.test")
        bob.call("POST", "subscriptions", {"to": "ann@r.test"})
        ann.waitEvent("subscription-request", lambda d: d["from"] == "bob@p.test")
        ann.call("POST", "subscribers/bob@p.test", {"decision": "deny"})
        bob.waitEvent("subscription-state", lambda d: d == {"to": "ann@r.test", "state": "denied"})

    def test_refusals(self):
        """
        A blocked sender, a type and a size the receiving domain does not
        accept, and an unknown user each come back to the sender as a
        delivery-failure with the IMX error; what the sender's own server
        refuses is answered at once.
        """
        dee = self.user("dee@p.test")
        cy = self.user("cy@r.test")
        self.assertEqual(cy.call("PUT", "blocks/dee@p.test")[0], 204)
        ids = {}
        for error, body in [
            ("blocked", {"to": "cy@r.test", "body": "let me in"}),
            ("media-type-refused", {"to": "bob@r.test", "body": "<b>x</b>", "type": "text/html-lite"}),
            ("message-too-large", {"to": "bob@r.test", "body": "z" * 3000}),
            ("unknown-user", {"to": "nobody@r.test", "body": "x"}),
        ]:
            status, sent = dee.call("POST", "messages", body)
            self.assertEqual(status, 202)
            ids[sent["id"]] = error
        for messageId, error in ids.items():
            failure = dee.waitEvent("delivery-failure", lambda f, i=messageId: f["id"] == i)
            self.assertEqual(failure["error"], error)
        self.assertEqual(cy.named("message"), [])
        status, body = dee.call("POST", "messages", {"to": "cy@r.test", "body": "x", "type": "image/png"})
        self.assertEqual((status, body["error"]), (415, "media-type-refused"))

    def test_keptWhileOffline(self):
        """
        A message for a user with no open stream is kept and arrives when
        the user's client connects.
        """
        ann = self.user("ann@q.test", listen=False)
        bob = self.user("bob@p.test", listen=False)
        status, sent = bob.call("POST", "messages", {"to": "ann@q.test", "body": "while you were out"})
        self.assertEqual(status, 202)
        ann.listen()
        message = ann.waitEvent("message", lambda m: m["id"] == sent["id"])
        self.assertEqual(message["body"], "while you were out")


class LiveClientTLSTests(unittest.TestCase):
    """
    The client API served over HTTPS (an C{ssl:} endpoint) with a
    certificate from a test CA.
    """

    def setUp(self):
        import ssl

        import trustme

        self.base = tempfile.mkdtemp(prefix="imxd-live-tls-")
        self.addCleanup(shutil.rmtree, self.base, True)
        ca = trustme.CA()
        issued = ca.issue_cert("127.0.0.33")
        certificate = os.path.join(self.base, "api.pem")
        key = os.path.join(self.base, "api.key")
        issued.cert_chain_pems[0].write_to_path(certificate)
        issued.private_key_pem.write_to_path(key)
        self.server = Server(self.base, "T", "127.0.0.33", ["t.test"], backend="local",
                             apiTLS=(certificate, key))
        self.server.addUser("ann@t.test", PASSWORD)
        self.server.addUser("bob@t.test", PASSWORD)
        self.server.start(53)
        self.addCleanup(self.server.stop)
        self.server.waitListening()
        self.context = ssl.create_default_context()
        ca.configure_trust(self.context)

    def test_https(self):
        """
        Login, a message and its event all travel over TLS; a client that
        does not trust the certificate cannot connect.
        """
        import ssl

        ann = APIClient(self.server, "ann@t.test", PASSWORD, context=self.context)
        bob = APIClient(self.server, "bob@t.test", PASSWORD, context=self.context)
        self.addCleanup(bob.close)
        bob.listen()
        self.assertEqual(ann.call("POST", "messages", {"to": "bob@t.test", "body": "secure"})[0], 202)
        self.assertEqual(bob.waitEvent("message")["body"], "secure")
        with self.assertRaises(ssl.SSLError):
            APIClient(self.server, "ann@t.test", PASSWORD, context=ssl.create_default_context())
