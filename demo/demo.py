"""
`make demo`: two imxd servers on loopback, each serving one service, and
two people using them with the `imx` tool.

alpha.test runs on 127.0.0.41 and beta.test on 127.0.0.42; they find each
other through `[[peer]]` entries (private peering, no DNS needed) and
require TLS between them, with certificates from a private CA made for the
demo (trustme).  alice of
alpha.test subscribes to bob of beta.test, bob grants it, bob's presence
change reaches alice, and they exchange messages both ways (plain text and
html-lite).  Each step is printed.  The script exits 0 on success, 1 with
the reason on failure, and stops both servers by their PIDs either way.
"""

from __future__ import annotations

import json
import os
import queue
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

BIN = os.path.dirname(os.path.abspath(sys.executable))
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
WAIT = 20.0

SERVICES = {
    "alpha.test": ("127.0.0.41", "alice"),
    "beta.test": ("127.0.0.42", "bob"),
}

PASSWORDS = {"alice": "alice's demo password", "bob": "bob's demo password"}


class DemoFailed(Exception):
    """
    A step did not do what it should; the message says which.
    """


def freePort(host):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def step(text):
    print(f"\n==> {text}", flush=True)


def show(text):
    for line in text.rstrip("\n").splitlines():
        print(f"    {line}", flush=True)


