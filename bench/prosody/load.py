"""Load process for the Prosody s2s benchmark (sender and receiver in one process).

Connects two XEP-0114 external components: ``comp.a.test`` on Prosody A
(sender) and ``comp.b.test`` on Prosody B (receiver).  Messages go
sender -> A -> s2s -> B -> receiver.  Stanzas are raw XML strings written
in batches; the receiver only searches ``<body>NNNNNNNNNNNN`` with a regex,
the 12-digit sequence number indexes the send-time table.

Protocol with the parent (run.py): after connect and warm-up it prints
``READY`` on stdout, waits for ``GO`` on stdin, runs the timed phase and
prints one JSON line with the results.  Every wait is bounded.
"""

import argparse
import hashlib
import json
import os
import re
import time
from array import array

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import protocol, reactor, stdio, task  # noqa: E402
from twisted.protocols.basic import LineReceiver  # noqa: E402

clock = time.monotonic
SEQ_RE = re.compile(rb"<body>(\d{12}) ")
ID_RE = re.compile(rb"""\sid=['"]([^'"]+)['"]""")
PREFIX = b"<message from='s@comp.a.test' to='r@comp.b.test'><body>"
SUFFIX = b" " + b"x" * 87 + b"</body></message>"  # body = 12 digits + 88 = 100 bytes


class Component(protocol.Protocol):
    """XEP-0114 component connection; calls ``onReady`` then ``onStanzas``."""

    def __init__(self, domain, secret, bench):
        self.domain, self.secret, self.bench = domain, secret, bench
        self.buf, self.ready, self.rbuf = b"", False, b""

    def connectionMade(self):
        self.transport.setTcpNoDelay(True)
        self.transport.write(
            b"<stream:stream xmlns='jabber:component:accept' "
            b"xmlns:stream='http://etherx.jabber.org/streams' to='%s'>"
            % self.domain.encode())

    def dataReceived(self, data):
        if self.ready:
            return self.onData(data)
        self.buf += data
        if b"<stream:error" in self.buf:
            return self.bench.fail("stream error from %s: %r" % (self.domain, self.buf[-300:]))
        if not hasattr(self, "sid"):
            m = ID_RE.search(self.buf)
            if not m or b">" not in self.buf[m.end():]:
                return
            self.sid = m.group(1)
            digest = hashlib.sha1(self.sid + self.secret.encode()).hexdigest()
            self.transport.write(b"<handshake>%s</handshake>" % digest.encode())
        i = self.buf.find(b"<handshake")
        if i >= 0 and b">" in self.buf[i:]:
            rest = self.buf[self.buf.index(b">", i) + 1:]
            self.ready, self.buf = True, b""
            self.bench.componentReady(self)
            if rest:
                self.onData(rest)

    def onData(self, data):
        now = clock()
        buf = self.rbuf + data
        end = buf.rfind(b"</message>")
        if end < 0:
            self.rbuf = buf
            return
        end += 10
        chunk, self.rbuf = buf[:end], buf[end:]
        if b"type='error'" in chunk or b'type="error"' in chunk:
            self.bench.errors += chunk.count(b"type='error'") + chunk.count(b'type="error"')
        if self is self.bench.receiver:
            self.bench.received(SEQ_RE.findall(chunk), now)

    def connectionLost(self, reason):
        self.bench.fail("connection to %s lost: %s" % (self.domain, reason.getErrorMessage()))


