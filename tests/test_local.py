"""
Tests for the C{local} backend (L{imxd.backend.local.backend}) and its
client API (L{imxd.backend.local.api}): two servers on an in-memory
federation, each hosting a local domain, driven over HTTP in memory.
"""

from __future__ import annotations

import json
import os
import tempfile

from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from imxd.backend.local import api as apimodule
from imxd.backend.local import backend as backendmodule
from imxd.backend.local import store as storemodule
from imxd.backend.local.api import ClientAPI
from imxd.backend.local.backend import LocalBackend, validateOptions
from imxd.backend.local.store import AccountStore
from imxd import outbox as outboxmodule
from imxd.testing import BackendContractMixin
from imxd.wire import Message
from tests.network import Network

PASSWORD = "correct horse"


def fastHashes(case):
    """
    Make scrypt cheap for the test (the parameters travel in the hash).
    """
    case.patch(storemodule, "SCRYPT_N", 2**4)


class LocalContractTests(BackendContractMixin, SynchronousTestCase):
    """
    The local adapter passes the backend contract.
    """

    def makeBackend(self):
        fastHashes(self)
        store = AccountStore(":memory:")
        store.addUser(self.user(), PASSWORD)
        return LocalBackend(self.domainName, store)

    def test_resumesWantedSubscriptions(self):
        """
        At start the subscriptions users want are requested again (denied
        ones are not).
        """
        store = self.backend.store
        store.addUser(f"other@{self.domainName}", PASSWORD)
        store.setContact(self.user(), "x@remote.test", "granted")
        store.setContact(f"other@{self.domainName}", "y@remote.test", "denied")
        self.service.clock.advance(0)
        self.assertIn(("subscribe", (self.user(), "x@remote.test")), self.service.calls)
        self.assertNotIn(
            ("subscribe", (f"other@{self.domainName}", "y@remote.test")), self.service.calls
        )


class OptionsTests(SynchronousTestCase):
    """
    The local backend's options.
    """

    def test_defaults(self):
        options = validateOptions({"database": "db.sqlite"}, "/srv")
        self.assertEqual(options["database"], "/srv/db.sqlite")
        self.assertEqual(options["listen"], backendmodule.DEFAULT_LISTEN)
        self.assertEqual(options["sessionLifetime"], 86400.0)

    def test_refused(self):
        for options, words in [
            ({}, "database"),
            ({"database": "x", "colour": 1}, "unknown option 'colour'"),
            ({"database": "x", "listen": "nonsense:1"}, "listen: bad endpoint"),
            ({"database": "x", "session_lifetime": 1}, "session_lifetime"),
            ({"database": "x", "offline_lifetime": "long"}, "offline_lifetime"),
        ]:
            with self.assertRaises(ValueError) as caught:
                validateOptions(options, "/srv")
            self.assertIn(words, str(caught.exception))


class Client:
    """
    One user's client of the API, in memory.
    """

    def __init__(self, case, stub, address):
        self.case = case
        self.stub = stub
        self.address = address
        self.token = None
        self.events = []
        self.streams = []

    def call(self, method, path, body=None, raw=None, token=True, headers=None):
        """
        @return: C{(status, decoded JSON or None, response)}.
        """
        headers = dict(headers or {})
        if token and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None:
            headers["Content-Type"] = "application/json"
        answer = self.stub.request(method, f"http://api.test/v1/{path}", data=data, headers=headers)
        self.case.settle()
        response = self.case.successResultOf(answer)
        content = self.case.successResultOf(response.content())
        return response.code, (json.loads(content) if content else None), response

    def login(self, password=PASSWORD):
        status, body, _ = self.call(
            "POST", "sessions", {"address": self.address, "password": password}, token=False
        )
        if status == 201:
            self.token = body["token"]
        return status, body

    def listen(self, lastEventId=None):
        """
        Open an event stream; parsed events are appended to C{events}.
        """
        headers = {"Authorization": f"Bearer {self.token}"}
        if lastEventId is not None:
            headers["Last-Event-ID"] = str(lastEventId)
        answer = self.stub.get("http://api.test/v1/events", headers=headers)
        self.case.settle()
        response = self.case.successResultOf(answer)
        self.case.assertEqual(response.code, 200)
        buffer = bytearray()

        def received(data):
            buffer.extend(data)
            while b"\n\n" in buffer:
                block, _, rest = bytes(buffer).partition(b"\n\n")
                buffer[:] = rest
                fields = {}
                for line in block.decode().split("\n"):
                    name, _, value = line.partition(": ")
                    fields[name] = value
                if "event" in fields:
                    self.events.append(
                        (fields["event"], json.loads(fields["data"]), fields.get("id"))
                    )

        from treq import collect

        done = collect(response, received)
        self.streams.append((response, done))
        return response

    def named(self, name):
        return [data for event, data, _ in self.events if event == name]


