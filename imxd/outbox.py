"""
The outbox: durable delivery of the messages hosted domains send.

A message submitted by a backend is sent at once and written to the
durable queue (L{imxd.store.interfaces.IOutboundStore}) with the next
grouped commit; the backend hears that it was accepted when that commit
is done, or sooner when the message's outcome comes first.  It leaves the
queue when the receiving server (or, for a domain hosted here, its
backend) acknowledges it, or when it is given up: refused permanently, or
not delivered within C{give_up_after}.  Either way the sending domain's
backend then gets a delivery report
(L{imxd.backend.interfaces.IBackend.deliveryReport}).  A message whose
outcome comes before its commit is put together is never written at all:
under load most are not, and the database writes only what waits.

Each destination domain has its own L{DestinationQueue}: at most C{window}
messages in flight, sent in the order accepted.  When the destination cannot
be reached (no connection, dial-back or TLS refused, no answer, rate limited,
shutting down), the queue backs off as a whole: exponential delays with
jitter up to C{retry_max}; meanwhile new messages wait without new
connection attempts.  After the delay one message probes, and the window
opens again as TCP's slow start does: one more message in flight for each
one acknowledged, so a destination that is still failing (or rate
limiting) is not sent a whole window at once.  A message the receiving
server refuses for now on its own account (C{recipient-unavailable}) waits
alone, with its own backoff, and the rest of the queue goes on.  See
C{docs/reliability.md}.
"""

from __future__ import annotations

import collections
import heapq
import operator
import random

import attrs
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from imxd.peer import Refused, RemoteError
from imxd.wire import ErrorCode

#: Seconds between two sweeps for messages past their give-up age.
SWEEP_INTERVAL = 60.0

#: Remote refusals that concern one message, not its destination.
_PER_MESSAGE = frozenset({ErrorCode.RECIPIENT_UNAVAILABLE})

_bySeq = operator.attrgetter("seq")

#: Characters of a peer's error text kept in status lines and logs.
ERROR_TEXT_LIMIT = 200


def _oneLine(text):
    """
    @return: C{text} on one line, control characters replaced, at most
        L{ERROR_TEXT_LIMIT} characters (a peer's ERROR text goes into
        status lines).
    """
    cleaned = "".join(c if c.isprintable() else " " for c in text)
    if len(cleaned) > ERROR_TEXT_LIMIT:
        cleaned = cleaned[: ERROR_TEXT_LIMIT - 1] + "…"
    return cleaned


@attrs.define(eq=False)
class DestinationQueue:
    """
    The messages for one destination domain and its retry state.

    @ivar remote: the destination domain.
    @ivar waiting: messages to send, in the order accepted.
    @ivar inFlight: messages sent and not yet answered, by sequence number.
    @ivar delayed: messages refused for now on their own account, each
        waiting for its C{notBefore}.
    @ivar window: messages it may have in flight now (1 after a failure,
        one more for each acknowledgement, up to the configured window).
    @ivar failures: tries of the destination that failed in a row.
    @ivar retryAt: clock seconds of the next try while backing off, or
        L{None}.
    @ivar lastError: why the destination or a message last failed.
    """

    remote: str
    waiting: collections.deque = attrs.Factory(collections.deque)
    inFlight: dict = attrs.Factory(dict)
    delayed: list = attrs.Factory(list)
    window: int = 1
    failures: int = 0
    retryAt: float | None = None
    lastError: str | None = None
    timer: object = None
    returned: list = attrs.Factory(list)
    pumping: bool = False

    def depth(self):
        """
        @return: how many messages this queue holds.
        """
        return len(self.waiting) + len(self.inFlight) + len(self.delayed) + len(self.returned)

    def entries(self):
        """
        @return: every message this queue holds.
        """
        return [*self.inFlight.values(), *self.returned, *self.waiting, *self.delayed]


