"""
C{imx}: the command-line client of the C{local} backend's HTTP client API
(C{docs/client-api.md}).

    imx [--api URL] [--session FILE] login ADDRESS [--password-stdin]
    imx send TO [TEXT...] [--html] [--header X-Name=value ...]
    imx listen [--count N] [--timeout SECONDS] [--event NAME ...] [--json]
    imx presence STATE [--status TEXT]
    imx subscribe|unsubscribe|approve|deny ADDRESS
    imx subscriptions | subscribers | blocks
    imx attributes TARGET
    imx block|unblock ADDRESS_OR_DOMAIN
    imx only-granted [on|off]
    imx alias [NAME]
    imx logout

The session (API URL, address and bearer token) is kept in a file only its
owner can read.  Requests are plain blocking HTTP(S) with the standard
library.  Exit status: 0 success, 1 the API refused (or not logged in), 2
usage error, 3 the API cannot be reached.
"""

from __future__ import annotations

import argparse
import getpass
import http.client
import json
import os
import re
import socket
import ssl
import sys
import time
from typing import Any, NamedTuple, Optional, Sequence
from urllib.parse import quote, urlsplit

from imxd import __version__

#: The API used when neither C{--api}, C{IMX_API} nor the session names one.
DEFAULT_API = "http://127.0.0.1:8280"

#: The session file used when neither C{--session} nor C{IMX_SESSION} names one.
DEFAULT_SESSION = os.path.join("~", ".config", "imx", "session.json")

#: Seconds one API request may take (the server may wait for DNS and another
#: server before it answers).
REQUEST_TIMEOUT = 90.0

#: Seconds an event stream may stay silent before it is taken for dropped
#: (the server writes a keepalive comment every 15 s).
STREAM_IDLE = 45.0

#: Seconds between attempts to reopen a dropped event stream: the first
#: delay, and the largest.
RECONNECT_FIRST = 0.5
RECONNECT_MAX = 5.0

#: Longest event stream line read, octets.
MAX_LINE = 8 * 1024 * 1024

#: Exit statuses: success, refused by the API (or not logged in), usage
#: error, the API cannot be reached.
EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

#: Presence states the API accepts.
PRESENCE_STATES = ("online", "away", "busy", "offline")

#: Control characters (and line separators) shown escaped in human output,
#: so that what other people send cannot drive the terminal.
_UNPRINTABLE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


class ClientError(Exception):
    """
    A command failed; C{str()} is the text printed after C{imx: }.

    @ivar exitCode: the process exit status for it.
    """

    exitCode = EXIT_REFUSED


