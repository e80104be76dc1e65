"""
The local backend's HTTP client API (C{docs/client-api.md}): JSON in and
out, bearer-token sessions, throttled logins and a C{text/event-stream} of
events.  One L{ClientAPI} serves every hosted domain whose local backend
names the same listen address.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets

from twisted.application import service
from twisted.internet.endpoints import serverFromString
from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.web import resource, server

from imxd.backend.local.backend import canonical
from imxd.listener import ListenerService
from imxd.backend.local.store import AccountError, dummyHash, checkPassword
from imxd.peer import Refused

#: Largest request body accepted, octets.
MAX_REQUEST = 1024 * 1024

#: Failed logins allowed in L{THROTTLE_WINDOW} per account, per address.
MAX_FAILURES_PER_ACCOUNT = 5
MAX_FAILURES_PER_ADDRESS = 20
THROTTLE_WINDOW = 900.0

#: Seconds between keepalive comments on event streams.
KEEPALIVE_INTERVAL = 15.0

#: Longest address and password a login may give.
MAX_ADDRESS = 320
MAX_PASSWORD = 1024

#: Live sessions kept at most; logins beyond get 503.
MAX_SESSIONS = 100000

#: Live sessions of one user; a new login ends the oldest beyond this.
MAX_SESSIONS_PER_USER = 32

#: Longest presence status text.
MAX_STATUS = 200

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

#: What the events handler answers: the response stays open.
STREAMING = object()

#: HTTP status for each IMX error token refused at the edge.
_STATUS = {
    "malformed": 400,
    "invalid-utf8": 400,
    "blocked": 403,
    "sender-mismatch": 403,
    "subscription-denied": 403,
    "relay-denied": 403,
    "unknown-user": 404,
    "unknown-domain": 404,
    "not-subscribed": 409,
    "message-too-large": 413,
    "media-type-refused": 415,
    "rate-limited": 429,
    "resource-limit": 429,
}


class APIError(Exception):
    """
    A request the API refuses: an HTTP status, an error code and a text.
    """

    def __init__(self, status, code, message, retryAfter=None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retryAfter = retryAfter

    @classmethod
    def fromRefused(cls, refused):
        """
        @return: the L{APIError} for an IMX refusal.
        """
        if refused.token in _STATUS:
            status = _STATUS[refused.token]
        else:
            status = 503 if refused.temporary else 502
        return cls(status, refused.token, refused.text or refused.token, refused.retryAfter)


class Sessions:
    """
    Bearer tokens: only their SHA-256 is kept, with the address and expiry.
    """

    def __init__(self, clock):
        self.clock = clock
        self._tokens: dict[str, tuple[str, float]] = {}
        self._byUser: dict[str, list[str]] = {}

    @staticmethod
    def _key(token):
        return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()

    def create(self, address, lifetime):
        """
        @return: a new token for C{address}, good for C{lifetime} seconds.
        @raise APIError: 503 when L{MAX_SESSIONS} are live.
        """
        now = self.clock.seconds()
        if len(self._tokens) >= MAX_SESSIONS:
            self._tokens = {k: v for k, v in self._tokens.items() if v[1] > now}
            self._byUser = {}
            for k, (owner, _) in self._tokens.items():
                self._byUser.setdefault(owner, []).append(k)
            if len(self._tokens) >= MAX_SESSIONS:
                raise APIError(503, "resource-limit", "too many sessions are open; try later")
        token = secrets.token_urlsafe(32)
        key = self._key(token)
        self._tokens[key] = (address, now + lifetime)
        mine = [k for k in self._byUser.get(address, []) if k in self._tokens]
        mine.append(key)
        while len(mine) > MAX_SESSIONS_PER_USER:
            self._tokens.pop(mine.pop(0), None)
        self._byUser[address] = mine
        return token

    def lookup(self, token):
        """
        @return: the address of a live session, or L{None}.
        """
        entry = self._tokens.get(self._key(token))
        if entry is None:
            return None
        if entry[1] <= self.clock.seconds():
            del self._tokens[self._key(token)]
            return None
        return entry[0]

    def revoke(self, token):
        """
        End a session.
        """
        self._tokens.pop(self._key(token), None)


class LoginThrottle:
    """
    Failed logins per account and per client address in a sliding window.
    """

    def __init__(self, clock):
        self.clock = clock
        self._failures: dict[tuple[str, str], list[float]] = {}

    def _recent(self, key):
        horizon = self.clock.seconds() - THROTTLE_WINDOW
        times = [t for t in self._failures.get(key, ()) if t > horizon]
        if times:
            self._failures[key] = times
        else:
            self._failures.pop(key, None)
        return times

    def retryAfter(self, account, address):
        """
        @return: seconds until a login may be tried again, or 0.
        """
        wait = 0.0
        for key, limit in (
            (("account", account), MAX_FAILURES_PER_ACCOUNT),
            (("address", address), MAX_FAILURES_PER_ADDRESS),
        ):
            times = self._recent(key)
            if len(times) >= limit:
                wait = max(wait, times[-limit] + THROTTLE_WINDOW - self.clock.seconds())
        return wait

    def failed(self, account, address):
        """
        Count a failed login.
        """
        if len(self._failures) > 100000:
            for key in list(self._failures):
                self._recent(key)
        for key in (("account", account), ("address", address)):
            self._failures.setdefault(key, []).append(self.clock.seconds())

    def succeeded(self, account, address):
        """
        A login succeeded: the account's failures are forgotten, and the
        attempt is not counted against the client address.
        """
        self._failures.pop(("account", account), None)
        times = self._failures.get(("address", address))
        if times:
            times.pop()


class EventStream:
    """
    One open C{GET /v1/events} response.
    """

    def __init__(self, request):
        self.request = request
        self.open = True

    def send(self, name, data, eventId=None):
        """
        Write one event.
        """
        if not self.open:
            return
        lines = [f"event: {name}"]
        if eventId is not None:
            lines.append(f"id: {eventId}")
        lines.append("data: " + json.dumps(data, separators=(",", ":")))
        self.request.write(("\n".join(lines) + "\n\n").encode("utf-8"))

    def comment(self, text):
        """
        Write a comment line (keepalive).
        """
        if self.open:
            self.request.write(f": {text}\n\n".encode("ascii"))

    def close(self):
        """
        End the response.
        """
        if self.open:
            self.open = False
            self.request.finish()


def _header(request, name):
    """
    @return: a request header as text (empty when absent).
    """
    return (request.getHeader(name) or b"").decode("latin-1")


def _field(body, name, kind, required=True):
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise APIError(400, "bad-request", f"{name}: required, {kind.__name__}")
    return value


class ClientAPI(resource.Resource):
    """
    The API's root resource: every path under C{/v1/}.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, backends, clock, runInThread=None):
        """
        @param backends: C{{domain: LocalBackend}} served by this listener.
        @param clock: an C{IReactorTime}.
        @param runInThread: C{f(function, *args) -> Deferred}, to check
            passwords off the reactor thread; in the reactor thread when
            L{None}.
        """
        super().__init__()
        self.backends = backends
        self.clock = clock
        self.runInThread = runInThread or defer.maybeDeferred
        self.sessions = Sessions(clock)
        self.throttle = LoginThrottle(clock)
        self._streams: set[EventStream] = set()
        self._keepalive = task.LoopingCall(self._keepStreamsAlive)
        self._keepalive.clock = clock
        self._routes = [
            ("POST", ("sessions",), self.login),
            ("DELETE", ("sessions",), self.logout),
            ("POST", ("messages",), self.sendMessage),
            ("PUT", ("presence",), self.setPresence),
            ("GET", ("subscriptions",), self.subscriptions),
            ("POST", ("subscriptions",), self.subscribe),
            ("DELETE", ("subscriptions", None), self.unsubscribe),
            ("GET", ("subscribers",), self.subscribers),
            ("POST", ("subscribers", None), self.decide),
            ("GET", ("attributes", None), self.attributes),
            ("GET", ("blocks",), self.blocks),
            ("PUT", ("blocks", None), self.block),
            ("DELETE", ("blocks", None), self.unblock),
            ("GET", ("settings",), self.settings),
            ("PUT", ("settings",), self.changeSettings),
            ("GET", ("events",), self.events),
        ]

    def startKeepalive(self):
        """
        Write a keepalive comment to every stream every
        L{KEEPALIVE_INTERVAL} seconds.
        """
        self._keepalive.start(KEEPALIVE_INTERVAL, now=False)

    def stopKeepalive(self):
        """
        Stop the keepalive and close every stream.
        """
        if self._keepalive.running:
            self._keepalive.stop()
        for stream in list(self._streams):
            stream.close()

    def _keepStreamsAlive(self):
        for stream in list(self._streams):
            stream.comment("keepalive")

    # -- dispatch ---------------------------------------------------------------

    def render(self, request):
        """
        Find the handler for the method and path and answer in JSON.
        """
        finished = []
        request.notifyFinish().addBoth(finished.append)
        segments = [s.decode("utf-8", "replace") for s in request.postpath]
        if segments and segments[-1] == "":
            segments.pop()
        try:
            handler, arguments = self._route(request.method.decode("ascii", "replace"), segments)
        except APIError as e:
            result = defer.fail(e)
        else:
            result = defer.maybeDeferred(handler, request, *arguments)
        result.addCallbacks(
            self._answer, self._refuse, callbackArgs=(request, finished),
            errbackArgs=(request, finished),
        )
        result.addErrback(self._crashed, request, finished)
        result.addCallback(self._finish, request, finished)
        return server.NOT_DONE_YET

    def _route(self, method, segments):
        if len(segments) < 2 or segments[0] != "v1":
            raise APIError(404, "not-found", "no such path")
        path = segments[1:]
        allowed = []
        for routeMethod, pattern, handler in self._routes:
            if len(pattern) != len(path):
                continue
            if all(p is None or p == s for p, s in zip(pattern, path)):
                if routeMethod == method:
                    return handler, [s for p, s in zip(pattern, path) if p is None]
                allowed.append(routeMethod)
        if allowed:
            raise APIError(405, "method-not-allowed", f"use {', '.join(sorted(set(allowed)))}")
        raise APIError(404, "not-found", "no such path")

    def _answer(self, result, request, finished):
        if result is STREAMING or finished:
            return result
        status, body = result if isinstance(result, tuple) else (result, None)
        request.setResponseCode(status)
        if body is not None:
            self._writeJSON(request, body)
        return None

    def _refuse(self, failure, request, finished):
        if failure.check(Refused):
            error = APIError.fromRefused(failure.value)
        else:
            failure.trap(APIError)
            error = failure.value
        if finished:
            return None
        request.setResponseCode(error.status)
        if error.retryAfter:
            request.setHeader(b"Retry-After", str(int(error.retryAfter) + 1).encode("ascii"))
        if error.status == 401:
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="imxd"')
        self._writeJSON(request, {"error": error.code, "message": error.message})
        return None

    def _crashed(self, failure, request, finished):
        self.log.failure("client API request failed", failure)
        if not finished:
            request.setResponseCode(500)
            self._writeJSON(request, {"error": "internal-error", "message": "see the server log"})

    @staticmethod
    def _finish(result, request, finished):
        if result is not STREAMING and not finished:
            request.finish()

    @staticmethod
    def _writeJSON(request, body):
        request.setHeader(b"Content-Type", b"application/json")
        request.write(json.dumps(body, ensure_ascii=False).encode("utf-8"))

    # -- request helpers -------------------------------------------------------------

    @staticmethod
    def _body(request):
        data = request.content.read(MAX_REQUEST + 1)
        if len(data) > MAX_REQUEST:
            raise APIError(413, "request-too-large", f"requests are at most {MAX_REQUEST} octets")
        try:
            body = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise APIError(400, "bad-request", "the body must be a JSON object") from None
        if not isinstance(body, dict):
            raise APIError(400, "bad-request", "the body must be a JSON object")
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, "bad-request", "text must be valid Unicode (no lone surrogates)") from None
        return body

    def _token(self, request):
        header = _header(request, b"authorization").strip()
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "unauthorized", "send Authorization: Bearer TOKEN")
        return token.strip()

    def _backendOf(self, address):
        """
        @return: the backend serving a canonical address's domain here, or
            L{None} (also for no address).
        """
        return self.backends.get(address.rpartition("@")[2]) if address else None

    def _user(self, request):
        """
        @return: C{(address, backend)} of the session's user.
        @raise APIError: 401 without a live session.
        """
        address = self.sessions.lookup(self._token(request))
        backend = self._backendOf(address)
        if backend is None or not backend.store.exists(address):
            raise APIError(401, "unauthorized", "the session is unknown or has expired")
        return address, backend

    # -- handlers ---------------------------------------------------------------------

    @defer.inlineCallbacks
    def login(self, request):
        body = self._body(request)
        account = _field(body, "address", str)
        password = _field(body, "password", str)
        if len(account) > MAX_ADDRESS or len(password) > MAX_PASSWORD:
            raise APIError(400, "bad-request", "address or password too long")
        client = getattr(request.getClientAddress(), "host", "unknown")
        try:
            address = canonical(account)
        except Refused:
            address = None
        key = address or account.lower()
        wait = self.throttle.retryAfter(key, client)
        if wait > 0:
            raise APIError(429, "too-many-requests", "too many failed logins", wait)
        # Counted as failed until proved right, so that attempts running
        # at once cannot pass the limit.
        self.throttle.failed(key, client)
        backend = self._backendOf(address)
        stored = backend.store.passwordHash(address) if backend else None
        right = yield self.runInThread(checkPassword, password, stored or dummyHash())
        if not (right and stored):
            self.log.info("client API: failed login for {account} from {client}",
                          account=key, client=client)
            raise APIError(401, "unauthorized", "wrong address or password")
        self.throttle.succeeded(key, client)
        token = self.sessions.create(address, backend.sessionLifetime)
        return 201, {"token": token, "address": address, "expires": int(backend.sessionLifetime)}

    def logout(self, request):
        self._user(request)
        self.sessions.revoke(self._token(request))
        return 204

    @defer.inlineCallbacks
    def sendMessage(self, request):
        user, backend = self._user(request)
        body = self._body(request)
        to = _field(body, "to", str)
        text = _field(body, "body", str)
        mediaType = _field(body, "type", str, required=False) or "text/plain"
        headers = _field(body, "headers", dict, required=False) or {}
        if not all(isinstance(v, str) for v in headers.values()):
            raise APIError(400, "bad-request", "headers: values must be strings")
        messageId = yield backend.sendMessage(user, to, text, mediaType, tuple(headers.items()))
        return 202, {"id": messageId}

    def setPresence(self, request):
        user, backend = self._user(request)
        body = self._body(request)
        state = _field(body, "state", str)
        status = _field(body, "status", str, required=False)
        if status is not None and (len(status) > MAX_STATUS or _CONTROL.search(status)):
            raise APIError(400, "bad-request",
                           f"status: at most {MAX_STATUS} characters, no control characters")
        backend.setPresence(user, state, status or None)
        return 204

    def subscriptions(self, request):
        user, backend = self._user(request)
        return 200, {"subscriptions": backend.store.contacts(user)}

    @defer.inlineCallbacks
    def subscribe(self, request):
        user, backend = self._user(request)
        to = _field(self._body(request), "to", str)
        state = yield backend.subscribe(user, to)
        return 202, {"state": state}

    @defer.inlineCallbacks
    def unsubscribe(self, request, address):
        user, backend = self._user(request)
        yield backend.unsubscribe(user, address)
        return 204

    def subscribers(self, request):
        user, backend = self._user(request)
        return 200, {"subscribers": backend.store.decisions(user)}

    @defer.inlineCallbacks
    def decide(self, request, address):
        user, backend = self._user(request)
        decision = _field(self._body(request), "decision", str)
        if decision not in ("grant", "deny"):
            raise APIError(400, "bad-request", 'decision: "grant" or "deny"')
        yield backend.decide(user, address, decision == "grant")
        return 204

    @defer.inlineCallbacks
    def attributes(self, request, target):
        user, backend = self._user(request)
        values = yield backend.attributes(user, target)
        return 200, {"attributes": values}

    def blocks(self, request):
        user, backend = self._user(request)
        return 200, {"blocks": backend.store.blocks(user)}

    def block(self, request, pattern):
        user, backend = self._user(request)
        self._guard(backend.store.block, user, pattern)
        return 204

    def unblock(self, request, pattern):
        user, backend = self._user(request)
        self._guard(backend.store.unblock, user, pattern)
        return 204

    @staticmethod
    def _guard(change, user, pattern):
        try:
            change(user, pattern)
        except AccountError as e:
            raise APIError(400, "malformed", str(e)) from None

    def settings(self, request):
        user, backend = self._user(request)
        return 200, {
            "only_granted": backend.store.onlyGranted(user),
            "alias": backend.store.alias(user),
        }

    def changeSettings(self, request):
        user, backend = self._user(request)
        body = self._body(request)
        onlyGranted = _field(body, "only_granted", bool, required=False)
        alias = _field(body, "alias", str, required=False)
        if alias is not None and (len(alias) > 64 or _CONTROL.search(alias)):
            raise APIError(400, "bad-request", "alias: at most 64 characters, no control characters")
        if onlyGranted is not None:
            backend.store.setOnlyGranted(user, onlyGranted)
        if alias is not None:
            backend.store.setAlias(user, alias or None)
        return 204

    def events(self, request):
        user, backend = self._user(request)
        header = _header(request, b"last-event-id").strip()
        lastEventId = int(header) if header.isascii() and header.isdigit() else 0
        lastEventId = min(lastEventId, 2**62)
        backend.checkStreamLimit(user)
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.write(b"retry: 3000\n\n")
        stream = EventStream(request)
        backend.openStream(user, stream, lastEventId)
        self._streams.add(stream)

        def closed(_):
            stream.open = False
            self._streams.discard(stream)
            backend.closeStream(user, stream)

        request.notifyFinish().addBoth(closed)
        return STREAMING


