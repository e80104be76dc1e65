"""
CPU per message of the whole route, in one process and without sockets:
link client -> imxd A -> IMX -> imxd B -> link client, over in-memory
connections (the test suite's L{tests.network.Network}), with file
databases.  Steadier than C{make bench} on a shared machine, for
comparing changes to the per-message path; C{--profile} prints where the
time goes.

    .venv/bin/python bench/path.py [--messages N] [--repeat R] [--profile]
"""

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from imxd.config import LimitsConfig, QueueConfig  # noqa: E402
from imxd.store import Database  # noqa: E402
from imxd.tap import settleGarbageCollector  # noqa: E402
from tests.linking import RecordingHandler  # noqa: E402
from tests.network import Network, linkClient, linkTable, message  # noqa: E402

SECRET = b"bench-link-secret-0123456789"


class Receiver(RecordingHandler):
    """
    Counts what arrives instead of keeping it.
    """

    def __init__(self):
        super().__init__()
        self.received = 0

    def deliverMessage(self, message):
        self.received += 1

    def deliveryReport(self, report):
        self.received += 1


def route(directory, writeBehind=0.0):
    """
    @param writeBehind: the queues' C{write_behind}: 0 writes every message
        (the series of instruction counts in docs/performance.md); the
        shipped default leaves unwritten, as on the loaded servers, every
        message answered before the network's clock moves on.
    @return: the network and the two link clients.
    """
    network = Network()
    servers = []
    for name, host in (("a", "127.0.0.2"), ("b", "127.0.0.3")):
        database = Database(os.path.join(directory, f"{name}.sqlite"), network.clock, "normal")
        table = dict(linkTable(f"{name}.test", SECRET), policy={"account_rate": 0})
        limits = LimitsConfig(rateExemptDomains=("a.test", "b.test"))
        servers.append(
            network.server(host, [table], database=database, limits=limits, writeBehind=writeBehind)
        )
    alice, bob = Receiver(), Receiver()
    clientA = linkClient(network, servers[0], ["a.test"], alice, {"a.test": SECRET})
    linkClient(network, servers[1], ["b.test"], bob, {"b.test": SECRET})
    return network, clientA, alice, bob


def run(network, client, count, batch, start=0):
    """
    Send C{count} messages from A to B, C{batch} at a time.
    """
    for first in range(start, start + count, batch):
        for n in range(first, first + batch):
            client.sendMessage(message("alice@a.test", "bob@b.test", f"m-{n}", body=b"x" * 100))
        network.flush()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=5, help="rounds; the best and the median are printed")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--write-behind",
        type=float,
        default=0.0,
        help="the queues' write_behind (default 0: every message written; "
        f"the shipped default is {QueueConfig().writeBehind:g})",
    )
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="imxd-path-") as directory:
        network, client, alice, bob = route(directory, options.write_behind)
        run(network, client, 2 * options.batch, options.batch, start=-2 * options.batch)
        settleGarbageCollector()
        profile = cProfile.Profile() if options.profile else None
        costs = []
        for round_ in range(options.repeat):
            started = time.process_time()
            if profile:
                profile.enable()
            run(network, client, options.messages, options.batch, start=round_ * options.messages)
            if profile:
                profile.disable()
            costs.append(1e6 * (time.process_time() - started) / options.messages)
        total = options.repeat * options.messages + 2 * options.batch
        assert bob.received == total and alice.received == total, (bob.received, alice.received)
        costs.sort()
        print(
            f"{options.repeat} x {options.messages} messages: µs CPU per message (both servers"
            f" and both link clients): best {costs[0]:.1f}, median {costs[len(costs) // 2]:.1f}"
        )
        if profile:
            pstats.Stats(profile).sort_stats("tottime").print_stats(35)
    return 0


if __name__ == "__main__":
    sys.exit(main())
