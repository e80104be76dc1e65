"""
The benchmark's load process: link clients to imxd A (a.test) and imxd B
(b.test) that send, receive and time messages, subscriptions and
notifications, and read the two servers' CPU time and resident memory
from /proc.

Run by C{bench/run.py} as C{python bench/load.py SPEC}, SPEC a JSON object
(see L{main}); prints one JSON line with the figures.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from array import array

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, protocol, task  # noqa: E402

from imxd.link import LinkClient, LinkHandler  # noqa: E402
from imxd.peer import Refused  # noqa: E402
from imxd.tap import settleGarbageCollector  # noqa: E402
from imxd.wire import PREAMBLE, Hello, Message, encodeRecord  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
BODY = b"x" * 100

#: Seconds without progress after which a run stops waiting.
STALL = 30.0


def cpuSeconds(pid):
    """
    @return: user + system CPU seconds used so far by process C{pid}.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rssMiB(pid):
    """
    @return: the resident memory of process C{pid}, in MiB.
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def percentile(values, fraction):
    """
    @return: the value below which C{fraction} of C{values} lie.
    """
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _accepted(result, *args):
    pass


class Receiver(LinkHandler):
    """
    B's backend (and A's, for replies and reports): counts and times what
    arrives, and accepts every subscription.
    """

    def __init__(self, run):
        self.run = run
        self.reports = 0
        self.failedReports = 0
        self.notified = 0

    def deliverMessage(self, message):
        self.run.received(message)

    def deliveryReport(self, report):
        self.reports += 1
        if report.code is not None:
            self.failedReports += 1

    def decideSubscription(self, subscriber, publisher):
        return "granted"

    def deliverNotification(self, notification):
        self.notified += len(notification.subscribers)
        self.run.progress = time.perf_counter()


class Run:
    """
    One scenario against the two servers.
    """

    def __init__(self, reactor, spec):
        self.reactor = reactor
        self.spec = spec
        self.pids = dict(spec["pids"], load=os.getpid())
        # By serial number (the end of each MESSAGE_ID): when it was sent
        # (-1 if it was sent again under another), and whether it arrived.
        self.sentAt = array("d")
        self.arrived = bytearray()
        # Messages from this serial on count (not the warm-up's).
        self.firstSerial = 0
        self.delivered = 0
        self.latencies = []
        self.duplicates = 0
        self.refusals = 0
        self.progress = time.perf_counter()
        self.prefix = f"{spec['name']}-{os.getpid()}-"
        self.serial = 0
        self.onReceive = None
        self.handlerA = Receiver(self)
        self.handlerB = Receiver(self)
        self.a = self._client(spec["linkA"], spec["domainsA"], self.handlerA)
        self.b = self._client(spec["linkB"], spec["domainsB"], self.handlerB)

    def _client(self, address, domains, handler):
        host, port = address
        secrets = {domain: self.spec["secret"] for domain in domains}
        client = LinkClient(self.reactor, f"tcp:{host}:{port}", secrets, handler)
        client.startService()
        return client

    # -- sending and receiving ----------------------------------------------------

    def send(self, client, sender, recipient):
        """
        Send one message and note when.
        """
        serial = self.serial
        self.serial += 1
        messageId = f"{self.prefix}{serial}"
        self.sentAt.append(time.perf_counter())
        self.arrived.append(0)
        client.sendMessageThen(
            Message(
                sender=sender,
                recipient=recipient,
                messageId=messageId,
                contentType="text/plain",
                body=BODY,
            ),
            _accepted,
            self._refused,
            client,
            sender,
            recipient,
            messageId,
        )

    def _refused(self, failure, client, sender, recipient, messageId):
        """
        A refused message is sent again after the wait imxd asked for (a
        real gateway would), and counted.
        """
        self.refusals += 1
        delay = getattr(failure.value, "retryAfter", None) or 1
        if isinstance(failure.value, Refused) and failure.value.temporary:
            self.sentAt[int(messageId[len(self.prefix) :])] = -1.0
            self.reactor.callLater(delay, self.send, client, sender, recipient)

    def received(self, message):
        now = time.perf_counter()
        self.progress = now
        serial = int(message.messageId[len(self.prefix) :])
        if self.arrived[serial]:
            self.duplicates += 1
            return
        self.arrived[serial] = 1
        if serial < self.firstSerial:
            return
        self.delivered += 1
        sentAt = self.sentAt[serial]
        if sentAt >= 0:
            self.latencies.append(now - sentAt)
        if self.onReceive is not None:
            self.onReceive(message)

    # -- helpers ------------------------------------------------------------------

    @defer.inlineCallbacks
    def waitUntil(self, predicate, what):
        """
        Wait until C{predicate()} holds, or fail after L{STALL} seconds
        without progress.
        """
        while not predicate():
            if time.perf_counter() - self.progress > STALL:
                raise RuntimeError(
                    f"stalled waiting for {what}: {self.delivered} messages and "
                    f"{self.handlerB.notified} notifications received"
                )
            yield task.deferLater(self.reactor, 0.01, lambda: None)

    def usage(self):
        """
        @return: C{{pid: (cpu seconds, rss MiB)}} of both servers now.
        """
        return {name: (cpuSeconds(pid), rssMiB(pid)) for name, pid in self.pids.items()}

    @defer.inlineCallbacks
    def warm(self, count=200):
        """
        Open the federation (dial-back) and the links before measuring.
        """
        yield self.a.whenLinked()
        yield self.b.whenLinked()
        for n in range(count):
            self.send(self.a, f"warm{n % 10}@a.test", f"warm{n % 10}@b.test")
        yield self.waitUntil(lambda: self.delivered >= count, "the warm-up")
        yield task.deferLater(self.reactor, 0.5, lambda: None)
        self.latencies = []
        self.delivered = 0
        self.firstSerial = self.serial
        # As imxd does once it runs (imxd.tap.settleGarbageCollector).
        settleGarbageCollector()

    def figures(self, before, after, messages, elapsed):
        """
        @return: the scenario's figures as a dict.
        """
        result = {
            "messages": messages,
            "delivered": self.delivered,
            "lost": messages - self.delivered,
            "duplicates": self.duplicates,
            "refusals": self.refusals,
            "seconds": round(elapsed, 3),
            "rate": round(self.delivered / elapsed, 1) if elapsed else None,
            "p50_ms": _ms(percentile(self.latencies, 0.50)),
            "p99_ms": _ms(percentile(self.latencies, 0.99)),
            "cpu_us_per_message": {},
            "rss_mib": {},
        }
        for name in self.pids:
            cpu = after[name][0] - before[name][0]
            result["cpu_us_per_message"][name] = round(cpu / max(messages, 1) * 1e6, 1)
            result["rss_mib"][name] = {
                "idle": round(before[name][1], 1),
                "after": round(after[name][1], 1),
            }
        return result

    # -- scenarios ------------------------------------------------------------------

    @defer.inlineCallbacks
    def throughput(self):
        """
        C{pairs} sender/receiver pairs, each sending C{messages} with at
        most C{inFlight} not yet received.
        """
        spec = self.spec
        pairs, each, window = spec["pairs"], spec["messages"], spec["inFlight"]
        yield self.warm()
        remaining = {p: each for p in range(pairs)}
        inFlight = {p: 0 for p in range(pairs)}
        senders = {p: f"sender{p}@a.test" for p in range(pairs)}
        receivers = {p: f"receiver{p}@b.test" for p in range(pairs)}
        pairOf = {receiver: p for p, receiver in receivers.items()}

        def pump(p):
            sender, receiver = senders[p], receivers[p]
            while inFlight[p] < window and remaining[p]:
                remaining[p] -= 1
                inFlight[p] += 1
                self.send(self.a, sender, receiver)

        def onReceive(message):
            p = pairOf[message.recipient]
            inFlight[p] -= 1
            pump(p)

        self.onReceive = onReceive
        before = self.usage()
        start = time.perf_counter()
        self.progress = start
        for p in range(pairs):
            pump(p)
        total = pairs * each
        yield self.waitUntil(lambda: self.delivered >= total, "every message")
        elapsed = time.perf_counter() - start
        after = self.usage()
        return self.figures(before, after, total, elapsed)

    @defer.inlineCallbacks
    def paced(self):
        """
        C{messages} sent at a steady C{rate} a second, for latency.
        """
        spec = self.spec
        total, rate = spec["messages"], spec["rate"]
        yield self.warm()
        before = self.usage()
        start = time.perf_counter()
        self.progress = start
        sent = 0

        def tick():
            nonlocal sent
            due = min(total, int((time.perf_counter() - start) * rate) + 1)
            while sent < due:
                self.send(self.a, f"sender{sent % 10}@a.test", f"receiver{sent % 10}@b.test")
                sent += 1
            if sent >= total:
                ticker.stop()

        ticker = task.LoopingCall(tick)
        ticker.clock = self.reactor
        ticker.start(0.001)
        yield self.waitUntil(lambda: self.delivered >= total, "every message")
        elapsed = time.perf_counter() - start
        after = self.usage()
        return self.figures(before, after, total, elapsed)

    @defer.inlineCallbacks
    def pingpong(self):
        """
        One message in flight, answered each time from the other side.
        """
        total = self.spec["messages"]
        yield self.warm()

        def onReceive(message):
            if self.serial - warmSerial >= total:
                return
            if message.recipient == "ping@b.test":
                self.send(self.b, "ping@b.test", "pong@a.test")
            else:
                self.send(self.a, "pong@a.test", "ping@b.test")

        self.onReceive = onReceive
        warmSerial = self.serial
        before = self.usage()
        start = time.perf_counter()
        self.progress = start
        self.send(self.a, "pong@a.test", "ping@b.test")
        yield self.waitUntil(lambda: self.delivered >= total, "every message")
        elapsed = time.perf_counter() - start
        after = self.usage()
        return self.figures(before, after, total, elapsed)

    @defer.inlineCallbacks
    def fanout(self):
        """
        C{subscribers} users of B's domains subscribe to one user of A;
        one presence change of that user is timed until the last
        notification reaches B's backend.
        """
        spec = self.spec
        count, domains = spec["subscribers"], spec["domainsB"]
        yield self.a.whenLinked()
        yield self.b.whenLinked()
        granted = yield self._subscribe(
            [(f"fan{n}@{domains[n % len(domains)]}", "star@a.test") for n in range(count)]
        )
        if granted != count:
            raise RuntimeError(f"{count - granted} of {count} subscriptions not granted")
        yield self.waitUntil(
            lambda: time.perf_counter() - self.progress > 1.0, "the first notifications"
        )
        self.handlerB.notified = 0
        before = self.usage()
        start = time.perf_counter()
        self.progress = start
        yield self.a.publishPresence("star@a.test", "away", "fan-out")
        yield self.waitUntil(lambda: self.handlerB.notified >= count, "every notification")
        elapsed = time.perf_counter() - start
        after = self.usage()
        return {
            "subscribers": count,
            "domains": len(domains),
            "granted": granted,
            "notified": self.handlerB.notified,
            "seconds": round(elapsed, 3),
            "cpu_ms": {
                name: round((after[name][0] - before[name][0]) * 1000, 1) for name in self.pids
            },
        }

    @defer.inlineCallbacks
    def _subscribe(self, pairs, window=500):
        """
        Subscribe every C{(subscriber, publisher)} through B's link, at
        most C{window} at once.

        @return: how many were granted.
        """
        granted = 0
        pending = iter(pairs)
        done = defer.Deferred()
        state = {"open": 0, "finished": False}

        def next_():
            for subscriber, publisher in pending:
                state["open"] += 1
                self.b.subscribe(subscriber, publisher).addBoth(answered)
                if state["open"] >= window:
                    return
            if not state["open"] and not state["finished"]:
                state["finished"] = True
                done.callback(None)

        def answered(result):
            nonlocal granted
            self.progress = time.perf_counter()
            state["open"] -= 1
            if result == "granted":
                granted += 1
            next_()

        next_()
        yield done
        return granted

    @defer.inlineCallbacks
    def subscriptions(self):
        """
        Resident memory per live subscription: C{subscriptions} users of
        B subscribe to 100 users of A.
        """
        count = self.spec["subscriptions"]
        yield self.a.whenLinked()
        yield self.b.whenLinked()
        yield self._subscribe([(f"sub{n}@b.test", f"pub{n % 100}@a.test") for n in range(1)])
        yield task.deferLater(self.reactor, 1.0, lambda: None)
        before = self.usage()
        start = time.perf_counter()
        granted = yield self._subscribe(
            [(f"sub{n}@b.test", f"pub{n % 100}@a.test") for n in range(1, count + 1)]
        )
        elapsed = time.perf_counter() - start
        yield task.deferLater(self.reactor, 2.0, lambda: None)
        after = self.usage()
        return {
            "subscriptions": count,
            "granted": granted,
            "seconds": round(elapsed, 3),
            "bytes_per_subscription": {
                name: round((after[name][1] - before[name][1]) * 1048576 / count)
                for name in self.pids
            },
            "rss_mib": {
                name: {"before": round(before[name][1], 1), "after": round(after[name][1], 1)}
                for name in self.pids
            },
        }

    @defer.inlineCallbacks
    def connections(self):
        """
        Resident memory per idle peer connection: C{connections} raw IMX
        connections to A that finish HELLO and then stay silent.
        """
        count = self.spec["connections"]
        host, port = self.spec["imxA"]
        before = self.usage()
        connected = []
        # In batches, within the listener's accept backlog (50 by default).
        for start in range(0, count, 40):
            batch = yield defer.gatherResults(
                [
                    protocol.ClientCreator(self.reactor, _Idle).connectTCP(host, port)
                    for _ in range(min(40, count - start))
                ]
            )
            connected.extend(batch)
            self.progress = time.perf_counter()
            yield self.waitUntil(lambda: all(p.greeted for p in batch), "every HELLO")
        yield task.deferLater(self.reactor, 1.0, lambda: None)
        after = self.usage()
        for p in connected:
            p.transport.abortConnection()
        return {
            "connections": count,
            "bytes_per_connection": round((after["a"][1] - before["a"][1]) * 1048576 / count),
            "rss_mib": {"before": round(before["a"][1], 1), "after": round(after["a"][1], 1)},
        }


class _Idle(protocol.Protocol):
    """
    A peer that sends the preamble and HELLO, then nothing.
    """

    greeted = False

    def connectionMade(self):
        self.transport.setTcpNoDelay(True)
        hello = Hello(versionMin=1, versionMax=1, maxRecord=65536, software="bench")
        self.transport.write(PREAMBLE + encodeRecord(hello))

    def dataReceived(self, data):
        self.greeted = True


def _ms(seconds):
    return None if seconds is None else round(seconds * 1000, 3)


def main(reactor, specText):
    """
    Run the scenario named by the spec's C{kind} and print its figures.
    """
    spec = json.loads(specText)
    run = Run(reactor, spec)
    done = getattr(run, spec["kind"])()

    def report(result):
        print(json.dumps(result), flush=True)

    def stop(result):
        return defer.gatherResults(
            [defer.maybeDeferred(run.a.stopService), defer.maybeDeferred(run.b.stopService)]
        ).addBoth(lambda _: result)

    return done.addCallback(report).addBoth(stop)


if __name__ == "__main__":
    socket.setdefaulttimeout(10)
    task.react(main, sys.argv[1:])