class Bench:
    """Drives warm-up, then the windowed or paced timed phase."""

    def __init__(self, opts):
        self.o = opts
        self.warm = opts.warmup
        total = self.warm + opts.messages
        self.sentAt = array("d", bytes(8 * total))
        self.lat = array("d")
        self.nsent = self.nrecv = self.nrecvTimed = self.errors = 0
        self.phase, self.sender, self.receiver, self.comps = "connect", None, None, 0
        self.target = 0  # seq limit for the current phase
        self.firstSend = self.lastRecv = None
        self.lastProgress = clock()
        self.done = False

    def fail(self, msg):
        if not self.done:
            self.finish(error=msg)

    def componentReady(self, comp):
        self.comps += 1
        if self.comps == 2:
            self.phase, self.target = "probe", 1
            self.send(1)

    def send(self, n):
        n = min(n, self.target - self.nsent)
        if n <= 0:
            return
        t = clock()
        first, sentAt = self.nsent, self.sentAt
        parts = []
        for i in range(first, first + n):
            sentAt[i] = t
            parts.append(PREFIX + b"%012d" % i + SUFFIX)
        self.sender.transport.write(b"".join(parts))
        self.nsent += n
        if self.firstSend is None and self.phase == "timed":
            self.firstSend = t

    def received(self, seqs, now):
        if not seqs:
            return
        self.nrecv += len(seqs)
        self.lastProgress = now
        if self.phase == "timed":
            warm, sentAt, lat = self.warm, self.sentAt, self.lat
            for s in seqs:
                i = int(s)
                if i >= warm:
                    lat.append(now - sentAt[i])
                    self.nrecvTimed += 1
            self.lastRecv = now
            if self.nrecvTimed >= self.o.messages:
                return self.finish()
        elif self.phase == "probe" and self.nrecv >= 1:
            self.phase, self.target = "warm", self.warm
            return self.send(self.o.in_flight)
        elif self.phase == "warm" and self.nrecv >= self.warm:
            self.phase = "idle"
            print("READY", flush=True)
            return
        if not self.o.paced or self.phase != "timed":
            self.send(self.o.in_flight - (self.nsent - self.nrecv))

    def go(self):
        self.phase, self.target = "timed", self.warm + self.o.messages
        self.lastProgress = self.t0 = clock()
        self.cpu0 = sum(os.times()[:2])
        if self.o.paced:
            self.pacer = task.LoopingCall(self.pace)
            self.pacer.start(0.001)
        else:
            self.send(self.o.in_flight)

    def pace(self):
        due = int((clock() - self.t0) * self.o.paced) + 1
        self.send(self.warm + due - self.nsent)
        if self.nsent >= self.target:
            self.pacer.stop()

    def watchdog(self):
        now = clock()
        idle = now - self.lastProgress
        if self.phase == "timed":
            limit = self.o.drain if self.nsent >= self.target else self.o.stall
            if idle > limit:
                self.finish(error=None if self.nsent >= self.target else "stalled %.0fs" % idle)
        elif self.phase in ("connect", "probe", "warm") and idle > self.o.warm_timeout:
            self.finish(error="no progress in phase %s for %.0fs (received %d)"
                        % (self.phase, idle, self.nrecv))

    def finish(self, error=None):
        if self.done:
            return
        self.done = True
        lat = sorted(self.lat)
        pct = lambda p: round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 3) if lat else None
        span = (self.lastRecv - self.firstSend) if self.lastRecv and self.firstSend else None
        sentTimed = max(0, self.nsent - self.warm)
        out = {"sent": sentTimed, "received": self.nrecvTimed, "lost": sentTimed - self.nrecvTimed,
               "rate": round(self.nrecvTimed / span, 1) if span else None,
               "elapsed_s": round(span, 4) if span else None,
               "p50_ms": pct(0.50), "p99_ms": pct(0.99), "errors": self.errors,
               "phase": self.phase, "error": error,
               "load_cpu_us_per_message": round((sum(os.times()[:2]) - self.cpu0) * 1e6 / max(1, sentTimed), 2)
               if hasattr(self, "cpu0") else None}
        print(json.dumps(out), flush=True)
        reactor.callLater(0, reactor.stop)


class Control(LineReceiver):
    """Reads ``GO`` from the parent on stdin."""

    delimiter = b"\n"

    def __init__(self, bench):
        self.bench = bench

    def lineReceived(self, line):
        if line.strip() == b"GO" and self.bench.phase == "idle":
            self.bench.go()

    def connectionLost(self, reason):
        self.bench.fail("stdin closed")


def main(argv=None):
    """Parse arguments and run the load until done or timed out."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", default="127.0.0.4:5347")
    p.add_argument("--b", default="127.0.0.5:5347")
    p.add_argument("--secret", default="bench")
    p.add_argument("--messages", type=int, default=100000)
    p.add_argument("--in-flight", type=int, default=1000)
    p.add_argument("--paced", type=float, default=None)
    p.add_argument("--warmup", type=int, default=2000)
    p.add_argument("--warm-timeout", type=float, default=30.0)
    p.add_argument("--stall", type=float, default=15.0)
    p.add_argument("--drain", type=float, default=5.0)
    p.add_argument("--timeout", type=float, default=300.0)
    o = p.parse_args(argv)
    bench = Bench(o)

    def connect(addr, domain, attr):
        host, port = addr.rsplit(":", 1)
        f = protocol.ClientFactory()
        f.buildProtocol = lambda a: setattr(bench, attr, Component(domain, o.secret, bench)) or getattr(bench, attr)
        f.clientConnectionFailed = lambda c, r: bench.fail("connect %s: %s" % (addr, r.getErrorMessage()))
        reactor.connectTCP(host, int(port), f, timeout=10)

    connect(o.b, "comp.b.test", "receiver")
    connect(o.a, "comp.a.test", "sender")
    stdio.StandardIO(Control(bench))
    task.LoopingCall(bench.watchdog).start(0.25, now=False)
    reactor.callLater(o.timeout, bench.fail, "overall timeout %.0fs" % o.timeout)
    reactor.run()


if __name__ == "__main__":
    main()