class APIError(ClientError):
    """
    The API answered with an error.

    @ivar status: the HTTP status.
    @ivar code: the error token (C{"error"} of the JSON body).
    @ivar message: the text for people.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class Unreachable(ClientError):
    """
    The API could not be reached (or did not answer in time).
    """

    exitCode = EXIT_UNREACHABLE

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach {url}: {reason}")
        self.url = url
        self.reason = reason


class UsageError(ClientError):
    """
    The command line (or the environment) asks for something impossible.
    """

    exitCode = EXIT_USAGE


def _reason(error: BaseException) -> str:
    """
    @return: a short text for a network error.
    """
    if isinstance(error, ssl.SSLCertVerificationError):
        return error.verify_message or str(error)
    if isinstance(error, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def printable(text: Any) -> str:
    """
    @return: C{text} with control characters written as escapes (C{\\n},
        C{\\x1b}...), safe to print to a terminal on one line.
    """

    def escape(match):
        return match.group().encode("unicode_escape").decode("ascii")

    return _UNPRINTABLE.sub(escape, str(text))


def pathAddress(address: str) -> str:
    """
    @return: C{address} (or a domain) percent-encoded for a URL path.
    """
    return quote(address, safe="@")


# -- the session file ----------------------------------------------------------


def loadSession(path: str) -> Optional[dict]:
    """
    @return: the session stored in C{path} (C{api}, C{address}, C{token},
        and C{last_event_id} once events were read), or L{None} if there is
        none.
    @raise ClientError: the file exists but cannot be read or is not a
        session.
    """
    try:
        with open(path, encoding="utf-8") as f:
            session = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ClientError(f"cannot read the session file {path}: {_reason(e)}") from None
    if not isinstance(session, dict) or not all(
        isinstance(session.get(k), str) for k in ("api", "address", "token")
    ):
        raise ClientError(f"{path} is not an imx session file: run imx login ADDRESS")
    return session


def saveSession(path: str, session: dict) -> None:
    """
    Write C{session} to C{path} atomically, readable by its owner only
    (the file 0600, a directory created for it 0700).

    @raise ClientError: it cannot be written.
    """
    directory = os.path.dirname(os.path.abspath(path))
    scratch = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        descriptor = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(descriptor, 0o600)
            with os.fdopen(descriptor, "w", encoding="utf-8") as f:
                descriptor = None
                json.dump(session, f, indent=1, sort_keys=True)
                f.write("\n")
        finally:
            if descriptor is not None:
                os.close(descriptor)
        os.replace(scratch, path)
    except OSError as e:
        try:
            os.unlink(scratch)
        except OSError:
            pass
        raise ClientError(f"cannot write the session file {path}: {_reason(e)}") from None


def removeSession(path: str) -> None:
    """
    Delete the session file if there is one.
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise ClientError(f"cannot remove the session file {path}: {_reason(e)}") from None


# -- HTTP ------------------------------------------------------------------------


class Event(NamedTuple):
    """
    One server-sent event: its name, its C{id} (an C{int} when numeric, or
    L{None}) and its data (decoded JSON, or the raw text if it is not JSON).
    """

    name: str
    id: Any
    data: Any

    def asJSON(self) -> str:
        """
        @return: the event as one line of JSON: C{{"event", "id", "data"}}.
        """
        return json.dumps(
            {"event": self.name, "id": self.id, "data": self.data},
            ensure_ascii=False,
            separators=(",", ":"),
        )


class EventStream:
    """
    An open C{GET /v1/events} response, read one event at a time.
    """

    def __init__(self, connection: http.client.HTTPConnection, sock, response) -> None:
        self._connection = connection
        self._socket = sock
        self._response = response

    def next(self, timeout: Optional[float]) -> Optional[Event]:
        """
        Read the next event; comments and C{retry:} lines are skipped.

        @param timeout: seconds to wait for each line at most (L{None}:
            for ever).
        @return: the event, or L{None} when the server ended the stream.
        @raise OSError: the connection failed or nothing came in time
            (L{TimeoutError}).
        @raise http.client.HTTPException: the response is broken.
        """
        self._socket.settimeout(timeout)
        name, eventId, data = None, None, []
        while True:
            raw = self._response.readline(MAX_LINE + 1)
            if not raw:
                return None
            if len(raw) > MAX_LINE:
                raise http.client.HTTPException("event stream line too long")
            line = raw.decode("utf-8", "replace")
            if line.endswith("\n"):
                line = line[:-1]
            if line.endswith("\r"):
                line = line[:-1]
            if not line:
                if data:
                    return Event(name or "message", eventId, _decodeData("\n".join(data)))
                name, eventId, data = None, None, []
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
            elif field == "id":
                eventId = int(value) if value.isascii() and value.isdigit() else value

    def close(self) -> None:
        """
        Drop the connection.
        """
        try:
            self._socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._response.close()
        self._connection.close()