class LocalFederationTests(SynchronousTestCase):
    """
    alpha.test on one server, beta.test on another, both local backends,
    each with its client API.
    """

    def setUp(self):
        fastHashes(self)
        self.network = Network()
        self.directory = tempfile.mkdtemp()
        self.addCleanup(lambda: __import__("shutil").rmtree(self.directory))
        self.alpha = self.network.server("10.0.0.1", [self.table("alpha.test")])
        self.beta = self.network.server(
            "10.0.0.2",
            [self.table("beta.test", accepted_types=["text/plain"], max_message_size=2048)],
        )
        self.stubs = {}
        for server, name in ((self.alpha, "alpha.test"), (self.beta, "beta.test")):
            backend = server.aggregator.domain(name).backend
            self.addCleanup(server.aggregator.stopService)
            api = ClientAPI({name: backend}, self.network.clock)
            self.stubs[name] = StubTreq(api)
            for user in ("alice", "bob", "carol"):
                backend.store.addUser(f"{user}@{name}", PASSWORD, alias=user.title())

    def settle(self):
        """
        Move bytes on the federation and on every HTTP connection until
        none moves.
        """
        for _ in range(20):
            self.network.flush()
            for stub in self.stubs.values():
                stub.flush()
        self.network.flush()

    def table(self, name, **extra):
        path = os.path.join(self.directory, f"{name}.sqlite")
        return {
            "name": name,
            "backend": "local",
            "backend_options": {"database": path, "listen": "tcp:0"},
            **extra,
        }

    def client(self, address, login=True):
        client = Client(self, self.stubs[address.rpartition("@")[2].lower()], address)
        if login:
            self.assertEqual(client.login()[0], 201)
        return client

    def backend(self, domain):
        server = self.alpha if domain == "alpha.test" else self.beta
        return server.aggregator.domain(domain).backend

    # -- sessions -------------------------------------------------------------------

    def test_login(self):
        """
        A right password opens a session; a wrong one and an unknown user
        get the same 401; calls without a token get 401.
        """
        alice = self.client("alice@alpha.test", login=False)
        self.assertEqual(alice.login("wrong")[0], 401)
        stranger = self.client("nobody@alpha.test", login=False)
        status, body = stranger.login()
        self.assertEqual((status, body["error"]), (401, "unauthorized"))
        self.assertEqual(alice.call("GET", "settings")[0], 401)
        status, body = alice.login()
        self.assertEqual((status, body["address"]), (201, "alice@alpha.test"))
        self.assertEqual(alice.call("GET", "settings")[:2], (200, {"only_granted": False, "alias": "Alice"}))

    def test_sessionExpiresAndLogout(self):
        """
        A token stops working after the session lifetime, or at logout.
        """
        alice = self.client("alice@alpha.test")
        self.network.clock.advance(86401)
        self.assertEqual(alice.call("GET", "settings")[0], 401)
        alice.login()
        self.assertEqual(alice.call("DELETE", "sessions")[0], 204)
        self.assertEqual(alice.call("GET", "settings")[0], 401)

    def test_loginThrottledPerAccount(self):
        """
        After 5 failed logins for one account, the next gets 429 with
        Retry-After, even with the right password, until the window passes.
        """
        alice = self.client("alice@alpha.test", login=False)
        for _ in range(apimodule.MAX_FAILURES_PER_ACCOUNT):
            self.assertEqual(alice.login("wrong")[0], 401)
        status, body, response = alice.call(
            "POST", "sessions", {"address": alice.address, "password": PASSWORD}, token=False
        )
        self.assertEqual((status, body["error"]), (429, "too-many-requests"))
        self.assertGreater(int(response.headers.getRawHeaders("Retry-After")[0]), 0)
        self.assertEqual(self.client("bob@alpha.test", login=False).login()[0], 201)
        self.network.clock.advance(apimodule.THROTTLE_WINDOW + 1)
        self.assertEqual(alice.login()[0], 201)

    def test_sessionsCapped(self):
        """
        Beyond the cap of live sessions, logins get 503 until some expire.
        """
        self.patch(apimodule, "MAX_SESSIONS", 2)
        for _ in range(2):
            self.client("alice@alpha.test")
        status, body = self.client("bob@alpha.test", login=False).login()
        self.assertEqual((status, body["error"]), (503, "resource-limit"))
        self.network.clock.advance(86401)
        self.assertEqual(self.client("bob@alpha.test", login=False).login()[0], 201)

    def test_throttleKeyedOnTheCanonicalAddress(self):
        """
        Spelling the address another way does not give more tries.
        """
        for spelling in ("ALICE@alpha.test", "alice@ALPHA.test", "Alice@Alpha.Test",
                         "alice@alpha.test", "aLiCe@alpha.test"):
            self.client(spelling, login=False).login("wrong")
        self.assertEqual(self.client("alice@alpha.test", login=False).login()[0], 429)

    def test_sessionsCappedPerUser(self):
        """
        A new login beyond the per-user cap ends that user's oldest
        session, and no one else's.
        """
        self.patch(apimodule, "MAX_SESSIONS_PER_USER", 2)
        bob = self.client("bob@alpha.test")
        first, second, third = (self.client("alice@alpha.test") for _ in range(3))
        self.assertEqual(first.call("GET", "settings")[0], 401)
        for client in (second, third, bob):
            self.assertEqual(client.call("GET", "settings")[0], 200)

    def test_oversizeRequestDropped(self):
        """
        A request announcing (or sending) more than MAX_REQUEST octets is
        dropped before its body is stored.
        """
        from twisted.internet.testing import StringTransport
        from twisted.web import server

        site = server.Site(ClientAPI({}, self.network.clock))
        site.requestFactory = apimodule.BoundedRequest
        for head in (
            b"Content-Length: 100000000000\r\n\r\n",
            b"Transfer-Encoding: chunked\r\n\r\n" + b"100000\r\n" + b"x" * 0x100000 + b"\r\n"
            + b"100000\r\n" + b"x" * 0x100000 + b"\r\n",
        ):
            protocol = site.buildProtocol(None)
            transport = StringTransport()
            protocol.makeConnection(transport)
            protocol.dataReceived(b"POST /v1/sessions HTTP/1.1\r\nHost: api.test\r\n" + head)
            self.assertTrue(transport.disconnecting)
            protocol.connectionLost(None)

    def test_pendingRequestsCapped(self):
        """
        A user has at most MAX_PENDING_REQUESTS requests waiting; more are
        refused with resource-limit.
        """
        self.patch(backendmodule, "MAX_PENDING_REQUESTS", 2)
        backend = self.backend("beta.test")
        for n in range(2):
            self.assertEqual(
                self.successResultOf(backend.decideSubscription(f"s{n}@alpha.test", "bob@beta.test")),
                "pending",
            )
        failure = self.failureResultOf(backend.decideSubscription("s9@alpha.test", "bob@beta.test"))
        self.assertEqual(failure.value.token, "resource-limit")
        self.assertEqual(
            self.successResultOf(backend.decideSubscription("s0@alpha.test", "bob@beta.test")),
            "pending",
        )

    def test_loginThrottledPerAddress(self):
        """
        After 20 failed logins from one client address (over many
        accounts), that address is refused for every account.
        """
        for n in range(apimodule.MAX_FAILURES_PER_ADDRESS):
            self.client(f"guess{n}@alpha.test", login=False).login("wrong")
        self.assertEqual(self.client("bob@alpha.test", login=False).login()[0], 429)

    def test_badRequests(self):
        """
        Bad JSON, missing fields, unknown paths and methods get their 4xx
        and a JSON error body.
        """
        alice = self.client("alice@alpha.test")
        for method, path, raw, status, code in [
            ("POST", "messages", b"not json", 400, "bad-request"),
            ("POST", "messages", b"[1]", 400, "bad-request"),
            ("POST", "messages", b'{"to": "bob@beta.test"}', 400, "bad-request"),
            ("POST", "messages", b'{"to": "not an address", "body": "x"}', 400, "malformed"),
            ("GET", "nowhere", None, 404, "not-found"),
            ("DELETE", "messages", None, 405, "method-not-allowed"),
            ("PUT", "presence", b'{"state": "asleep"}', 400, "malformed"),
            ("PUT", "presence", b'{"state": "away", "status": "a\\u0000b"}', 400, "bad-request"),
            ("PUT", "presence", b'{"state": "away", "status": "\\ud800"}', 400, "bad-request"),
            ("POST", "subscribers/bob@beta.test", b'{"decision": "maybe"}', 400, "bad-request"),
            ("POST", "sessions", json.dumps({"address": "a" * 400, "password": "x"}).encode(),
             400, "bad-request"),
        ]:
            got, body, _ = alice.call(method, path, raw=raw)
            self.assertEqual((got, body["error"]), (status, code), (method, path, raw))
            self.assertTrue(body["message"])

    # -- messages -----------------------------------------------------------------

    def test_messageAcrossTheFederation(self):
        """
        A message from alice@alpha.test reaches bob@beta.test's stream with
        its id, text byte for byte (a very long line), X- headers and the
        sender's alias sent unsolicited.
        """
        alice = self.client("alice@alpha.test")
        bob = self.client("bob@beta.test")
        bob.listen()
        text = "x" * 1500 + " end"
        status, body, _ = alice.call(
            "POST", "messages", {"to": "bob@beta.test", "body": text, "headers": {"X-Thread": "café 7"}}
        )
        self.assertEqual(status, 202)
        self.settle()
        [message] = bob.named("message")
        self.assertEqual(message["id"], body["id"])
        self.assertEqual((message["from"], message["to"]), ("alice@alpha.test", "bob@beta.test"))
        self.assertEqual((message["type"], message["body"]), ("text/plain", text))
        self.assertEqual(message["headers"], {"X-Thread": "café 7"})
        self.assertEqual(message["attributes"], {"alias": "Alice"})

    def test_htmlLiteSanitisedBothWays(self):
        """
        html-lite is sanitised where it enters (the API) and again where it
        leaves to a client, whatever another server sent.
        """
        bob = self.client("bob@beta.test")
        alice = self.client("alice@alpha.test")
        alice.listen()
        bob.call("POST", "messages", {"to": "alice@alpha.test", "type": "text/html-lite",
                                      "body": '<b>hi</b><script>x()</script><img src=y>'})
        self.settle()
        [message] = alice.named("message")
        self.assertEqual((message["type"], message["body"]), ("text/html-lite", "<b>hi</b>"))
        raw = Message(
            sender="bob@beta.test", recipient="alice@alpha.test", messageId="raw-1",
            contentType="text/html-lite; charset=utf-8",
            body=b"From: bob@beta.test\r\nTo: alice@alpha.test\r\n"
            b"Content-Type: text/html-lite\r\n\r\n<i onclick=x()>hey</i>",
        )
        self.successResultOf(self.backend("alpha.test").deliverMessage(raw))
        self.settle()
        self.assertEqual(alice.named("message")[1]["body"], "<i>hey</i>")

    def test_bodyTypeMustMatchTheEnvelope(self):
        """
        A body whose own Content-Type differs from the envelope's (html
        declared as plain text) is refused, never shown unsanitised.
        """
        raw = Message(
            sender="bob@beta.test", recipient="alice@alpha.test", messageId="raw-2",
            contentType="text/plain; charset=utf-8",
            body=b"From: bob@beta.test\r\nTo: alice@alpha.test\r\n"
            b"Content-Type: text/html\r\n\r\n<script>x()</script>",
        )
        failure = self.failureResultOf(self.backend("alpha.test").deliverMessage(raw))
        self.assertEqual(failure.value.token, "media-type-refused")

    def test_refusedAtTheEdge(self):
        """
        Another media type gets 415 and a body over the domain's maximum
        gets 413 before anything is sent.
        """
        bob = self.client("bob@beta.test")
        status, body, _ = bob.call(
            "POST", "messages", {"to": "alice@alpha.test", "body": "x", "type": "image/png"}
        )
        self.assertEqual((status, body["error"]), (415, "media-type-refused"))
        status, body, _ = bob.call("POST", "messages", {"to": "alice@alpha.test", "body": "x" * 3000})
        self.assertEqual((status, body["error"]), (413, "message-too-large"))

    def test_refusedByTheReceivingServer(self):
        """
        What the other server refuses comes back as a delivery-failure
        event with the IMX error: a type beta.test does not accept, a body
        over its maximum, an unknown user.
        """
        alice = self.client("alice@alpha.test")
        alice.listen()
        sent = [
            alice.call("POST", "messages", body)[1]["id"]
            for body in (
                {"to": "bob@beta.test", "body": "<b>x</b>", "type": "text/html-lite"},
                {"to": "bob@beta.test", "body": "x" * 3000},
                {"to": "nobody@beta.test", "body": "x"},
            )
        ]
        self.settle()
        failures = alice.named("delivery-failure")
        self.assertEqual(
            [(f["id"], f["error"]) for f in failures],
            list(zip(sent, ["media-type-refused", "message-too-large", "unknown-user"])),
        )

    def test_blocks(self):
        """
        A blocked address, or a blocked whole domain, is refused with
        blocked; the sender hears of it.  Unblocking lets messages in.
        """
        alice = self.client("alice@alpha.test")
        carol = self.client("carol@alpha.test")
        bob = self.client("bob@beta.test")
        bob.listen()
        alice.listen()
        carol.listen()
        self.assertEqual(bob.call("PUT", "blocks/alice@alpha.test")[0], 204)
        alice.call("POST", "messages", {"to": "bob@beta.test", "body": "1"})
        carol.call("POST", "messages", {"to": "bob@beta.test", "body": "2"})
        bob.call("PUT", "blocks/alpha.test")
        carol.call("POST", "messages", {"to": "bob@beta.test", "body": "3"})
        self.settle()
        self.assertEqual([m["body"] for m in bob.named("message")], ["2"])
        self.assertEqual([f["error"] for f in alice.named("delivery-failure")], ["blocked"])
        self.assertEqual([f["error"] for f in carol.named("delivery-failure")], ["blocked"])
        self.assertEqual(bob.call("GET", "blocks")[1], {"blocks": ["alice@alpha.test", "alpha.test"]})
        self.assertEqual(bob.call("PUT", "blocks/not a domain")[0], 400)
        bob.call("DELETE", "blocks/alpha.test")
        bob.call("DELETE", "blocks/alice@alpha.test")
        alice.call("POST", "messages", {"to": "bob@beta.test", "body": "4"})
        self.settle()
        self.assertEqual([m["body"] for m in bob.named("message")], ["2", "4"])

    def test_onlyGranted(self):
        """
        With only_granted, a user accepts messages only from addresses
        whose subscription they granted.
        """
        alice = self.client("alice@alpha.test")
        carol = self.client("carol@alpha.test")
        bob = self.client("bob@beta.test")
        for client in (alice, carol, bob):
            client.listen()
        bob.call("PUT", "settings", {"only_granted": True})
        alice.call("POST", "subscriptions", {"to": "bob@beta.test"})
        bob.call("POST", "subscribers/alice@alpha.test", {"decision": "grant"})
        alice.call("POST", "messages", {"to": "bob@beta.test", "body": "from a friend"})
        carol.call("POST", "messages", {"to": "bob@beta.test", "body": "from a stranger"})
        self.settle()
        self.assertEqual([m["body"] for m in bob.named("message")], ["from a friend"])
        [failure] = carol.named("delivery-failure")
        self.assertEqual(failure["error"], "blocked")
        self.assertIn("only from contacts", failure["message"])

    # -- presence and subscriptions ------------------------------------------------

    def test_subscribeGrantPresence(self):
        """
        alice subscribes to bob: pending, bob is asked, grants; alice gets
        the state and bob's current presence, then each change; the
        attributes she may see include his presence, carol's do not.
        """
        alice = self.client("alice@alpha.test")
        bob = self.client("bob@beta.test")
        carol = self.client("carol@alpha.test")
        alice.listen()
        bob.listen()
        bob.call("PUT", "presence", {"state": "busy", "status": "in a meeting"})
        status, body, _ = alice.call("POST", "subscriptions", {"to": "bob@beta.test"})
        self.assertEqual((status, body), (202, {"state": "pending"}))
        self.assertEqual(bob.named("subscription-request"), [{"from": "alice@alpha.test"}])
        self.assertEqual(bob.call("GET", "subscribers")[1], {"subscribers": {"alice@alpha.test": "pending"}})
        self.assertEqual(bob.call("POST", "subscribers/alice@alpha.test", {"decision": "grant"})[0], 204)
        self.settle()
        self.assertIn({"to": "bob@beta.test", "state": "granted"}, alice.named("subscription-state"))
        self.assertEqual(
            alice.named("presence"),
            [{"from": "bob@beta.test", "state": "busy", "status": "in a meeting",
              "attributes": {"alias": "Bob", "capabilities": backendmodule.CAPABILITIES}}],
        )
        bob.call("PUT", "presence", {"state": "online"})
        self.settle()
        self.assertEqual(alice.named("presence")[-1]["state"], "online")
        self.assertEqual(
            alice.named("presence")[-1]["attributes"],
            {"alias": "Bob", "capabilities": backendmodule.CAPABILITIES},
        )
        self.assertEqual(alice.call("GET", "subscriptions")[1], {"subscriptions": {"bob@beta.test": "granted"}})
        status, body, _ = alice.call("GET", "attributes/bob@beta.test")
        self.assertEqual((status, body["attributes"]["presence"]), (200, "online"))
        self.assertEqual(body["attributes"]["alias"], "Bob")
        hidden = carol.call("GET", "attributes/bob@beta.test")[1]["attributes"]
        self.assertNotIn("presence", hidden)
        self.assertEqual(hidden["alias"], "Bob")
        domain = alice.call("GET", "attributes/beta.test")[1]["attributes"]
        self.assertEqual(domain["accepted-types"], "text/plain")
        self.assertEqual(domain["subscription-timeout"], "1800")

    def test_denyAndUnsubscribe(self):
        """
        A denied request reaches the subscriber as denied; a granted one
        can be cancelled, after which no more presence arrives.
        """
        alice = self.client("alice@alpha.test")
        carol = self.client("carol@alpha.test")
        bob = self.client("bob@beta.test")
        alice.listen()
        carol.listen()
        alice.call("POST", "subscriptions", {"to": "bob@beta.test"})
        carol.call("POST", "subscriptions", {"to": "bob@beta.test"})
        bob.call("POST", "subscribers/alice@alpha.test", {"decision": "grant"})
        bob.call("POST", "subscribers/carol@alpha.test", {"decision": "deny"})
        self.settle()
        self.assertIn({"to": "bob@beta.test", "state": "denied"}, carol.named("subscription-state"))
        self.assertEqual(alice.call("DELETE", "subscriptions/bob@beta.test")[0], 204)
        before = len(alice.named("presence"))
        bob.call("PUT", "presence", {"state": "away"})
        self.settle()
        self.assertEqual(len(alice.named("presence")), before)
        self.assertEqual(alice.call("GET", "subscriptions")[1], {"subscriptions": {}})

    def test_rememberedDecision(self):
        """
        A decision made before the request answers it at once.
        """
        alice = self.client("alice@alpha.test")
        bob = self.client("bob@beta.test")
        bob.call("POST", "subscribers/alice@alpha.test", {"decision": "grant"})
        self.assertEqual(alice.call("POST", "subscriptions", {"to": "bob@beta.test"})[1], {"state": "granted"})
        self.assertEqual(alice.call("POST", "subscriptions", {"to": "bob@beta.test"})[1], {"state": "granted"})
        self.assertEqual(alice.call("GET", "subscriptions")[1], {"subscriptions": {"bob@beta.test": "granted"}})

    def test_subscribeUnknownUser(self):
        """
        A subscription to an address that does not exist is refused.
        """
        alice = self.client("alice@alpha.test")
        status, body, _ = alice.call("POST", "subscriptions", {"to": "nobody@beta.test"})
        self.assertEqual((status, body["error"]), (404, "unknown-user"))
        self.assertEqual(alice.call("GET", "subscriptions")[1], {"subscriptions": {}})

    def test_lastStreamClosingPublishesOffline(self):
        """
        When a user's last event stream closes, their subscribers see them
        offline.
        """
        alice = self.client("alice@alpha.test")
        bob = self.client("bob@beta.test")
        alice.listen()
        bob.call("POST", "subscribers/alice@alpha.test", {"decision": "grant"})
        alice.call("POST", "subscriptions", {"to": "bob@beta.test"})
        bob.listen()
        bob.call("PUT", "presence", {"state": "online"})
        self.settle()
        self.assertEqual(alice.named("presence")[-1]["state"], "online")
        backend = self.backend("beta.test")
        [stream] = backend._streams["bob@beta.test"]
        stream.close()
        self.settle()
        self.assertEqual(alice.named("presence")[-1]["state"], "offline")

    # -- kept events -------------------------------------------------------------------

    def test_keptUntilAStreamOpens(self):
        """
        Messages for a user with no stream are kept and replayed with their
        ids; Last-Event-ID forgets what the client read and replays the
        rest.  A stream also starts with the user's subscriptions and
        pending requests.
        """
        alice = self.client("alice@alpha.test")
        bob = self.client("bob@beta.test")
        for n in range(3):
            alice.call("POST", "messages", {"to": "bob@beta.test", "body": str(n)})
        alice.call("POST", "subscriptions", {"to": "bob@beta.test"})
        self.settle()
        bob.listen()
        self.assertEqual([m["body"] for m in bob.named("message")], ["0", "1", "2"])
        self.assertEqual(bob.named("subscription-request"), [{"from": "alice@alpha.test"}])
        ids = [eventId for event, _, eventId in bob.events if event == "message"]
        self.assertTrue(all(ids))
        again = self.client("bob@beta.test")
        again.listen(lastEventId=ids[0])
        self.assertEqual([m["body"] for m in again.named("message")], ["1", "2"])
        self.network.clock.advance(backendmodule.REPLAY_GRACE + backendmodule.HOUSEKEEPING_INTERVAL)
        late = self.client("bob@beta.test")
        late.listen()
        self.assertEqual(late.named("message"), [])
        for odd in ("\u00b2", "99999999999999999999999"):
            self.client("bob@beta.test").listen(lastEventId=odd)

    def test_capRefusesTemporarily(self):
        """
        With the cap of kept messages reached, more are refused with the
        temporary recipient-unavailable: the sending server keeps the
        message and tries again, and it arrives once the recipient has read
        the others.
        """
        self.patch(storemodule, "OFFLINE_CAP", 2)
        alice = self.client("alice@alpha.test")
        alice.listen()
        for n in range(3):
            alice.call("POST", "messages", {"to": "bob@beta.test", "body": str(n)})
        self.settle()
        self.assertEqual(alice.named("delivery-failure"), [])
        self.assertIn("depth=1", dict(self.alpha.status())["queue.beta.test"])
        bob = self.client("bob@beta.test")
        bob.listen()
        self.network.advance(outboxmodule.SWEEP_INTERVAL, step=5)
        self.settle()
        self.assertEqual([m["body"] for m in bob.named("message")], ["0", "1", "2"])
        self.assertEqual(alice.named("delivery-failure"), [])

    def test_expiredMessagesBounce(self):
        """
        A message kept past offline_lifetime is dropped and its sender gets
        a delivery-failure through a postmaster report; reports are never
        bounced in turn.
        """
        alice = self.client("alice@alpha.test")
        alice.call("POST", "messages", {"to": "bob@beta.test", "body": "are you there?"})
        self.settle()
        alice.listen()
        lifetime = self.backend("beta.test").offlineLifetime
        self.network.advance(lifetime + 2 * backendmodule.HOUSEKEEPING_INTERVAL, step=3600)
        self.settle()
        [failure] = alice.named("delivery-failure")
        self.assertEqual((failure["to"], failure["error"]), ("bob@beta.test", "recipient-unavailable"))
        self.assertEqual(alice.named("message"), [])
        bob = self.client("bob@beta.test")
        bob.listen()
        self.assertEqual(bob.named("message"), [])

    def test_rateLimited(self):
        """
        A user over the domain's account_rate gets 429 rate-limited with
        Retry-After, and the message is not sent.
        """
        alice = self.client("alice@alpha.test")
        for n in range(100):
            self.assertEqual(
                alice.call("POST", "messages", {"to": "bob@beta.test", "body": str(n)})[0], 202
            )
        status, body, response = alice.call("POST", "messages", {"to": "bob@beta.test", "body": "x"})
        self.assertEqual((status, body["error"]), (429, "rate-limited"))
        self.assertGreater(int(response.headers.getRawHeaders("Retry-After")[0]), 0)
        self.assertEqual(self.alpha.outbox.counters["delivered"] + self.alpha.outbox.depth, 100)

    def test_tooManyStreams(self):
        """
        A user may hold at most 8 streams open.
        """
        alice = self.client("alice@alpha.test")
        for _ in range(backendmodule.MAX_STREAMS_PER_USER):
            alice.listen()
        status, body, _ = alice.call("GET", "events")
        self.assertEqual((status, body["error"]), (429, "resource-limit"))