class Outbox:
    """
    Every message accepted from the hosted domains' backends until it is
    delivered or given up.

    @ivar depth: messages held.
    @ivar counters: C{delivered}, C{failed}, C{given-up}, C{retries},
        C{slowed} (busy refusals that halved a window), C{never-written}
        (messages that ended before their commit was put together),
        C{outcome-answers} (messages whose sender heard acceptance and
        outcome at once, L{Outbox.submitThen}'s C{onOutcome}).
    """

    log = Logger()

    def __init__(self, store, clock, transmit, report, settings, randomness=random.random):
        """
        @param store: an L{imxd.store.interfaces.IOutboundStore}.
        @param clock: an L{IReactorTime} provider.
        @param transmit: C{transmit(origin, remote, record, onAnswer,
            onFailure, args)}, C{args} a tuple, which calls
            C{onAnswer(answer, *args)} once
            the receiver acknowledged the record or C{onFailure(failure,
            *args)} (a L{Refused}), once, now or later
            (L{imxd.router.Router.transmitThen}).
        @param report: C{report(entry, refusal)} telling the sending
            domain's backend the outcome (C{refusal} L{None}: delivered).
        @param settings: the L{imxd.config.QueueConfig}.
        @param randomness: returns a float in [0, 1) for the jitter.
        """
        self.store = store
        self.clock = clock
        self.transmit = transmit
        self.report = report
        self.settings = settings
        self.random = randomness
        self.queues: dict[str, DestinationQueue] = {}
        self.depth = 0
        self.counters = collections.Counter()
        self.stopped = True
        self._sweeper = None
        self._reportsDue = []
        self._reportCall = None

    # -- life -----------------------------------------------------------------

    def start(self):
        """
        Take up the messages kept from before (after a restart), before any
        backend can send new ones; give up those past their age and send
        the rest on the next turn, once every service has started.
        """
        self.stopped = False
        for entry in self.store.load():
            self._queue(entry.remote).waiting.append(entry)
            self.depth += 1
        if self.depth:
            self.log.info(
                "outbox: {count} messages kept from before, for {domains} domains",
                count=self.depth,
                domains=len(self.queues),
            )
        self._sweeper = task.LoopingCall(self.sweep)
        self._sweeper.clock = self.clock
        self._sweeper.start(SWEEP_INTERVAL, now=False)
        self.clock.callLater(0, self._resume)

    def _resume(self):
        if self.stopped:
            return
        self.sweep()
        for queue in list(self.queues.values()):
            self._pump(queue)

    def stop(self):
        """
        Stop sending and every timer; what is queued stays in the store.
        The reports still due go out now, while the backends can take them
        (their messages were never written: nothing would report them
        after a restart).
        """
        self.stopped = True
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        for queue in self.queues.values():
            self._cancel(queue)
        if self._reportCall is not None:
            if self._reportCall.active():
                self._reportCall.cancel()
            self._reportDue()

    # -- accepting ------------------------------------------------------------

    def submit(self, origin, remote, record):
        """
        Accept a message from the hosted domain C{origin} for C{remote}.

        @return: a L{Deferred} firing with L{None} once the message is in
            the durable queue, or failing with L{Refused}
            (C{resource-limit} when the queue is full, C{temporary-failure}
            when it cannot be written).
        """
        stored = defer.Deferred()
        self.submitThen(origin, remote, record, stored.callback, stored.errback)
        return stored

    def submitThen(self, origin, remote, record, onAccepted, onFailure, args=(), onOutcome=None):
        """
        L{submit}, calling C{onAccepted(None, *args)} or C{onFailure(failure,
        *args)} instead of returning a L{Deferred} (the per-message path;
        C{args} is a tuple).

        @param onOutcome: L{None}, or C{onOutcome(origin, record, refusal,
            *args)}: offered the message's outcome (L{None}: delivered)
            when it comes before the message was written or accepted.  If
            it returns true it has told the sender both that the message
            was accepted and its outcome, and neither C{onAccepted} nor
            the delivery report follows; if false, they follow as usual.
        """
        if self.depth >= self.settings.maxQueued:
            self.counters["refused-full"] += 1
            refusal = Refused(
                ErrorCode.RESOURCE_LIMIT,
                f"the outbound queue is full ({self.settings.maxQueued} messages)",
            )
            onFailure(Failure(refusal), *args)
            return
        entry = self.store.add(origin, remote, record, self.clock.seconds())
        self.depth += 1
        entry.acceptance = (onAccepted, onFailure, args, onOutcome)
        self.store.whenWritten(entry.seq, self._stored, self._notStored, entry)
        queue = self._queue(remote)
        queue.waiting.append(entry)
        try:
            self._pump(queue)
        except Exception:
            # Accepted or not is the commit's to say; the queue goes on.
            self.log.failure("outbox: sending to {remote} failed", remote=remote)

    def _stored(self, _, entry):
        """
        The message is queued durably: accepted, unless its outcome already
        said so.
        """
        self._accept(entry)

    def _accept(self, entry):
        """
        Tell the backend that submitted C{entry} that it is accepted (once).
        """
        acceptance, entry.acceptance = entry.acceptance, None
        if acceptance is not None:
            onAccepted, _onFailure, args, _onOutcome = acceptance
            onAccepted(None, *args)

    def _notStored(self, failure, entry):
        """
        The commit that was to keep the message failed: unless its outcome
        came first, its sender hears that it could not be queued, sends it
        again, and hears nothing more of this copy (which is still sent; a
        receiving server drops the second copy by its MESSAGE_ID).
        """
        acceptance, entry.acceptance = entry.acceptance, None
        if acceptance is None:
            return
        entry.reported = False
        _onAccepted, onFailure, args, _onOutcome = acceptance
        refusal = Refused(
            ErrorCode.TEMPORARY_FAILURE, f"the message could not be queued: {failure.value}"
        )
        onFailure(Failure(refusal), *args)

    def _queue(self, remote):
        queue = self.queues.get(remote)
        if queue is None:
            queue = self.queues[remote] = DestinationQueue(remote, window=self.settings.window)
        return queue

    # -- sending --------------------------------------------------------------

    def _pump(self, queue):
        """
        Send what the queue's window allows, unless it is backing off.
        """
        if queue.pumping or self.stopped:
            return
        queue.pumping = True
        try:
            self._merge(queue)
            # Answers that come at once may change the window or start a
            # backoff, so both are read again after every send.
            while queue.waiting and queue.retryAt is None and len(queue.inFlight) < queue.window:
                entry = queue.waiting.popleft()
                queue.inFlight[entry.seq] = entry
                try:
                    self.transmit(
                        entry.origin, entry.remote, entry.record, self._delivered, self._failed, (entry,)
                    )
                except Exception:
                    self._failed(Failure(), entry)
        finally:
            queue.pumping = False
        if not queue.depth() and queue.timer is None and self.queues.get(queue.remote) is queue:
            del self.queues[queue.remote]

    def _merge(self, queue):
        """
        Put the messages returned by failures back among the waiting ones,
        in their place.
        """
        if queue.returned:
            returned = sorted(queue.returned, key=_bySeq)
            queue.returned = []
            queue.waiting = collections.deque(heapq.merge(returned, queue.waiting, key=_bySeq))

    def _delivered(self, _, entry):
        queue = self._queue(entry.remote)
        queue.inFlight.pop(entry.seq, None)
        queue.failures = 0
        queue.window = min(self.settings.window, queue.window + 1)
        self.counters["delivered"] += 1
        self._finish(entry, None)
        if queue.waiting or queue.returned or not queue.inFlight:
            # Something to send, or the queue to drop once empty; with
            # neither, pumping would do nothing (the usual case under load).
            self._pump(queue)

    def _failed(self, failure, entry):
        queue = self._queue(entry.remote)
        queue.inFlight.pop(entry.seq, None)
        if failure.check(Refused):
            refusal = failure.value
        else:
            self.log.failure("outbox: sending to {remote} failed", failure, remote=entry.remote)
            refusal = Refused(ErrorCode.INTERNAL_ERROR, failure.getErrorMessage())
        entry.lastError = queue.lastError = _oneLine(str(refusal))
        if not refusal.temporary:
            self.counters["failed"] += 1
            self._finish(entry, refusal)
        elif self._tooOld(entry):
            self._giveUp(entry, refusal)
        elif isinstance(refusal, RemoteError) and refusal.code in _PER_MESSAGE:
            self._delay(queue, entry, refusal)
        elif (
            isinstance(refusal, RemoteError)
            and refusal.code == ErrorCode.RESOURCE_LIMIT
            and queue.inFlight
            and queue.retryAt is None
        ):
            # The receiver is busy with what this queue has in flight: send
            # less at once (half of what is in flight), without stopping;
            # the answers still due send the message again.
            queue.returned.append(entry)
            queue.window = max(1, min(queue.window, len(queue.inFlight)) // 2)
            self.counters["slowed"] += 1
        else:
            queue.returned.append(entry)
            self._backOff(queue, refusal)
        self._pump(queue)

    def _finish(self, entry, refusal):
        """
        The message leaves the queue: forget it, and tell its sender,
        accepted first if its commit has not come yet.  A message that was
        written is reported once its removal is durable too (so that a
        restart cannot send and report it again); one never written, at
        once.
        """
        written = self.store.remove(entry.seq)
        self.depth -= 1
        if not written and self._outcomeTaken(entry, refusal):
            self.counters["never-written"] += 1
            self.counters["outcome-answers"] += 1
            return
        try:
            self._accept(entry)
        except Exception:
            self.log.failure("outbox: accepting {id} failed", id=entry.record.messageId)
        if not entry.reported:
            return
        if written:
            self.store.whenCommitted(self._report, self._report, entry, refusal)
            return
        self.counters["never-written"] += 1
        # Never on the turn it was accepted in: a backend that submitted it
        # hears "accepted" first, however soon the answer came.
        self._reportsDue.append((entry, refusal))
        if self._reportCall is None:
            self._reportCall = self.clock.callLater(0, self._reportDue)

    def _outcomeTaken(self, entry, refusal):
        """
        Offer the outcome of a message never written, and not yet accepted,
        to its sender's C{onOutcome}.

        @return: whether it took it (then it is told nothing more).
        """
        acceptance = entry.acceptance
        if acceptance is None or acceptance[3] is None:
            return False
        _onAccepted, _onFailure, args, onOutcome = acceptance
        try:
            taken = onOutcome(entry.origin, entry.record, refusal, *args)
        except Exception:
            self.log.failure("outbox: the outcome of {id} was not taken", id=entry.record.messageId)
            taken = False
        if taken:
            entry.acceptance = None
        return taken

    def _reportDue(self):
        """
        Report the messages that ended before they were written.
        """
        self._reportCall = None
        due, self._reportsDue = self._reportsDue, []
        for entry, refusal in due:
            self._report(None, entry, refusal)

    def _report(self, _, entry, refusal):
        try:
            self.report(entry, refusal)
        except Exception:
            self.log.failure("outbox: delivery report for {id} failed", id=entry.record.messageId)

    def _tooOld(self, entry):
        return self.clock.seconds() - entry.accepted >= self.settings.giveUpAfter

    def _giveUp(self, entry, refusal):
        self.counters["given-up"] += 1
        self.log.info(
            "outbox: giving up message {id} to {remote}: not delivered within {age:g} s: {why}",
            id=entry.record.messageId,
            remote=entry.remote,
            age=self.settings.giveUpAfter,
            why=str(refusal),
        )
        self._finish(
            entry,
            Refused(
                refusal.code,
                f"not delivered within {self.settings.giveUpAfter:g} s; last error: "
                f"{refusal.text or refusal.token}",
            ),
        )

    def _backoffDelay(self, failures):
        """
        @return: seconds to wait after C{failures} failures in a row:
            doubling from C{retry_initial} up to C{retry_max}, then scaled
            by a random factor in [0.5, 1).
        """
        base = min(
            self.settings.retryMax, self.settings.retryInitial * 2 ** min(failures - 1, 32)
        )
        return base * (0.5 + self.random() / 2)

    def _delayFor(self, refusal, failures):
        """
        @return: the peer's RETRY_AFTER (at most C{retry_max}), or the
            backoff delay after C{failures} failures.
        """
        if refusal.retryAfter:
            return min(float(refusal.retryAfter), self.settings.retryMax)
        return self._backoffDelay(failures)

    def _backOff(self, queue, refusal):
        """
        The destination failed: wait before the next try (once per failure,
        however many messages were in flight).
        """
        queue.window = 1
        if queue.retryAt is not None:
            return
        queue.failures += 1
        delay = self._delayFor(refusal, queue.failures)
        queue.retryAt = self.clock.seconds() + delay
        self.counters["retries"] += 1
        self.log.info(
            "outbox: {remote} failed ({why}); {count} messages wait {delay:.1f} s",
            remote=queue.remote,
            why=str(refusal),
            count=queue.depth(),
            delay=delay,
        )
        self._wakeAt(queue)

    def _delay(self, queue, entry, refusal):
        """
        The receiving server refused one message for now: it alone waits.
        """
        entry.attempts += 1
        delay = self._delayFor(refusal, entry.attempts)
        entry.notBefore = self.clock.seconds() + delay
        queue.delayed.append(entry)
        self._wakeAt(queue)

    def _wakeAt(self, queue):
        """
        Set the queue's one timer to its next due time: the end of its
        backoff, or the first delayed message's.
        """
        self._cancel(queue)
        if self.stopped:
            return
        times = [e.notBefore for e in queue.delayed]
        if queue.retryAt is not None:
            times.append(queue.retryAt)
        if times:
            delay = max(0.0, min(times) - self.clock.seconds())
            queue.timer = self.clock.callLater(delay, self._wake, queue)

    def _cancel(self, queue):
        if queue.timer is not None and queue.timer.active():
            queue.timer.cancel()
        queue.timer = None

    def _wake(self, queue):
        queue.timer = None
        now = self.clock.seconds()
        if queue.retryAt is not None and queue.retryAt <= now:
            queue.retryAt = None
        due = [e for e in queue.delayed if e.notBefore <= now]
        if due:
            queue.delayed = [e for e in queue.delayed if e.notBefore > now]
            queue.returned.extend(due)
        self._wakeAt(queue)
        self._pump(queue)

    def retryNow(self, remote=None):
        """
        End the backoff of one destination (or of all) and send at once.

        @return: the destinations woken.
        """
        woken = []
        for queue in list(self.queues.values()):
            if remote is not None and queue.remote != remote:
                continue
            queue.retryAt = None
            for entry in queue.delayed:
                entry.notBefore = 0.0
            self._cancel(queue)
            self._wake(queue)
            woken.append(queue.remote)
        return woken

    # -- upkeep -------------------------------------------------------------------

    def sweep(self):
        """
        Give up the messages waiting past C{give_up_after}.
        """
        for queue in list(self.queues.values()):
            self._merge(queue)
            old = [e for e in (*queue.waiting, *queue.delayed) if self._tooOld(e)]
            if not old:
                continue
            gone = {e.seq for e in old}
            queue.waiting = collections.deque(e for e in queue.waiting if e.seq not in gone)
            queue.delayed = [e for e in queue.delayed if e.seq not in gone]
            why = Refused(ErrorCode.TEMPORARY_FAILURE, queue.lastError or "not tried")
            for entry in old:
                self._giveUp(entry, why)
            self._wakeAt(queue)
            self._pump(queue)

    def status(self):
        """
        @return: C{(name, value)} lines for C{imxctl status}: the queue's
            totals, then one line per destination that holds messages.
        """
        now = self.clock.seconds()
        lines = [("queue-depth", str(self.depth))]
        lines += [(f"queue-{name}", str(self.counters[name]))
                  for name in ("delivered", "failed", "given-up", "retries", "slowed", "never-written",
                               "outcome-answers")]
        for remote in sorted(self.queues):
            queue = self.queues[remote]
            entries = queue.entries()
            if not entries:
                continue
            oldest = now - min(e.accepted for e in entries)
            parts = [
                f"depth={len(entries)}",
                f"in-flight={len(queue.inFlight)}",
                f"window={queue.window}",
                f"oldest={oldest:.0f}s",
            ]
            if queue.retryAt is not None:
                parts.append(f"retry-in={max(0.0, queue.retryAt - now):.0f}s")
                parts.append(f"failures={queue.failures}")
            if queue.lastError:
                parts.append(f"last-error={queue.lastError}")
            lines.append((f"queue.{remote}", " ".join(parts)))
        return lines