class Service:
    """
    One imxd process serving one domain with the local backend.
    """

    def __init__(self, base, domain, host):
        self.domain = domain
        self.host = host
        self.port = freePort(host)
        self.apiPort = freePort(host)
        self.directory = os.path.join(base, domain)
        os.makedirs(self.directory)
        self.config = os.path.join(self.directory, "imxd.toml")
        self.process = None

    def write(self, peer, ca):
        leaf = ca.issue_cert(self.domain)
        leaf.cert_chain_pems[0].write_to_path(os.path.join(self.directory, "cert.pem"))
        leaf.private_key_pem.write_to_path(os.path.join(self.directory, "key.pem"))
        ca.cert_pem.write_to_path(os.path.join(self.directory, "ca.pem"))
        with open(self.config, "w") as f:
            f.write(
                "[server]\n"
                'state_dir = "state"\n'
                f'listen = ["tcp:port={self.port}:interface={self.host}"]\n'
                "[server.tls]\n"
                'policy = "required"\n'
                'ca_file = "ca.pem"\n'
                "[[peer]]\n"
                f'domain = "{peer.domain}"\n'
                f'host = "{peer.host}"\n'
                f"port = {peer.port}\n"
                "[[domain]]\n"
                f'name = "{self.domain}"\n'
                'backend = "local"\n'
                f'backend_options = {{ database = "local.sqlite", '
                f'listen = "tcp:{self.apiPort}:interface={self.host}" }}\n'
                'certificate = "cert.pem"\n'
                'key = "key.pem"\n'
            )

    @property
    def api(self):
        return f"http://{self.host}:{self.apiPort}"

    def start(self):
        self.log = open(os.path.join(self.directory, "twistd.log"), "w")
        self.process = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "imxd", "--config", self.config],
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def waitListening(self):
        deadline = time.monotonic() + WAIT
        for port in (self.port, self.apiPort):
            while True:
                if self.process.poll() is not None:
                    raise DemoFailed(f"imxd for {self.domain} exited:\n{self.output()}")
                try:
                    socket.create_connection((self.host, port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise DemoFailed(f"imxd for {self.domain} never listened on {port}")
                    time.sleep(0.05)

    def output(self):
        with open(os.path.join(self.directory, "twistd.log")) as f:
            return f.read()

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=WAIT)
        if self.process is not None:
            self.log.close()


class Person:
    """
    One user with their own `imx` session file.
    """

    def __init__(self, base, name, service):
        self.name = name
        self.address = f"{name}@{service.domain}"
        self.service = service
        self.environment = dict(
            os.environ, IMX_API=service.api, IMX_SESSION=os.path.join(base, f"{name}.session")
        )
        self.listener = None
        self.events = queue.Queue()

    def imx(self, *arguments, stdin=None):
        """
        Run `imx ARGUMENTS` as this person; print the command and its output.
        """
        print(f"    $ imx {shlex.join(arguments)}", flush=True)
        result = subprocess.run(
            [os.path.join(BIN, "imx"), *arguments],
            input=stdin,
            capture_output=True,
            text=True,
            env=self.environment,
            timeout=WAIT,
        )
        show(result.stdout + result.stderr)
        if result.returncode != 0:
            raise DemoFailed(f"imx {arguments[0]} as {self.address} exited {result.returncode}")
        return result.stdout

    def listen(self):
        """
        Start `imx listen --json` in the background, reading its events.
        """
        print(f"    $ imx listen --json &    ({self.address})", flush=True)
        self.listener = subprocess.Popen(
            [os.path.join(BIN, "imx"), "listen", "--json", "--timeout", "120"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.environment,
        )

        def read():
            for line in self.listener.stdout:
                self.events.put(line)

        threading.Thread(target=read, daemon=True).start()

    def expect(self, name, predicate=lambda data: True):
        """
        Wait (bounded) for an event called C{name} matching C{predicate}
        and print it.
        """
        deadline = time.monotonic() + WAIT
        while True:
            try:
                line = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise DemoFailed(f"{self.address} never got a {name} event") from None
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == name and predicate(event.get("data") or {}):
                show(f"{self.name} got {name}: {json.dumps(event['data'], ensure_ascii=False)}")
                return event["data"]

    def stop(self):
        if self.listener is not None and self.listener.poll() is None:
            os.kill(self.listener.pid, signal.SIGTERM)
            self.listener.wait(timeout=WAIT)


def demo(base):
    alpha = Service(base, "alpha.test", SERVICES["alpha.test"][0])
    beta = Service(base, "beta.test", SERVICES["beta.test"][0])
    import trustme

    ca = trustme.CA(organization_name="imxd demo CA")
    alpha.write(beta, ca)
    beta.write(alpha, ca)
    people = []
    try:
        step("Create one account on each service (imxctl user add)")
        for service, name in ((alpha, "alice"), (beta, "bob")):
            command = [os.path.join(BIN, "imxctl"), "-c", service.config, "user", "add",
                       f"{name}@{service.domain}", "--alias", name.title(), "--password-stdin"]
            print(f"    $ imxctl -c {service.domain}/imxd.toml user add {name}@{service.domain}", flush=True)
            result = subprocess.run(command, input=PASSWORDS[name] + "\n", capture_output=True,
                                    text=True, timeout=WAIT)
            show(result.stdout + result.stderr)
            if result.returncode != 0:
                raise DemoFailed("imxctl user add failed")

        step(f"Start imxd for alpha.test on {alpha.host}:{alpha.port} and beta.test on {beta.host}:{beta.port} (TLS required)")
        for service in (alpha, beta):
            service.start()
        for service in (alpha, beta):
            service.waitListening()
            show(f"{service.domain}: IMX on {service.host}:{service.port}, client API at {service.api}")

        alice = Person(base, "alice", alpha)
        bob = Person(base, "bob", beta)
        people = [alice, bob]
        step("alice and bob log in, and each starts listening for events")
        for person in people:
            person.imx("login", person.address, "--password-stdin", stdin=PASSWORDS[person.name] + "\n")
            person.listen()
        time.sleep(0.5)

        step("alice asks to see bob's presence")
        state = alice.imx("subscribe", bob.address).strip()
        if "pending" not in state:
            raise DemoFailed(f"expected the subscription to be pending, got {state!r}")
        bob.expect("subscription-request", lambda d: d.get("from") == alice.address)

        step("bob grants it")
        bob.imx("approve", alice.address)
        alice.expect("subscription-state", lambda d: d.get("state") == "granted")
        alice.expect("presence", lambda d: d.get("from") == bob.address)

        step("bob's presence changes; alice sees it")
        bob.imx("presence", "online", "--status", "at my desk")
        alice.expect("presence", lambda d: d.get("state") == "online" and d.get("status") == "at my desk")
        attributes = alice.imx("attributes", bob.address)
        if "presence=online" not in attributes:
            raise DemoFailed("alice should see bob's presence in his attributes")

        step("alice sends bob a plain-text message")
        alice.imx("send", bob.address, "Hello Bob, this crossed two servers.")
        bob.expect("message", lambda d: d.get("body") == "Hello Bob, this crossed two servers.")

        step("bob answers in html-lite (the script tag is removed on the way)")
        bob.imx("send", alice.address, "--html", "<p>Hi <b>Alice</b>!<script>alert(1)</script></p>")
        alice.expect("message", lambda d: d.get("body") == "<p>Hi <b>Alice</b>!</p>" and d.get("type") == "text/html-lite")

        step("The servers talk over TLS (imxctl status)")
        status = subprocess.run(
            [os.path.join(BIN, "imxctl"), "-c", alpha.config, "status"],
            capture_output=True, text=True, timeout=WAIT,
        )
        lines = [l for l in status.stdout.splitlines() if "tls" in l or "certified" in l]
        show("\n".join(lines))
        if not any(l.startswith("peer.beta.test.tls=TLSv1.") for l in lines):
            raise DemoFailed("alpha's connection to beta.test should be encrypted")

        step("Done: subscription, grant, presence and messages both ways worked, over TLS")
        return 0
    finally:
        for person in people:
            person.stop()
        for service in (alpha, beta):
            service.stop()


def main():
    base = tempfile.mkdtemp(prefix="imxd-demo-")
    try:
        return demo(base)
    except DemoFailed as e:
        print(f"\ndemo failed: {e}", file=sys.stderr)
        for domain in SERVICES:
            path = os.path.join(base, domain, "twistd.log")
            if os.path.exists(path):
                print(f"--- {domain} log (last lines) ---", file=sys.stderr)
                with open(path) as f:
                    print("".join(f.readlines()[-20:]), file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
