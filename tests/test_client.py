"""
Tests for C{imx} (L{imxd.client}) against a real imxd process: one server
on 127.0.0.21 hosting a.test and b.test with the C{local} backend (routing
between two hosted domains stays in process, so no DNS server is needed).

Most commands run in process through L{imxd.client.main}; C{imx listen}
also runs as the installed console script in a subprocess.  Every process
is stopped by its PID and every wait is bounded.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from typing import NamedTuple

import pytest

from imxd import client
from tests.live import Server, freePort, waitFor
from tests.support import WAIT

HOST = "127.0.0.21"

USERS = {
    "alice@a.test": "alice password",
    "bob@b.test": "bob password",
    "carol@a.test": "carol password",
    "dave@b.test": "dave password",
    "erin@a.test": "erin password",
    "frank@b.test": "frank password",
    "grace@a.test": "grace password",
}

#: The console script pip installed next to the interpreter.
IMX = os.path.join(os.path.dirname(sys.executable), "imx")


class Result(NamedTuple):
    code: int
    out: str
    err: str


def imx(*argv, stdin="") -> Result:
    """
    Run C{imx} in process, with an empty environment.
    """
    out, err = io.StringIO(), io.StringIO()
    code = client.main(list(argv), io.StringIO(stdin), out, err, environ={})
    return Result(code, out.getvalue(), err.getvalue())


def imxProcess(*argv, timeout=WAIT) -> Result:
    """
    Run the installed C{imx} script in a subprocess (bounded).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMX_")}
    done = subprocess.run(
        [IMX, *argv], capture_output=True, text=True, timeout=timeout, env=env,
        stdin=subprocess.DEVNULL,
    )
    return Result(done.returncode, done.stdout, done.stderr)


@pytest.fixture(scope="module")
def server():
    """
    One imxd with a local backend for a.test and b.test and their users.
    """
    base = tempfile.mkdtemp(prefix="imxd-client-")
    live = Server(base, "client", HOST, ["a.test", "b.test"], backend="local")
    for address, password in USERS.items():
        live.addUser(address, password, address.split("@")[0].title())
    live.start(freePort("127.0.0.1"))
    try:
        live.waitListening()

        def apiListening():
            try:
                with socket.create_connection((HOST, live.apiPort), timeout=1.0):
                    return True
            except OSError:
                return False

        waitFor(apiListening, "the client API to listen")
        yield live
    finally:
        live.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def sessions(server, tmp_path_factory):
    """
    Log each user in (once, lazily): C{sessions(address)} is the path of
    the session file.
    """
    directory = tmp_path_factory.mktemp("sessions")
    paths = {}

    def session(address):
        if address not in paths:
            path = str(directory / f"{address}.json")
            result = imx("--api", server.api, "--session", path, "login", address,
                         "--password-stdin", stdin=USERS[address] + "\n")
            assert result.code == 0, result.err
            paths[address] = path
        return paths[address]

    return session


def test_login(server, tmp_path):
    """
    The right password (from stdin) opens a session kept in a 0600 file
    (its new directory 0700); neither the password nor the token is
    printed.  A wrong one gets exit 1 and the API's error, and no file.
    """
    path = str(tmp_path / "new" / "imx" / "session.json")
    result = imx("--api", server.api, "--session", path, "login", "alice@a.test",
                 "--password-stdin", stdin="alice password\n")
    assert result == (0, "logged in as alice@a.test\n", "")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    with open(path) as f:
        session = json.load(f)
    assert session["api"] == server.api
    assert session["address"] == "alice@a.test"
    assert session["token"] not in result.out + result.err
    assert "alice password" not in result.out + result.err
    assert os.listdir(os.path.dirname(path)) == ["session.json"]

    wrong = str(tmp_path / "wrong.json")
    result = imx("--api", server.api, "--session", wrong, "login", "alice@a.test",
                 "--password-stdin", stdin="not her password\n")
    assert result == (1, "", "imx: unauthorized: wrong address or password\n")
    assert not os.path.exists(wrong)


