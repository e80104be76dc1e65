"""
A live federation on loopback for integration tests: a real DNS server
(C{twistd dns} serving a Python zone with C{_imx._tcp} SRV records) and real
C{twistd -n imxd} processes, each on its own 127.0.0.x address with
C{spool} backends, so a test sends by dropping a file and sees delivery as a
file.  Every process is stopped by its PID; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

from imxd.imxctl import BlockingPeer
from tests.support import TWISTD, WAIT


def freePort(host: str) -> int:
    """
    @return: a TCP port on C{host} that was free a moment ago.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def waitFor(predicate, what: str, timeout: float = WAIT):
    """
    Poll C{predicate} until it returns something true (at most C{timeout}
    seconds).

    @return: what it returned.
    @raise AssertionError: naming C{what}, on timeout.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Server:
    """
    One imxd process: its address, domains, spools and admin socket.
    """

    def __init__(self, base: str, name: str, host: str, domains, port=None, backend="spool",
                 domainOptions=None, apiTLS=None, serverLines=()):
        """
        @param backend: C{"spool"} or C{"local"}; a local server's client
            API listens on C{host:apiPort}.
        @param domainOptions: extra TOML lines per domain name.
        @param serverLines: extra TOML lines after the server's own tables
            (C{[server.queue]}, C{[server.limits]}, ...).
        @param apiTLS: C{(certificate, key)} PEM paths to serve the client
            API over HTTPS, or L{None}.
        """
        self.apiTLS = apiTLS
        self.name = name
        self.host = host
        self.port = port or freePort(host)
        self.backend = backend
        self.apiPort = freePort(host)
        self.domainOptions = domainOptions or {}
        self.domains = list(domains)
        self.serverLines = list(serverLines)
        self.directory = os.path.join(base, name)
        os.makedirs(self.directory, exist_ok=True)
        self.process = None
        self._serial = 0

    def config(self, dnsPort: int) -> str:
        """
        @return: the TOML configuration of this server.
        """
        lines = [
            "[server]",
            'state_dir = "state"',
            f'listen = ["tcp:port={self.port}:interface={self.host}"]',
            f'dns_servers = ["127.0.0.1:{dnsPort}"]',
            "[server.timeouts]",
            "connect = 2.0",
            "dialback = 5.0",
            *self.serverLines,
        ]
        for domain in self.domains:
            lines += [
                "[[domain]]",
                f'name = "{domain}"',
                *self.backendLines(domain),
                *self.domainOptions.get(domain, ()),
            ]
        return "\n".join(lines) + "\n"

    def backendLines(self, domain: str) -> list:
        """
        @return: the TOML lines choosing the domain's backend.
        """
        if self.backend == "local":
            listen = f"tcp:{self.apiPort}:interface={self.host}"
            if self.apiTLS:
                certificate, key = self.apiTLS
                listen = (f"ssl:{self.apiPort}:interface={self.host}:"
                          f"certKey={certificate}:privateKey={key}")
            return [
                'backend = "local"',
                f'backend_options = {{ database = "local.sqlite", listen = "{listen}" }}',
            ]
        return [
            'backend = "spool"',
            f'backend_options = {{ directory = "spool-{domain}", poll_interval = 0.05 }}',
        ]

    @property
    def api(self) -> str:
        """
        The client API's base URL (local backend).
        """
        return f"http://{self.host}:{self.apiPort}"

    def addUser(self, address: str, password: str, alias=None) -> None:
        """
        Create an account in the local backend's database (before or while
        the server runs).
        """
        from imxd.backend.local.store import AccountStore

        store = AccountStore(os.path.join(self.directory, "local.sqlite"))
        try:
            store.addUser(address, password, alias)
        finally:
            store.close()

    def start(self, dnsPort: int) -> None:
        """
        Start twistd on the configuration and wait until it listens.
        """
        path = os.path.join(self.directory, "imxd.toml")
        with open(path, "w") as f:
            f.write(self.config(dnsPort))
        self.log = open(os.path.join(self.directory, "twistd.log"), "a")
        self.process = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "imxd", "--config", path],
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def waitListening(self) -> None:
        """
        Wait (bounded) until the server accepts connections.
        """

        def listening():
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited:\n{self.output()}")
            ports = [self.port] + ([self.apiPort] if self.backend == "local" else [])
            try:
                for port in ports:
                    with socket.create_connection((self.host, port), timeout=1.0):
                        pass
                return True
            except OSError:
                return False

        waitFor(listening, f"{self.name} to listen")

    def stop(self, sig=signal.SIGKILL) -> None:
        """
        Stop the process by its PID and wait for it.
        """
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, sig)
            self.process.wait(timeout=WAIT)
        if self.process is not None:
            self.log.close()

    def output(self) -> str:
        """
        @return: what the process logged.
        """
        with open(os.path.join(self.directory, "twistd.log")) as f:
            return f.read()

    # -- spools ---------------------------------------------------------------

    def spool(self, domain: str, *parts: str) -> str:
        return os.path.join(self.directory, f"spool-{domain}", *parts)

    def send(self, sender: str, recipient: str, body: str) -> str:
        """
        Drop a message into the sender's outbox.

        @return: the file's name (also the message id, without C{.json}).
        """
        domain = sender.split("@")[1]
        self._serial += 1
        name = f"{self.name}-{self._serial:05d}-{time.monotonic_ns()}.json"
        scratch = self.spool(domain, "tmp", "." + name)
        os.makedirs(os.path.dirname(scratch), exist_ok=True)
        with open(scratch, "w") as f:
            json.dump({"from": sender, "to": recipient, "body": body}, f)
        os.replace(scratch, self.spool(domain, "outbox", name))
        return name

    def outcome(self, domain: str, name: str):
        """
        @return: C{"delivered"}, C{"sent"} (accepted, in imxd's queue),
            the failure report (a dict), or L{None} while the file is still
            in the outbox.
        """
        if os.path.exists(self.spool(domain, "delivered", name)):
            return "delivered"
        if os.path.exists(self.spool(domain, "sent", name)):
            return "sent"
        report = self.spool(domain, "failed", name + ".error")
        if os.path.exists(report):
            with open(report) as f:
                return json.load(f)
        return None

    def waitSent(self, domain: str, name: str) -> None:
        """
        Wait until the receiving server has acknowledged the file's message.
        """
        outcome = waitFor(
            lambda: self.outcome(domain, name) not in (None, "sent") and self.outcome(domain, name),
            f"{name} to be delivered from {domain}",
        )
        if outcome != "delivered":
            raise AssertionError(f"{name} failed: {outcome}\n{self.output()}")

    def inbox(self, domain: str):
        """
        @return: the messages delivered to C{domain}, oldest first.
        """
        directory = self.spool(domain, "inbox")
        if not os.path.isdir(directory):
            return []
        messages = []
        for name in sorted(os.listdir(directory)):
            with open(os.path.join(directory, name)) as f:
                messages.append(json.load(f))
        return messages

    def status(self) -> dict:
        """
        @return: the server's STATUS lines as a dict, through C{imxctl}.
        """
        result = subprocess.run(
            [*IMXCTL, "-s", self.adminSocket(), "status"],
            capture_output=True,
            text=True,
            timeout=WAIT,
        )
        if result.returncode:
            raise AssertionError(f"imxctl status failed: {result.stderr}")
        return dict(line.split("=", 1) for line in result.stdout.splitlines())

    def adminSocket(self) -> str:
        return os.path.join(self.directory, "state", "admin.sock")

    def raw(self, toDomain=None) -> BlockingPeer:
        """
        @return: a raw IMX connection to this server, HELLO done.
        """
        connection = socket.create_connection((self.host, self.port), timeout=WAIT)
        return BlockingPeer(connection, toDomain=toDomain)


class APIClient:
    """
    One user of a local domain, speaking the client API over HTTP.
    """

    def __init__(self, server: Server, address: str, password: str, context=None):
        """
        @param context: an C{ssl.SSLContext} to speak HTTPS, or L{None}.
        """
        self.server = server
        self.address = address
        self.context = context
        status, body = self.call(
            "POST", "sessions", {"address": address, "password": password}, token=None
        )
        if status != 201:
            raise AssertionError(f"login of {address} failed: {status} {body}")
        self.token = body["token"]
        self.events = []
        self._streams = []

    def call(self, method, path, body=None, token=True):
        """
        @return: C{(status, decoded JSON or None)}.
        """
        from urllib.parse import quote

        connection = self._connect(WAIT)
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            connection.request(
                method,
                "/v1/" + quote(path, safe="/@"),
                json.dumps(body).encode() if body is not None else None,
                headers,
            )
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        return response.status, (json.loads(data) if data else None)

    def listen(self) -> None:
        """
        Open an event stream (read with L{imxd.client.EventStream}) by a
        thread into C{events} (C{(name, data)} pairs); closed by L{close}.
        """
        import threading

        from imxd.client import Client

        scheme = "https" if self.context is not None else "http"
        client = Client(f"{scheme}://{self.server.host}:{self.server.apiPort}", self.token,
                        context=self.context)
        stream = client.events(timeout=60)
        self._streams.append(stream)

        def read():
            try:
                while (event := stream.next(None)) is not None:
                    self.events.append((event.name, event.data))
            except Exception:  # the stream was closed under the reader
                return

        threading.Thread(target=read, daemon=True).start()

    def _connect(self, timeout):
        import http.client

        if self.context is not None:
            return http.client.HTTPSConnection(
                self.server.host, self.server.apiPort, timeout=timeout, context=self.context
            )
        return http.client.HTTPConnection(self.server.host, self.server.apiPort, timeout=timeout)

    def named(self, name):
        """
        @return: the data of the events called C{name} so far.
        """
        return [data for event, data in list(self.events) if event == name]

    def waitEvent(self, name, predicate=lambda data: True):
        """
        Wait (bounded) for an event called C{name} matching C{predicate}.
        """
        return waitFor(
            lambda: [d for d in self.named(name) if predicate(d)],
            f"{self.address}: {name} event",
        )[0]

    def close(self) -> None:
        """
        Close every event stream.
        """
        for stream in self._streams:
            stream.close()


IMXCTL = [
    TWISTD[0],
    "-c",
    "import sys; from imxd.imxctl import main; sys.exit(main())",
]


class DNSServer:
    """
    C{twistd dns} serving the zone C{test} from Python source, on
    127.0.0.1 unless another loopback address is given.
    """

    def __init__(self, base: str, interface: str = "127.0.0.1"):
        self.directory = os.path.join(base, "dns")
        os.makedirs(self.directory, exist_ok=True)
        self.interface = interface
        self.port = freePort(interface)
        self.records = []
        self.process = None

    def target(self, domain: str, name: str, host: str, port: int, priority=0) -> None:
        """
        Publish C{_imx._tcp.<domain>} pointing at C{name}, whose address
        is C{host}.
        """
        self.records.append(f"SRV('_imx._tcp.{domain}', {priority}, 0, {port}, '{name}', ttl=2)")
        self.records.append(f"A('{name}', '{host}', ttl=2)")

    def serve(self, server: Server, domain: str, priority=10) -> None:
        """
        Publish C{_imx._tcp.<domain>} pointing at C{server}.
        """
        self.target(domain, f"imx-{server.name}.test", server.host, server.port, priority)

    def dead(self, domain: str, host: str, port: int, priority=0) -> None:
        """
        Publish a target for C{domain} where nothing listens.
        """
        self.target(domain, f"dead-{host.replace('.', '-')}.test", host, port, priority)

    def start(self) -> None:
        """
        Write the zone and start the server; wait until it answers over TCP.
        """
        zone = os.path.join(self.directory, "test.zone.py")
        with open(zone, "w") as f:
            f.write("zone = [\n")
            f.write("    SOA('test', mname='ns.test', rname='root.test', serial=1,"
                    " refresh=60, retry=60, expire=60, minimum=1, ttl=2),\n")
            for record in sorted(set(self.records)):
                f.write(f"    {record},\n")
            f.write("]\n")
        self.log = open(os.path.join(self.directory, "twistd.log"), "a")
        self.process = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "dns", "--pyzone", zone,
             "--interface", self.interface, "--port", str(self.port)],
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

        def answering():
            if self.process.poll() is not None:
                raise AssertionError("the DNS server exited")
            try:
                with socket.create_connection((self.interface, self.port), timeout=1.0):
                    return True
            except OSError:
                return False

        waitFor(answering, "the DNS server")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=WAIT)
        if self.process is not None:
            self.log.close()
