"""
imxd's benchmark: two imxd processes (A serving a.test on 127.0.0.2, B
serving b.test on 127.0.0.3, both with the C{link} backend) and a load
process (C{bench/load.py}) with link clients on both, measuring the route
sender -> imxd A -> IMX -> imxd B -> receiver, plus presence fan-out,
memory per connection and per subscription, start-up with 10,000 hosted
domains, and Prosody on the same route for comparison
(C{bench/prosody/run.py}).

    python bench/run.py            # everything (about 10 minutes)
    python bench/run.py --quick    # scenario 1, shortened (under a minute)

Prints a table, writes C{bench/results.json} (C{--json PATH}), and prints
the JSON as its last line.  Every process is stopped by its PID; every
wait is bounded.  C{docs/performance.md} explains the method.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PYTHON = sys.executable
TWISTD = [os.path.join(os.path.dirname(PYTHON), "twistd")]
SECRET = "bench-link-secret-0123456789"

#: Seconds any one wait may take at most.
WAIT = 60.0

HOSTS = {"a": "127.0.0.2", "b": "127.0.0.3"}
IMX_PORT, LINK_PORT = 5275, 5280

#: The scenarios of the full run: name, load kind, spec, TLS between the
#: servers.
SCENARIOS = [
    ("1 pair, 100,000, 1,000 in flight", "throughput", {"pairs": 1, "messages": 100_000, "inFlight": 1000}),
    ("10 pairs x 10,000, 100 in flight each", "throughput", {"pairs": 10, "messages": 10_000, "inFlight": 100}),
    ("paced 1,000/s", "paced", {"messages": 10_000, "rate": 1000}),
    ("paced 5,000/s", "paced", {"messages": 25_000, "rate": 5000}),
    ("ping-pong, 1 in flight", "pingpong", {"messages": 5_000}),
]
QUICK = [("1 pair, 20,000, 1,000 in flight", "throughput", {"pairs": 1, "messages": int(os.environ.get("BENCH_MESSAGES", 20_000)), "inFlight": 1000})]


def freeFiles():
    """
    Let this process and its children open enough sockets for 1,000
    connections.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))


def waitPort(host, port, process, what, timeout=WAIT):
    """
    Wait until C{host:port} accepts connections.

    @return: the seconds it took.
    """
    start = time.monotonic()
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return time.monotonic() - start
        except OSError:
            pass
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"{what} did not listen on {host}:{port} within {timeout} s")
        time.sleep(0.02)


def rssMiB(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Certificates:
    """
    A trustme CA and a certificate per bench domain, as PEM files.
    """

    def __init__(self, directory):
        import trustme

        self.directory = directory
        ca = trustme.CA()
        self.caFile = os.path.join(directory, "ca.pem")
        ca.cert_pem.write_to_path(self.caFile)
        self._ca = ca

    def issue(self, domain):
        leaf = self._ca.issue_cert(domain)
        certificate = os.path.join(self.directory, f"{domain}.pem")
        key = os.path.join(self.directory, f"{domain}.key")
        leaf.cert_chain_pems[0].write_to_path(certificate)
        leaf.private_key_pem.write_to_path(key)
        return certificate, key


class Server:
    """
    One imxd process for the benchmark.
    """

    def __init__(self, base, name, domains, peers, tls=None):
        self.name = name
        self.host = HOSTS[name]
        self.domains = domains
        self.peers = peers
        self.tls = tls
        self.directory = os.path.join(base, name)
        os.makedirs(self.directory, exist_ok=True)
        self.process = None

    def config(self):
        lines = [
            "[server]",
            'state_dir = "state"',
            f'listen = ["tcp:port={IMX_PORT}:interface={self.host}"]',
            "[server.limits]",
            "max_connections_total = 5000",
            "max_connections_per_address = 2000",
            # The pool opens a connection per remote domain (fan-out: 100
            # domains of B), each authenticated by dial-back.
            "max_connections_per_domain = 256",
            "max_pending_dialbacks_per_address = 256",
            f"rate_exempt_domains = {json.dumps(sorted(self.peers))}",
        ]
        if self.tls is not None:
            lines += ["[server.tls]", 'policy = "required"', f'ca_file = "{self.tls.caFile}"']
        else:
            lines += ["[server.tls]", 'policy = "off"']
        for domain, host in sorted(self.peers.items()):
            lines += ["[[peer]]", f'domain = "{domain}"', f'host = "{host}"', f"port = {IMX_PORT}"]
        listen = f"tcp:{LINK_PORT}:interface={self.host}"
        for domain in self.domains:
            lines += [
                "[[domain]]",
                f'name = "{domain}"',
                'backend = "link"',
                f'backend_options = {{ listen = "{listen}", secret = "{SECRET}" }}',
            ]
            if self.tls is not None:
                certificate, key = self.tls.issue(domain)
                lines += [f'certificate = "{certificate}"', f'key = "{key}"']
            lines += ["[domain.policy]", "account_rate = 0"]
        return "\n".join(lines) + "\n"

    def start(self):
        """
        Start twistd and wait until both its listeners accept.

        @return: the seconds until the IMX listener accepted.
        """
        path = os.path.join(self.directory, "imxd.toml")
        with open(path, "w") as f:
            f.write(self.config())
        self.log = open(os.path.join(self.directory, "twistd.log"), "ab")
        self.process = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "imxd", "--config", path],
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        try:
            startup = waitPort(self.host, IMX_PORT, self.process, f"imxd {self.name}")
            waitPort(self.host, LINK_PORT, self.process, f"imxd {self.name}'s link listener")
        except RuntimeError as e:
            with open(os.path.join(self.directory, "twistd.log"), errors="replace") as f:
                raise RuntimeError(f"{e}:\n{f.read()[-2000:]}") from None
        return startup

    def status(self):
        """
        @return: the server's C{imxctl status} lines, as a dict.
        """
        command = [os.path.join(os.path.dirname(PYTHON), "imxctl"), "--socket",
                   os.path.join(self.directory, "state", "admin.sock"), "status"]
        out = subprocess.run(command, capture_output=True, text=True, timeout=WAIT).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def stop(self):
        """
        Stop the process by its PID (TERM, then KILL).
        """
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=WAIT)
        self.log.close()