def _decodeData(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


class Client:
    """
    Blocking calls to the client API at one base URL.
    """

    def __init__(
        self,
        api: str,
        token: Optional[str] = None,
        timeout: float = REQUEST_TIMEOUT,
        context: Optional[ssl.SSLContext] = None,
    ):
        """
        @param api: the base URL, C{http://} or C{https://}, possibly with a
            path prefix.
        @param token: the session's bearer token, if logged in.
        @param context: the TLS context for C{https://} (default: the
            system's trust).
        @raise UsageError: C{api} is not such a URL.
        """
        parts = urlsplit(api)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme not in ("http", "https") or not parts.hostname or port == -1:
            raise UsageError(f"the API URL must be http://HOST[:PORT] or https://...: {api!r}")
        self.api = api
        self.token = token
        self.timeout = timeout
        self._context = context
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = port
        self._prefix = parts.path.rstrip("/")

    def _connection(self, timeout: Optional[float]) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout,
                context=self._context or ssl.create_default_context(),
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _headers(self, accept: str = "application/json", auth: bool = True) -> dict:
        headers = {"Accept": accept, "User-Agent": f"imx/{__version__}"}
        if auth and self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def call(self, method: str, path: str, body: Any = None, auth: bool = True) -> Any:
        """
        Make one request.

        @param path: below the base URL, e.g. C{/v1/blocks}.
        @param body: sent as JSON, when not L{None}.
        @return: the decoded JSON answer, or L{None} for an empty one.
        @raise APIError: the API answered with an error.
        @raise Unreachable: it could not be reached or did not answer.
        """
        headers = self._headers(auth=auth)
        data = None
        if body is not None:
            data = json.dumps(body, ensure_ascii=False).encode("utf-8")
            headers["Content-Type"] = "application/json"
        connection = self._connection(self.timeout)
        try:
            try:
                connection.request(method, self._prefix + path, body=data, headers=headers)
                response = connection.getresponse()
                payload = response.read()
            except (OSError, http.client.HTTPException) as e:
                raise Unreachable(self.api, _reason(e)) from None
        finally:
            connection.close()
        if not 200 <= response.status < 300:
            raise _errorOf(response, payload)
        if not payload:
            return None
        try:
            return json.loads(payload.decode("utf-8"))
        except ValueError:
            raise APIError(response.status, "bad-answer", "the API did not answer JSON") from None

    def events(self, lastEventId: Any = None, timeout: Optional[float] = None) -> EventStream:
        """
        Open the event stream.

        @param lastEventId: the last event id already processed, sent as
            C{Last-Event-ID}.
        @param timeout: seconds to wait for the connection and the answer.
        @raise APIError: the API refused the stream.
        @raise Unreachable: it could not be reached or did not answer.
        """
        headers = self._headers(accept="text/event-stream")
        if lastEventId:
            headers["Last-Event-ID"] = str(lastEventId)
        connection = self._connection(timeout)
        try:
            connection.connect()
            sock = connection.sock
            connection.request("GET", self._prefix + "/v1/events", headers=headers)
            response = connection.getresponse()
            if response.status != 200:
                payload = response.read()
                connection.close()
                raise _errorOf(response, payload)
        except (OSError, http.client.HTTPException) as e:
            connection.close()
            raise Unreachable(self.api, _reason(e)) from None
        mediaType = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
        if mediaType != "text/event-stream":
            connection.close()
            raise APIError(200, "bad-answer", f"the API answered {mediaType or 'no type'}, "
                                              "not an event stream")
        return EventStream(connection, sock, response)


def _errorOf(response: http.client.HTTPResponse, payload: bytes) -> APIError:
    """
    @return: the L{APIError} for an error answer: the JSON C{error} and
        C{message} when there are, else the HTTP status.
    """
    code = message = None
    try:
        body = json.loads(payload.decode("utf-8"))
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            code = body["error"]
            message = body.get("message") if isinstance(body.get("message"), str) else code
    except ValueError:
        pass
    if code is None:
        code = f"http-{response.status}"
        message = response.reason or "unexpected answer"
    retryAfter = response.getheader("Retry-After")
    if retryAfter and retryAfter.strip().isdigit():
        message = f"{message} (try again in {int(retryAfter)} s)"
    return APIError(response.status, printable(code), printable(message))


# -- commands --------------------------------------------------------------------


class Context:
    """
    What a command works with: the resolved API and session file, the
    session (if any), and the process's streams.
    """

    def __init__(self, api, sessionPath, session, stdin, stdout, stderr):
        self.api = api
        self.sessionPath = sessionPath
        self.session = session
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr

    def client(self, needToken: bool = True) -> Client:
        """
        @return: a L{Client} for the API, with the session's token.
        @raise ClientError: C{needToken} and not logged in.
        """
        if needToken and self.session is None:
            raise ClientError("not logged in: run imx login ADDRESS")
        return Client(self.api, self.session["token"] if self.session else None)

    def out(self, line: str) -> None:
        """
        Print one line to standard output, at once.
        """
        self.stdout.write(line + "\n")
        self.stdout.flush()

    def warn(self, text: str) -> None:
        """
        Print C{imx: text} to standard error.
        """
        self.stderr.write(f"imx: {text}\n")
        self.stderr.flush()


def cmdLogin(ctx: Context, args) -> int:
    """
    Log in: ask the API for a token and keep it in the session file.
    """
    if args.password_stdin:
        password = ctx.stdin.readline()
        if isinstance(password, bytes):
            password = password.decode("utf-8")
        password = password[:-1] if password.endswith("\n") else password
        password = password[:-1] if password.endswith("\r") else password
    else:
        try:
            password = getpass.getpass(f"Password for {args.address}: ")
        except EOFError:
            password = ""
    if not password:
        raise ClientError("no password given")
    answer = ctx.client(needToken=False).call(
        "POST", "/v1/sessions", {"address": args.address, "password": password}, auth=False
    )
    try:
        token, address = answer["token"], answer["address"]
        if not isinstance(token, str) or not isinstance(address, str):
            raise TypeError
    except (TypeError, KeyError):
        raise APIError(201, "bad-answer", "the API answered no token") from None
    saveSession(ctx.sessionPath, {"api": ctx.api, "address": address, "token": token})
    ctx.out(f"logged in as {printable(address)}")
    return EXIT_OK


def cmdLogout(ctx: Context, args) -> int:
    """
    End the session on the server and forget it.
    """
    try:
        ctx.client().call("DELETE", "/v1/sessions")
    except APIError as e:
        if e.status != 401:
            raise
    removeSession(ctx.sessionPath)
    return EXIT_OK


def _readText(ctx: Context, words: Sequence[str]) -> str:
    if words and list(words) != ["-"]:
        return " ".join(words)
    isatty = getattr(ctx.stdin, "isatty", None)
    if isatty is not None and isatty():
        ctx.stderr.write("imx: type the message, then Ctrl-D on a line of its own\n")
        ctx.stderr.flush()
    text = ctx.stdin.read()
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    if text.endswith("\n"):
        text = text[:-1]
        if text.endswith("\r"):
            text = text[:-1]
    return text


def cmdSend(ctx: Context, args) -> int:
    """
    Send a message; print its id.
    """
    client = ctx.client()
    body = {
        "to": args.to,
        "body": _readText(ctx, args.text),
        "type": "text/html-lite" if args.html else "text/plain",
    }
    if args.header:
        body["headers"] = dict(args.header)
    answer = client.call("POST", "/v1/messages", body)
    ctx.out(printable(answer.get("id", "") if isinstance(answer, dict) else ""))
    return EXIT_OK


def describe(event: Event) -> str:
    """
    @return: one line telling a person what C{event} says.
    """
    data = event.data if isinstance(event.data, dict) else {}
    p = printable
    if event.name == "message" and data:
        kind = "" if data.get("type") in (None, "text/plain") else f" [{data.get('type')}]"
        return p(f"message from {data.get('from')}{kind}: {data.get('body', '')}")
    if event.name == "delivery-failure" and data:
        return p(
            f"delivery failure of {data.get('id')} to {data.get('to')}: "
            f"{data.get('error')}: {data.get('message')}"
        )
    if event.name == "presence" and data:
        status = f" ({data['status']})" if data.get("status") else ""
        return p(f"presence of {data.get('from')}: {data.get('state')}{status}")
    if event.name == "subscription-request" and data:
        return p(f"subscription request from {data.get('from')}")
    if event.name == "subscription-state" and data:
        return p(f"subscription to {data.get('to')}: {data.get('state')}")
    text = event.data if isinstance(event.data, str) else json.dumps(event.data, ensure_ascii=False)
    return p(f"{event.name}: {text}")


def _stateKey(event: Event) -> tuple:
    data = event.data if isinstance(event.data, dict) else {}
    return (event.name, data.get("from"), data.get("to"))


class Listener:
    """
    What C{imx listen} does: read events, print those wanted, reconnect a
    dropped stream with C{Last-Event-ID}, and remember in the session the
    last event handled.

    Events with an id that come again after a reconnection are not printed
    twice; neither are the state events (presence, subscription states
    and requests) a new stream starts with, when they repeat what was
    already printed.
    """

    def __init__(self, ctx: Context, args) -> None:
        self.ctx = ctx
        self.wanted = set(args.event) if args.event else None
        self.count = args.count
        self.json = args.json
        self.timeout = args.timeout
        lastEventId = ctx.session.get("last_event_id") if ctx.session else None
        #: The highest event id such that every event up to it was handled.
        self.acked = lastEventId if isinstance(lastEventId, int) else 0
        self._contiguous = True
        self._seen: set = set()
        self._state: dict = {}
        self._printed = 0

    def run(self) -> int:
        """
        @return: the exit status.
        """
        client = self.ctx.client()
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        stream = client.events(self.acked, self._wait(deadline, REQUEST_TIMEOUT))
        reconnected = False
        try:
            while True:
                try:
                    event = stream.next(self._wait(deadline, STREAM_IDLE))
                    if event is None:
                        raise ConnectionError("the server ended the stream")
                except (OSError, http.client.HTTPException) as e:
                    stream.close()
                    stream = None
                    if self._expired(deadline):
                        return self._timedOut()
                    self.ctx.warn(f"event stream lost ({_reason(e)}); reconnecting")
                    stream = self._reconnect(client, deadline)
                    if stream is None:
                        return self._timedOut()
                    reconnected = True
                    continue
                self._handle(event, reconnected)
                if self.count is not None and self._printed >= self.count:
                    return EXIT_OK
        finally:
            if stream is not None:
                stream.close()
            self._remember()

    @staticmethod
    def _wait(deadline, longest):
        if deadline is None:
            return longest
        return max(0.001, min(longest, deadline - time.monotonic()))

    @staticmethod
    def _expired(deadline):
        return deadline is not None and time.monotonic() >= deadline - 0.005

    def _timedOut(self) -> int:
        if self.count is None:
            self.ctx.warn(f"timed out after {self.timeout:g} s ({self._printed} events printed)")
        else:
            self.ctx.warn(
                f"timed out after {self.timeout:g} s waiting for {self.count} events "
                f"({self._printed} printed)"
            )
        return EXIT_REFUSED

    def _reconnect(self, client: Client, deadline) -> Optional[EventStream]:
        delay = RECONNECT_FIRST
        while True:
            if deadline is not None:
                delay = min(delay, deadline - time.monotonic())
            if delay > 0:
                time.sleep(delay)
            if self._expired(deadline):
                return None
            try:
                return client.events(self.acked, self._wait(deadline, REQUEST_TIMEOUT))
            except Unreachable as e:
                self.ctx.warn(f"{e}; trying again")
            except APIError as e:
                # Busy or restarting (a proxy's 502/503), or the dropped
                # stream still counted among the user's open ones: later.
                if e.status != 429 and e.status < 500:
                    raise
                self.ctx.warn(f"{e}; trying again")
            delay = min(RECONNECT_MAX, max(delay, RECONNECT_FIRST) * 2)

    def _handle(self, event: Event, reconnected: bool) -> None:
        hasId = isinstance(event.id, int)
        if hasId:
            if event.id in self._seen:
                return
            self._seen.add(event.id)
        elif event.id is None:
            key = _stateKey(event)
            if reconnected and self._state.get(key) == event.data:
                return
            self._state[key] = event.data
        matched = self.wanted is None or event.name in self.wanted
        if matched:
            self.ctx.out(event.asJSON() if self.json else describe(event))
            self._printed += 1
        if hasId:
            if matched and self._contiguous:
                self.acked = max(self.acked, event.id)
            elif not matched:
                self._contiguous = False

    def _remember(self) -> None:
        """
        Keep the last event id handled in the session file, so that the
        next C{imx listen} starts after it.
        """
        if not self.acked or self.ctx.session is None:
            return
        try:
            current = loadSession(self.ctx.sessionPath)
        except ClientError:
            return
        if current is None or current.get("token") != self.ctx.session["token"]:
            return
        previous = current.get("last_event_id")
        if isinstance(previous, int) and previous >= self.acked:
            return
        current["last_event_id"] = self.acked
        try:
            saveSession(self.ctx.sessionPath, current)
        except ClientError as e:
            self.ctx.warn(str(e))


def cmdListen(ctx: Context, args) -> int:
    """
    Print events as they arrive.
    """
    return Listener(ctx, args).run()


def cmdPresence(ctx: Context, args) -> int:
    """
    Publish the user's presence.
    """
    body = {"state": args.state}
    if args.status is not None:
        body["status"] = args.status
    ctx.client().call("PUT", "/v1/presence", body)
    return EXIT_OK


def cmdSubscribe(ctx: Context, args) -> int:
    """
    Ask for someone's presence; print the subscription's state.
    """
    answer = ctx.client().call("POST", "/v1/subscriptions", {"to": args.address})
    ctx.out(printable(answer.get("state") if isinstance(answer, dict) else answer))
    return EXIT_OK


def cmdUnsubscribe(ctx: Context, args) -> int:
    """
    Stop asking for someone's presence.
    """
    ctx.client().call("DELETE", "/v1/subscriptions/" + pathAddress(args.address))
    return EXIT_OK


def _decide(decision):
    def command(ctx: Context, args) -> int:
        ctx.client().call(
            "POST", "/v1/subscribers/" + pathAddress(args.address), {"decision": decision}
        )
        return EXIT_OK

    return command


cmdApprove = _decide("grant")
cmdApprove.__doc__ = "Grant someone's request to see the user's presence (or grant in advance)."
cmdDeny = _decide("deny")
cmdDeny.__doc__ = "Deny someone's request to see the user's presence (or deny in advance)."


def _printTable(ctx: Context, table) -> None:
    if isinstance(table, dict):
        for key in sorted(table):
            ctx.out(printable(f"{key} {table[key]}"))


def cmdSubscriptions(ctx: Context, args) -> int:
    """
    Print the subscriptions the user wants: C{ADDRESS STATE} lines.
    """
    answer = ctx.client().call("GET", "/v1/subscriptions")
    _printTable(ctx, (answer or {}).get("subscriptions"))
    return EXIT_OK


def cmdSubscribers(ctx: Context, args) -> int:
    """
    Print who asked to see the user's presence: C{ADDRESS DECISION} lines.
    """
    answer = ctx.client().call("GET", "/v1/subscribers")
    _printTable(ctx, (answer or {}).get("subscribers"))
    return EXIT_OK


def cmdAttributes(ctx: Context, args) -> int:
    """
    Print an address's or a domain's attributes: C{name=value} lines, sorted.
    """
    answer = ctx.client().call("GET", "/v1/attributes/" + pathAddress(args.target))
    attributes = (answer or {}).get("attributes")
    if isinstance(attributes, dict):
        for name in sorted(attributes):
            value = attributes[name]
            ctx.out(printable(f"{name}={'' if value is None else value}"))
    return EXIT_OK


def cmdBlock(ctx: Context, args) -> int:
    """
    Refuse messages and requests from an address or a whole domain.
    """
    ctx.client().call("PUT", "/v1/blocks/" + pathAddress(args.pattern))
    return EXIT_OK


def cmdUnblock(ctx: Context, args) -> int:
    """
    Accept an address or a domain again.
    """
    ctx.client().call("DELETE", "/v1/blocks/" + pathAddress(args.pattern))
    return EXIT_OK


def cmdBlocks(ctx: Context, args) -> int:
    """
    Print the blocked addresses and domains, one a line.
    """
    answer = ctx.client().call("GET", "/v1/blocks")
    blocks = (answer or {}).get("blocks")
    for pattern in blocks if isinstance(blocks, list) else ():
        ctx.out(printable(pattern))
    return EXIT_OK


def cmdOnlyGranted(ctx: Context, args) -> int:
    """
    Accept messages only from granted subscribers (C{on}) or from anyone
    (C{off}); without an argument, print the setting.
    """
    client = ctx.client()
    if args.flag is None:
        answer = client.call("GET", "/v1/settings") or {}
        ctx.out("on" if answer.get("only_granted") else "off")
    else:
        client.call("PUT", "/v1/settings", {"only_granted": args.flag == "on"})
    return EXIT_OK


def cmdAlias(ctx: Context, args) -> int:
    """
    Set the user's display name (an empty NAME removes it); without NAME,
    print it.
    """
    client = ctx.client()
    if args.name is None:
        alias = (client.call("GET", "/v1/settings") or {}).get("alias")
        if alias:
            ctx.out(printable(alias))
    else:
        client.call("PUT", "/v1/settings", {"alias": args.name})
    return EXIT_OK


# -- the command line --------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """
    An argument parser writing to the streams given to L{main}.
    """

    streams: Any = None

    def _print_message(self, message, file=None):
        if not message:
            return
        if self.streams is not None:
            out, err = self.streams
            file = out if file is sys.stdout else err
        super()._print_message(message, file)


def _header(text: str):
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected X-Name=value, got {text!r}")
    return name, value


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def parser(streams=None) -> argparse.ArgumentParser:
    """
    @param streams: C{(stdout, stderr)} for help and usage errors.
    @return: the parser of C{imx}'s command line.
    """
    common = _Parser(add_help=False)
    common.add_argument(
        "--api", default=argparse.SUPPRESS,
        help=f"the client API's URL (default: $IMX_API, else the session's, else {DEFAULT_API})",
    )
    common.add_argument(
        "--session", metavar="FILE", default=argparse.SUPPRESS,
        help=f"the session file (default: $IMX_SESSION, else {DEFAULT_SESSION})",
    )
    top = _Parser(
        prog="imx",
        parents=[common],
        description="A client of imxd's local backend: send and receive IMX messages "
        "and presence from the command line.",
        epilog="Exit status: 0 success, 1 refused by the API (or not logged in), "
        "2 usage error, 3 the API cannot be reached.",
    )
    top.streams = streams
    commands = top.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name, function, help):
        sub = commands.add_parser(name, parents=[common], help=help, description=help)
        sub.streams = streams
        sub.set_defaults(function=function)
        return sub

    login = command("login", cmdLogin, "log in and keep the session")
    login.add_argument("address", metavar="ADDRESS")
    login.add_argument(
        "--password-stdin", action="store_true",
        help="read the password from the first line of standard input, not a prompt",
    )
    command("logout", cmdLogout, "end the session")
    send = command("send", cmdSend, "send a message; print its id")
    send.add_argument("to", metavar="TO")
    send.add_argument(
        "text", metavar="TEXT", nargs="*",
        help="the message, words joined by spaces (none or -: read standard input)",
    )
    send.add_argument("--html", action="store_true", help="send the text as text/html-lite")
    send.add_argument(
        "--header", metavar="X-Name=value", type=_header, action="append",
        help="add an X- header (repeatable)",
    )
    listen = command("listen", cmdListen, "print events as they arrive")
    listen.add_argument(
        "--count", metavar="N", type=_count, help="exit (0) after N events"
    )
    listen.add_argument(
        "--timeout", metavar="SECONDS", type=_seconds,
        help="exit (1) if SECONDS pass before that",
    )
    listen.add_argument(
        "--event", metavar="NAME", action="append",
        help="print only events named NAME (repeatable): message, delivery-failure, "
        "presence, subscription-request, subscription-state",
    )
    listen.add_argument(
        "--json", action="store_true",
        help='print each event as one JSON object {"event", "id", "data"}',
    )
    presence = command("presence", cmdPresence, "publish your presence")
    presence.add_argument("state", metavar="STATE", choices=PRESENCE_STATES,
                          help=" | ".join(PRESENCE_STATES))
    presence.add_argument("--status", metavar="TEXT", help="a status text")
    for name, function, help in (
        ("subscribe", cmdSubscribe, "ask to see someone's presence; print the state"),
        ("unsubscribe", cmdUnsubscribe, "stop seeing someone's presence"),
        ("approve", cmdApprove, "let someone see your presence"),
        ("deny", cmdDeny, "refuse to let someone see your presence"),
    ):
        command(name, function, help).add_argument("address", metavar="ADDRESS")
    command("subscriptions", cmdSubscriptions, "list the presence you asked to see")
    command("subscribers", cmdSubscribers, "list who asked to see your presence")
    command("attributes", cmdAttributes, "print an address's or domain's attributes").add_argument(
        "target", metavar="TARGET", help="an address or a domain"
    )
    for name, function, help in (
        ("block", cmdBlock, "refuse messages and requests from an address or domain"),
        ("unblock", cmdUnblock, "accept an address or domain again"),
    ):
        command(name, function, help).add_argument("pattern", metavar="ADDRESS_OR_DOMAIN")
    command("blocks", cmdBlocks, "list what you block")
    command(
        "only-granted", cmdOnlyGranted,
        "accept messages only from people you approved (on) or from anyone (off)",
    ).add_argument("flag", metavar="on|off", nargs="?", choices=("on", "off"))
    command("alias", cmdAlias, "set your display name (print it without NAME)").add_argument(
        "name", metavar="NAME", nargs="?"
    )
    return top


def main(
    argv: Optional[Sequence[str]] = None,
    stdin=None,
    stdout=None,
    stderr=None,
    environ=None,
) -> int:
    """
    Run C{imx}.

    @param argv: the arguments (default: C{sys.argv[1:]}).
    @param stdin: where C{login --password-stdin} and C{send} read.
    @param stdout: where results go.
    @param stderr: where errors go.
    @param environ: the environment (default: C{os.environ}).
    @return: the exit status.
    """
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    environ = os.environ if environ is None else environ
    top = parser((stdout, stderr))
    try:
        args, extras = top.parse_known_args(argv)
        if extras:
            # argparse stops filling TEXT at the first option (send TO --html
            # TEXT): words after it come back as extras.
            if args.command != "send" or any(w.startswith("-") and w != "-" for w in extras):
                top.error(f"unrecognized arguments: {' '.join(extras)}")
            args.text = [*args.text, *extras]
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    sessionPath = getattr(args, "session", None) or environ.get("IMX_SESSION") or DEFAULT_SESSION
    sessionPath = os.path.expanduser(sessionPath)
    ctx = Context(None, sessionPath, None, stdin, stdout, stderr)
    try:
        ctx.session = loadSession(sessionPath)
        ctx.api = (
            getattr(args, "api", None)
            or environ.get("IMX_API")
            or (ctx.session or {}).get("api")
            or DEFAULT_API
        )
        try:
            return args.function(ctx, args)
        except APIError as e:
            if e.status == 401 and args.command != "login" and ctx.session is not None:
                ctx.warn(str(e))
                ctx.warn(f"run imx login {printable(ctx.session['address'])} to log in again")
                return e.exitCode
            raise
    except ClientError as e:
        ctx.warn(str(e))
        return e.exitCode
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        if stdout is sys.stdout:
            # Python flushes stdout at exit: point it somewhere harmless.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