class BoundedRequest(server.Request):
    """
    A request whose body may not exceed L{MAX_REQUEST} octets: the
    connection is dropped as soon as it does, before more is stored.
    """

    received = 0

    def gotLength(self, length):
        if length is not None and length > MAX_REQUEST:
            self._refuseTooLarge()
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data):
        self.received += len(data)
        if self.received > MAX_REQUEST:
            self._refuseTooLarge()
            return
        super().handleContentChunk(data)

    def _refuseTooLarge(self):
        if self.channel is not None and self.channel.transport is not None:
            self.channel.transport.loseConnection()


class ClientAPIService(service.MultiService):
    """
    One client API listener and the L{ClientAPI} it serves.
    """

    def __init__(self, api, listener):
        super().__init__()
        self.api = api
        listener.setServiceParent(self)

    def startService(self):
        super().startService()
        self.api.startKeepalive()

    def stopService(self):
        self.api.stopKeepalive()
        return super().stopService()


def clientAPIServices(backends, reactor):
    """
    Build one client API listener per distinct C{listen} address of the
    given local backends (domains naming the same address share it).

    @param backends: L{imxd.backend.local.backend.LocalBackend}s.
    @param reactor: the reactor to listen with, to time with, and whose
        thread pool checks passwords.
    @return: the L{ClientAPIService}s, named C{client-api-N}.
    """
    byListen = {}
    for backend in backends:
        byListen.setdefault(backend.listen, {})[backend.domain] = backend

    def runInThread(function, *arguments):
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), function, *arguments)

    services = []
    for index, (listen, domains) in enumerate(sorted(byListen.items())):
        api = ClientAPI(domains, reactor, runInThread)
        site = server.Site(api)
        site.requestFactory = BoundedRequest
        site.displayTracebacks = False
        listener = ListenerService(serverFromString(reactor, listen), site, listen)
        listener.setName(f"client-api-{index}")
        apiService = ClientAPIService(api, listener)
        apiService.setName(f"client-api-{index}")
        services.append(apiService)
    return services