def test_logout(server, tmp_path):
    """
    After logout the session file is gone and the old token is refused,
    with a hint to log in again.
    """
    path = str(tmp_path / "session.json")
    assert imx("--api", server.api, "--session", path, "login", "bob@b.test",
               "--password-stdin", stdin="bob password\n").code == 0
    copy = str(tmp_path / "copy.json")
    shutil.copy(path, copy)
    assert imx("--session", path, "logout") == (0, "", "")
    assert not os.path.exists(path)
    result = imx("--session", copy, "blocks")
    assert result.code == 1
    assert result.err == (
        "imx: unauthorized: the session is unknown or has expired\n"
        "imx: run imx login bob@b.test to log in again\n"
    )


def test_sendAndListen(server, sessions):
    """
    A message sent with C{imx send} (from words, then from stdin) is
    printed by C{imx listen --count} running as a separate process; the
    next C{listen} does not print it again.
    """
    alice, bob = sessions("alice@a.test"), sessions("bob@b.test")
    listener = subprocess.Popen(
        [IMX, "--session", bob, "listen", "--count", "2", "--timeout", "15"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )
    try:
        first = imx("--session", alice, "send", "bob@b.test", "hello", "bob")
        assert first.code == 0, first.err
        assert len(first.out.strip()) == 32
        second = imx("--session", alice, "send", "bob@b.test", "-",
                     stdin="line one\nline two\n")
        assert second.code == 0, second.err
        out, err = listener.communicate(timeout=WAIT)
    finally:
        if listener.poll() is None:
            os.kill(listener.pid, 9)
            listener.wait(timeout=WAIT)
    assert (listener.returncode, err) == (0, "")
    assert out == (
        "message from alice@a.test: hello bob\n"
        "message from alice@a.test: line one\\nline two\n"
    )
    again = imx("--session", bob, "listen", "--event", "message", "--timeout", "0.5")
    assert again.code == 1
    assert again.out == ""


def test_htmlLite(server, sessions):
    """
    C{send --html} sends text/html-lite with the X- headers given; the
    recipient gets it sanitised; C{listen --json} prints the raw event.
    """
    alice, bob = sessions("alice@a.test"), sessions("bob@b.test")
    sent = imx("--session", alice, "send", "bob@b.test", "--html",
               "<b>bold</b><script>alert(1)</script>", "<i>and</i> more",
               "--header", "X-Mood=happy")
    assert sent.code == 0, sent.err
    result = imxProcess("--session", bob, "listen", "--json", "--count", "1",
                        "--event", "message", "--timeout", "10")
    assert result.code == 0, result.err
    [line] = result.out.splitlines()
    event = json.loads(line)
    assert event["event"] == "message"
    assert isinstance(event["id"], int)
    data = event["data"]
    assert data["id"] == sent.out.strip()
    assert data["from"] == "alice@a.test"
    assert data["type"] == "text/html-lite"
    assert data["body"].startswith("<b>bold</b>")
    assert "script" not in data["body"]
    assert data["body"].endswith("<i>and</i> more")
    assert data["headers"]["X-Mood"] == "happy"


def test_refusedAtOnce(server, sessions):
    """
    A refused message exits 1 with the API's error code and text.
    """
    alice = sessions("alice@a.test")
    result = imx("--session", alice, "send", "bob@b.test", "x", "--header", "Mood=happy")
    assert result.code == 1
    assert result.err.startswith("imx: malformed: ")
    result = imx("--session", alice, "send", "no-domain", "x")
    assert result.code == 1
    assert result.err.startswith("imx: malformed: to: ")


def test_presenceFlow(server, sessions):
    """
    carol@a.test subscribes to dave@b.test, dave sees the request and
    approves it, dave's presence then reaches carol (as an event and in
    the attributes she may see), and not alice, who was not granted.
    """
    carol, dave = sessions("carol@a.test"), sessions("dave@b.test")
    assert imx("--session", carol, "subscribe", "dave@b.test") == (0, "pending\n", "")
    result = imxProcess("--session", dave, "listen", "--event", "subscription-request",
                        "--count", "1", "--timeout", "10")
    assert result == (0, "subscription request from carol@a.test\n", "")
    assert imx("--session", dave, "subscribers") == (0, "carol@a.test pending\n", "")
    assert imx("--session", dave, "approve", "carol@a.test") == (0, "", "")
    assert imx("--session", dave, "subscribers") == (0, "carol@a.test granted\n", "")
    waitFor(
        lambda: imx("--session", carol, "subscriptions").out == "dave@b.test granted\n",
        "carol's subscription to be granted",
    )
    assert imx("--session", dave, "presence", "away", "--status", "at lunch") == (0, "", "")
    result = imxProcess("--session", carol, "listen", "--event", "presence",
                        "--count", "1", "--timeout", "10")
    assert result == (0, "presence of dave@b.test: away (at lunch)\n", "")

    result = imx("--session", carol, "attributes", "dave@b.test")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines == sorted(lines)
    attributes = dict(line.split("=", 1) for line in lines)
    assert attributes["alias"] == "Dave"
    assert attributes["presence"] == "away"
    assert attributes["status"] == "at lunch"
    assert "text/plain" in attributes["capabilities"]

    stranger = imx("--session", sessions("alice@a.test"), "attributes", "dave@b.test")
    assert stranger.code == 0, stranger.err
    assert "alias=Dave\n" in stranger.out
    assert "presence=" not in stranger.out
    assert "status=" not in stranger.out


def test_domainAttributes(server, sessions):
    """
    C{attributes DOMAIN} prints the domain's attributes, sorted.
    """
    result = imx("--session", sessions("alice@a.test"), "attributes", "b.test")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines == sorted(lines)
    names = [line.split("=", 1)[0] for line in lines]
    assert "max-message-size" in names
    assert "accepted-types" in names


def test_block(server, sessions):
    """
    frank@b.test blocks grace@a.test's domain: her message is accepted by
    the API (202) and then comes back to her as a delivery-failure event,
    frank never sees it; after unblock the list is empty again.
    """
    frank, grace = sessions("frank@b.test"), sessions("grace@a.test")
    assert imx("--session", frank, "block", "a.test") == (0, "", "")
    assert imx("--session", frank, "blocks") == (0, "a.test\n", "")
    sent = imx("--session", grace, "send", "frank@b.test", "let me in")
    assert sent.code == 0, sent.err
    result = imxProcess("--session", grace, "listen", "--json", "--event", "delivery-failure",
                        "--count", "1", "--timeout", "10")
    assert result.code == 0, result.err
    event = json.loads(result.out)
    assert event["event"] == "delivery-failure"
    assert event["data"]["id"] == sent.out.strip()
    assert event["data"]["to"] == "frank@b.test"
    assert event["data"]["error"] == "blocked"
    human = imx("--session", grace, "listen", "--count", "1", "--timeout", "0.5")
    assert human.code == 1  # already handled: not printed again
    nothing = imx("--session", frank, "listen", "--event", "message", "--timeout", "0.5")
    assert nothing.code == 1
    assert nothing.out == ""
    assert imx("--session", frank, "unblock", "a.test") == (0, "", "")
    assert imx("--session", frank, "blocks") == (0, "", "")


def test_percentInAddress(server, sessions):
    """
    An address whose local part holds C{%} reaches the API as it is:
    C{%41} stays C{%41}, not C{A}.
    """
    erin = sessions("erin@a.test")
    try:
        assert imx("--session", erin, "block", "x%41@a.test") == (0, "", "")
        assert imx("--session", erin, "blocks").out == "x%41@a.test\n"
    finally:
        for pattern in ("x%41@a.test", "x%2541@a.test"):
            imx("--session", erin, "unblock", pattern)


def test_settings(server, sessions):
    """
    C{only-granted} and C{alias} set and print the user's settings.
    """
    erin = sessions("erin@a.test")
    assert imx("--session", erin, "only-granted") == (0, "off\n", "")
    assert imx("--session", erin, "only-granted", "on") == (0, "", "")
    assert imx("--session", erin, "only-granted") == (0, "on\n", "")
    assert imx("--session", erin, "alias", "Erin E.") == (0, "", "")
    assert imx("--session", erin, "alias") == (0, "Erin E.\n", "")
    assert imx("--session", erin, "only-granted", "maybe").code == 2


def test_notLoggedIn(tmp_path):
    """
    Without a session file a command exits 1 and says how to log in.
    """
    result = imx("--session", str(tmp_path / "none.json"), "blocks")
    assert result == (1, "", "imx: not logged in: run imx login ADDRESS\n")


def test_unreachable(tmp_path):
    """
    An API nobody listens on: exit 3 and the reason.
    """
    url = f"http://{HOST}:{freePort(HOST)}"
    result = imx("--api", url, "--session", str(tmp_path / "s.json"), "login", "a@a.test",
                 "--password-stdin", stdin="pw\n")
    assert result == (3, "", f"imx: cannot reach {url}: Connection refused\n")


def test_usage():
    """
    Usage errors exit 2 (argparse), printed to the stderr given.
    """
    result = imx("send")
    assert result.code == 2
    assert "usage: imx send" in result.err
    result = imx("presence", "sleepy")
    assert result.code == 2
    assert imx("send", "bob@b.test", "--header", "no-equals-sign").code == 2
    assert imx("listen", "--count", "0").code == 2


def test_listenTimeout(server, sessions):
    """
    C{listen --timeout} exits 1 with a clear message when the events do
    not come in time, not much later than asked.
    """
    started = time.monotonic()
    result = imx("--session", sessions("erin@a.test"), "listen", "--count", "1",
                 "--timeout", "1")
    elapsed = time.monotonic() - started
    assert result == (1, "", "imx: timed out after 1 s waiting for 1 events (0 printed)\n")
    assert 0.9 <= elapsed < 5


# -- reconnection (a scripted event stream) ------------------------------------


class _ScriptedEvents(http.server.BaseHTTPRequestHandler):
    """
    C{GET /v1/events}: the first stream sends one event and ends; the next
    ones repeat it and add another, then stay open.
    """

    protocol_version = "HTTP/1.0"
    seen: list = []

    def do_GET(self):
        self.seen.append(self.headers.get("Last-Event-ID"))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.end_headers()
        first = 'event: message\nid: 7\ndata: {"from":"x@a.test","body":"seven"}\n\n'
        self.wfile.write(b"retry: 3000\n\n: keepalive\n\n" + first.encode())
        self.wfile.flush()
        if len(self.seen) > 1:
            self.wfile.write(
                b'event: presence\ndata: {"from":"x@a.test","state":"busy","status":null}\n\n'
                b'event: message\nid: 8\ndata: {"from":"x@a.test","body":"eight"}\n\n'
            )
            self.wfile.flush()
            time.sleep(2)

    def log_message(self, *args):
        pass


def test_reconnect(tmp_path):
    """
    A dropped stream is opened again with the last event id as
    C{Last-Event-ID}; an event sent again is not printed twice; the last
    id handled is kept in the session for the next C{listen}.
    """
    _ScriptedEvents.seen = []
    fake = http.server.ThreadingHTTPServer((HOST, 0), _ScriptedEvents)
    fake.daemon_threads = True
    thread = threading.Thread(target=fake.serve_forever, daemon=True)
    thread.start()
    try:
        api = f"http://{HOST}:{fake.server_address[1]}"
        path = str(tmp_path / "session.json")
        client.saveSession(path, {"api": api, "address": "x@b.test", "token": "t"})
        result = imx("--session", path, "listen", "--count", "3", "--timeout", "10")
    finally:
        fake.shutdown()
        fake.server_close()
        thread.join(timeout=WAIT)
    assert result.code == 0, result.err
    assert result.out == (
        "message from x@a.test: seven\n"
        "presence of x@a.test: busy\n"
        "message from x@a.test: eight\n"
    )
    assert "event stream lost" in result.err
    assert _ScriptedEvents.seen == [None, "7"]
    assert client.loadSession(path)["last_event_id"] == 8