class Pair:
    """
    imxd A and imxd B, started fresh for one scenario.
    """

    def __init__(self, tls, domainsB=("b.test",)):
        self.base = tempfile.mkdtemp(prefix="imxd-bench-")
        certificates = Certificates(self.base) if tls else None
        peersOfA = {domain: HOSTS["b"] for domain in domainsB}
        self.a = Server(self.base, "a", ["a.test"], peersOfA, certificates)
        self.b = Server(self.base, "b", list(domainsB), {"a.test": HOSTS["a"]}, certificates)

    def __enter__(self):
        try:
            self.a.start()
            self.b.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for server in (self.a, self.b):
            server.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def load(self, kind, spec, timeout=600):
        """
        Run the load process for one scenario.

        @return: its figures.
        """
        spec = dict(
            spec,
            kind=kind,
            name=kind,
            secret=SECRET,
            pids={"a": self.a.process.pid, "b": self.b.process.pid},
            linkA=[HOSTS["a"], LINK_PORT],
            linkB=[HOSTS["b"], LINK_PORT],
            imxA=[HOSTS["a"], IMX_PORT],
            domainsA=self.a.domains,
            domainsB=self.b.domains,
        )
        load = subprocess.Popen(
            [PYTHON, os.path.join(HERE, "load.py"), json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            out, err = load.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(load.pid, signal.SIGKILL)
            load.wait()
            raise RuntimeError(f"the load process for {kind} did not finish in {timeout} s")
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if load.returncode or not lines:
            raise RuntimeError(f"the load process for {kind} failed:\n{err[-3000:]}")
        return json.loads(lines[-1])


def messageScenarios(scenarios, modes):
    """
    @return: the figures of each message scenario, in each mode.
    """
    results = []
    for label, kind, spec in scenarios:
        for mode in modes:
            with Pair(tls=mode == "tls") as pair:
                figures = pair.load(kind, spec)
                # Messages whose answer came before imxd A's grouped commit
                # was put together: never written to its queue.
                status = pair.a.status()
                figures["never_written"] = int(status.get("queue-never-written", -1))
                # ... and of those, answered with their outcome (DELIVERED
                # instead of ACK and a REPORT request).
                figures["outcome_answers"] = int(status.get("queue-outcome-answers", -1))
            figures.update(scenario=label, transport=mode)
            results.append(figures)
            print(_row(figures), flush=True)
    return results


def fanout():
    """
    One presence change to 10,000 subscribers on 100 domains of B.
    """
    domains = [f"fan{n}.test" for n in range(100)]
    with Pair(tls=False, domainsB=domains) as pair:
        return pair.load("fanout", {"subscribers": 10_000})


def perConnection():
    with Pair(tls=False) as pair:
        return pair.load("connections", {"connections": 1000})


def perSubscription():
    with Pair(tls=False) as pair:
        return pair.load("subscriptions", {"subscriptions": 100_000}, timeout=900)


def startup(count=10_000):
    """
    Start-up time and resident memory with C{count} hosted domains (link
    backends on one listener), against one.
    """
    figures = {}
    for domains in (1, count):
        base = tempfile.mkdtemp(prefix="imxd-bench-")
        server = Server(base, "a", [f"d{n}.test" for n in range(domains)], {})
        try:
            seconds = server.start()
            time.sleep(1.0)
            figures[domains] = {"seconds": round(seconds, 2), "rss_mib": round(rssMiB(server.process.pid), 1)}
        finally:
            server.stop()
            shutil.rmtree(base, ignore_errors=True)
    one, many = figures[1], figures[count]
    return {
        "domains": count,
        "seconds": many["seconds"],
        "rss_mib": many["rss_mib"],
        "rss_mib_one_domain": one["rss_mib"],
        "kib_per_domain": round((many["rss_mib"] - one["rss_mib"]) * 1024 / (count - 1), 2),
    }


def prosody(messages, inFlight=1000, paced=None):
    """
    The same route through Prosody 0.12 (C{bench/prosody/run.py}).

    @return: its figures, or C{{"error": ...}} when it cannot run.
    """
    command = [PYTHON, os.path.join(HERE, "prosody", "run.py"), "--messages", str(messages)]
    command += ["--paced", str(paced)] if paced else ["--in-flight", str(inFlight)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:] or "failed"}
    return json.loads(lines[-1])


def _row(f):
    cpu = f.get("cpu_us_per_message", {})
    rss = f.get("rss_mib", {})
    return (
        f"{f['scenario']:<40} {f['transport']:<5} {f['rate']:>9,.0f} {f['p50_ms']!s:>8} "
        f"{f['p99_ms']!s:>8} {cpu.get('a')!s:>7} {cpu.get('b')!s:>7} {cpu.get('load')!s:>7} "
        f"{rss.get('a', {}).get('idle')!s:>6}/{rss.get('a', {}).get('after')!s:<6} "
        f"{rss.get('b', {}).get('idle')!s:>6}/{rss.get('b', {}).get('after')!s:<6} {f['lost']:>4}"
    )


HEADER = (
    f"{'scenario':<40} {'mode':<5} {'msg/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
    f"{'µs/A':>7} {'µs/B':>7} {'µs/load':>7} {'RSS A idle/after':>14} {'RSS B idle/after':>14} {'lost':>4}"
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="scenario 1 only, shortened")
    parser.add_argument("--json", help="where to write the JSON (default bench/results.json, quick: bench/results-quick.json)")
    parser.add_argument("--no-prosody", action="store_true", help="skip the Prosody comparison")
    parser.add_argument(
        "--only", choices=["fanout", "connections", "subscriptions", "startup"],
        help="run one of the other measurements alone",
    )
    parser.add_argument(
        "--scenario", metavar="TEXT",
        help="run only the message scenarios whose name contains TEXT (for example 'paced 5,000')",
    )
    parser.add_argument(
        "--mode", choices=["plain", "tls"], action="append",
        help="with --scenario: only this transport (may be given twice; default both)",
    )
    options = parser.parse_args(argv)
    if options.json is None:
        options.json = os.path.join(HERE, "results-quick.json" if options.quick else "results.json")
    freeFiles()
    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "kernel": platform.release(),
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if options.only:
        extra = {"fanout": fanout, "connections": perConnection,
                 "subscriptions": perSubscription, "startup": startup}[options.only]()
        print(json.dumps(extra), flush=True)
        return 0
    print(HEADER, flush=True)
    if options.scenario:
        chosen = [s for s in SCENARIOS if options.scenario in s[0]]
        if not chosen:
            parser.error(f"no scenario name contains {options.scenario!r}")
        results["scenarios"] = messageScenarios(chosen, options.mode or ["plain", "tls"])
    elif options.quick:
        results["scenarios"] = messageScenarios(QUICK, ["plain"])
    else:
        results["scenarios"] = messageScenarios(SCENARIOS, ["plain", "tls"])
        results["fanout"] = fanout()
        print("presence fan-out:", json.dumps(results["fanout"]), flush=True)
        results["connections"] = perConnection()
        print("per idle peer connection:", json.dumps(results["connections"]), flush=True)
        results["subscriptions"] = perSubscription()
        print("per subscription:", json.dumps(results["subscriptions"]), flush=True)
        results["startup"] = startup()
        print("start-up:", json.dumps(results["startup"]), flush=True)
        if not options.no_prosody:
            results["prosody"] = {
                "throughput": prosody(100_000),
                "paced_5000": prosody(25_000, paced=5000),
            }
            ours = results["scenarios"][0]["rate"]
            theirs = results["prosody"]["throughput"].get("rate")
            results["ratio_to_prosody"] = round(ours / theirs, 2) if theirs else None
            print("prosody:", json.dumps(results["prosody"]), flush=True)
            print("imxd / prosody (scenario 1, plain):", results["ratio_to_prosody"], flush=True)
    with open(options.json, "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results), flush=True)
    lost = sum(s["lost"] for s in results["scenarios"])
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
