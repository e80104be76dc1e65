"""
Tests for L{imxd.backend.spool}: the C{spool} backend's options, its
directory layout, the outbox poller and inbox delivery, driven through a
fake sender on a L{Clock}; and its registration as a backend kind.
"""

from __future__ import annotations

import base64
import json
import os
import stat

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from imxd import backend as backends
from imxd.aggregator import Aggregator
from imxd.backend import BackendError
from imxd.backend import spool
from imxd.backend.spool import SUBDIRECTORIES, SpoolBackend, validateOptions
from imxd.config import ConfigError, LimitsConfig, parseConfig
from imxd.dialback import DialbackSecrets, DialbackTokens
from imxd.discovery import Discovery
from imxd.federation import Federation
from imxd.peer import PeerSettings, Refused
from imxd.wire import Ack, ErrorCode, Message
from tests.network import Network, message

DEFAULT_CONTENT_TYPE = "text/plain; charset=utf-8"


class FakeSender:
    """
    Stands in for the hosted domain a backend sends through: a clock, and
    a C{sendMessage} that records each message and returns a L{Deferred}
    the test fires.

    @ivar sent: C{(message, deferred)} pairs, oldest first.
    """

    def __init__(self):
        self.clock = Clock()
        self.sent = []

    def sendMessage(self, record):
        deferred = Deferred()
        self.sent.append((record, deferred))
        return deferred

    def messages(self):
        """
        @return: the messages sent so far.
        """
        return [record for record, _ in self.sent]


class SpoolTestsMixin:
    """
    A spool backend for C{a.test} in a fresh directory, with helpers to
    write outbox files and read the spool.
    """

    pollInterval = 5.0

    def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.directory = os.path.join(self.base, "spool")
        self.backend = SpoolBackend("a.test", self.directory, self.pollInterval)
        self.sender = FakeSender()
        self.addCleanup(self.backend.stop)

    def start(self):
        """
        Start the backend on the fake sender (which polls once at once).
        """
        self.backend.start(self.sender)

    def path(self, *parts):
        return os.path.join(self.directory, *parts)

    def listing(self, name):
        """
        @return: the sorted file names in a sub-directory of the spool.
        """
        return sorted(os.listdir(self.path(name)))

    def writeOutbox(self, name, document=None, raw=None):
        """
        Put a file into the outbox the documented way: written in C{tmp/},
        then renamed in.

        @param document: a JSON-serialisable document, or
        @param raw: the file's bytes.
        """
        data = raw if raw is not None else json.dumps(document).encode("utf-8")
        scratch = self.path("tmp", "writing")
        with open(scratch, "wb") as f:
            f.write(data)
        os.replace(scratch, self.path("outbox", name))

    def readJSON(self, *parts):
        with open(self.path(*parts), encoding="utf-8") as f:
            return json.load(f)


def outgoing(**extra):
    """
    @return: an outbox document from alice@a.test to bob@b.test.
    """
    document = {"from": "alice@a.test", "to": "bob@b.test", "body": "Hello, Bob"}
    document.update(extra)
    return document


class ValidateOptionsTests(SynchronousTestCase):
    """
    L{validateOptions} normalises good options and refuses bad ones with a
    L{ValueError} naming the problem.
    """

    def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)

    def test_directoryRequired(self):
        """
        C{directory} is required and must be a non-empty string.
        """
        for options in ({}, {"directory": ""}, {"directory": 3}, {"directory": None}):
            error = self.assertRaises(ValueError, validateOptions, options, self.base)
            self.assertIn("directory", str(error))
            self.assertIn("required", str(error))

    def test_unknownOption(self):
        """
        An option other than C{directory} and C{poll_interval} is refused by
        name, even when the known ones are fine.
        """
        error = self.assertRaises(
            ValueError, validateOptions, {"directory": "s", "path": "x"}, self.base
        )
        self.assertIn("'path'", str(error))
        self.assertIn("unknown option", str(error))

    def test_pollIntervalRefused(self):
        """
        C{poll_interval} must be a number greater than 0: strings, lists,
        C{None}, booleans (which Python counts as integers), zero and
        negative numbers are refused, each with its reason.
        """
        cases = [(bad, "number") for bad in ("1", [1], None, True, False)]
        cases += [(bad, "greater than 0") for bad in (0, 0.0, -1, -0.5)]
        for bad, reason in cases:
            error = self.assertRaises(
                ValueError,
                validateOptions,
                {"directory": "s", "poll_interval": bad},
                self.base,
            )
            self.assertIn("poll_interval", str(error))
            self.assertIn(reason, str(error))

    def test_pollInterval(self):
        """
        C{poll_interval} defaults to one second and is returned as a float,
        under the name C{pollInterval}.
        """
        self.assertEqual(
            validateOptions({"directory": "s"}, self.base)["pollInterval"], 1.0
        )
        options = validateOptions({"directory": "s", "poll_interval": 2}, self.base)
        self.assertEqual(options["pollInterval"], 2.0)
        self.assertIsInstance(options["pollInterval"], float)
        options = validateOptions({"directory": "s", "poll_interval": 0.25}, self.base)
        self.assertEqual(options["pollInterval"], 0.25)

    def test_relativeDirectory(self):
        """
        A relative C{directory} is taken from the base directory (the
        configuration file's) and normalised; an absolute one is kept.
        """
        options = validateOptions({"directory": "spool"}, self.base)
        self.assertEqual(
            options, {"directory": os.path.join(self.base, "spool"), "pollInterval": 1.0}
        )
        options = validateOptions({"directory": "../x/./spool"}, self.base)
        self.assertEqual(
            options["directory"], os.path.join(os.path.dirname(self.base), "x", "spool")
        )
        elsewhere = os.path.abspath(self.mktemp())
        options = validateOptions({"directory": elsewhere}, self.base)
        self.assertEqual(options["directory"], elsewhere)

    def test_parentMissing(self):
        """
        A directory whose parents do not exist yet is accepted (the spool is
        created with its parents at start), and checking the options creates
        nothing.
        """
        options = validateOptions({"directory": "no/such/spool"}, self.base)
        self.assertEqual(
            options["directory"], os.path.join(self.base, "no", "such", "spool")
        )
        self.assertFalse(os.path.exists(os.path.join(self.base, "no")))

    def test_notADirectory(self):
        """
        A C{directory} that exists but is not a directory is refused.
        """
        with open(os.path.join(self.base, "afile"), "w"):
            pass
        error = self.assertRaises(
            ValueError, validateOptions, {"directory": "afile"}, self.base
        )
        self.assertIn("not a directory", str(error))

    def test_inputUnchanged(self):
        """
        The options given are not modified; a new dict is returned.
        """
        given = {"directory": "s", "poll_interval": 3}
        result = validateOptions(given, self.base)
        self.assertEqual(given, {"directory": "s", "poll_interval": 3})
        self.assertIsNot(result, given)


class LayoutTests(SpoolTestsMixin, SynchronousTestCase):
    """
    The spool's directories are created when needed.
    """

    def test_startCreatesSubdirectories(self):
        """
        L{SpoolBackend.start} creates the spool, with any missing parents,
        and its sub-directories C{outbox}, C{sent}, C{failed}, C{inbox} and
        C{tmp}, readable by imxd's user only.
        """
        self.backend = SpoolBackend("a.test", os.path.join(self.base, "x", "y", "spool"))
        self.directory = self.backend.directory
        self.assertFalse(os.path.exists(os.path.join(self.base, "x")))
        self.start()
        self.assertEqual(
            self.listing("."), sorted(["outbox", "sent", "delivered", "failed", "inbox", "tmp"])
        )
        self.assertEqual(set(SUBDIRECTORIES), set(self.listing(".")))
        for name in SUBDIRECTORIES:
            mode = os.stat(self.path(name)).st_mode
            self.assertTrue(stat.S_ISDIR(mode))
            self.assertEqual(stat.S_IMODE(mode) & 0o077, 0, name)

    def test_startKeepsExistingFiles(self):
        """
        Starting on an existing spool keeps what is in it.
        """
        os.makedirs(self.path("inbox"))
        with open(self.path("inbox", "old.json"), "w") as f:
            f.write("{}")
        self.start()
        self.assertEqual(self.listing("inbox"), ["old.json"])

    def test_cannotCreate(self):
        """
        A spool that cannot be created is reported as a L{BackendError}
        naming the domain and the path.
        """
        blocker = os.path.join(self.base, "blocker")
        with open(blocker, "w"):
            pass
        backend = SpoolBackend("a.test", os.path.join(blocker, "spool"))
        error = self.assertRaises(BackendError, backend.prepare)
        self.assertIn("a.test", str(error))
        self.assertIn(os.path.join(blocker, "spool"), str(error))
        self.assertNotIn("\n", str(error))

    def test_fromConfig(self):
        """
        L{SpoolBackend.fromConfig} builds the backend from a domain's
        validated options and creates the spool at once, so that a spool
        that cannot be made stops imxd before it serves.
        """
        config = parseConfig(
            {
                "domain": [
                    {
                        "name": "A.test",
                        "backend": "spool",
                        "backend_options": {"directory": "s", "poll_interval": 3},
                    }
                ]
            },
            os.path.join(self.base, "imxd.toml"),
            self.base,
        )
        backend = SpoolBackend.fromConfig(config.domains[0])
        self.assertEqual(backend.domain, "a.test")
        self.assertEqual(backend.directory, os.path.join(self.base, "s"))
        self.assertEqual(backend.pollInterval, 3.0)
        self.assertEqual(
            set(os.listdir(os.path.join(self.base, "s"))), set(SUBDIRECTORIES)
        )


class SendingTests(SpoolTestsMixin, SynchronousTestCase):
    """
    Files in C{outbox/} are sent through the hosted domain and moved to
    C{sent/} or C{failed/} by the outcome.
    """

    def setUp(self):
        super().setUp()
        self.backend.prepare()

    def test_sent(self):
        """
        An outbox file is sent as one MESSAGE with its members; it stays in
        the outbox while the send is in progress and moves, unchanged, to
        C{sent/} once the receiving server has accepted it.
        """
        document = outgoing(id="m-1", content_type="text/markdown")
        self.writeOutbox("m-1.json", document)
        self.start()
        self.assertEqual(
            self.sender.messages(),
            [
                Message(
                    sender="alice@a.test",
                    recipient="bob@b.test",
                    messageId="m-1",
                    contentType="text/markdown",
                    body=b"Hello, Bob",
                )
            ],
        )
        self.assertEqual(self.listing("outbox"), ["m-1.json"])
        self.assertEqual(self.listing("sent"), [])

        self.sender.sent[0][1].callback(Ack(tags=(1,)))
        self.assertEqual(self.listing("outbox"), [])
        self.assertEqual(self.listing("sent"), ["m-1.json"])
        self.assertEqual(self.listing("failed"), [])
        self.assertEqual(self.readJSON("sent", "m-1.json"), document)

    def test_bodyEncoding(self):
        """
        The body is sent as UTF-8.
        """
        self.writeOutbox("u.json", outgoing(body="gr\u00fc\u00df \u2603"))
        self.start()
        self.assertEqual(
            self.sender.messages()[0].body, "gr\u00fc\u00df \u2603".encode("utf-8")
        )

    def test_refused(self):
        """
        A file whose send fails with L{Refused} moves to C{failed/}, with
        C{NAME.error} beside it holding the code, its token and the text.
        """
        self.writeOutbox("m.json", outgoing())
        self.start()
        self.sender.sent[0][1].errback(Refused(ErrorCode.UNKNOWN_USER, "no user bob"))
        self.assertEqual(self.listing("outbox"), [])
        self.assertEqual(self.listing("sent"), [])
        self.assertEqual(self.listing("failed"), ["m.json", "m.json.error"])
        self.assertEqual(
            self.readJSON("failed", "m.json.error"),
            {"code": 514, "error": "unknown-user", "text": "no user bob"},
        )
        self.assertEqual(self.readJSON("failed", "m.json"), outgoing())

    def test_refusedWithoutText(self):
        """
        A refusal without text is reported with C{"text": null}.
        """
        self.writeOutbox("m.json", outgoing())
        self.start()
        self.sender.sent[0][1].errback(Refused(ErrorCode.RELAY_DENIED))
        self.assertEqual(
            self.readJSON("failed", "m.json.error"),
            {"code": 512, "error": "relay-denied", "text": None},
        )

    def assertMalformed(self, name, **content):
        """
        Assert that the outbox file C{name} (written with C{content}) is not
        sent and moves to C{failed/} with a C{malformed} (500) report naming
        the file.

        @return: the report's text.
        """
        self.writeOutbox(name, **content)
        self.backend.poll()
        self.assertEqual(self.sender.sent, [])
        self.assertNotIn(name, self.listing("outbox"))
        self.assertIn(name, self.listing("failed"))
        report = self.readJSON("failed", name + ".error")
        self.assertEqual(report["code"], 500)
        self.assertEqual(report["error"], "malformed")
        self.assertIn(name, report["text"])
        return report["text"]

    def test_malformed(self):
        """
        Files that do not describe a message (not JSON, not UTF-8, not an
        object, a required member missing or not a string) go to
        C{failed/} as C{malformed} without being sent.
        """
        self.start()
        self.assertMalformed("syntax.json", raw=b'{"from": "alice@a.test", ')
        self.assertMalformed("binary.json", raw=b"\xff\xfe{}")
        self.assertMalformed("list.json", document=[outgoing()])
        text = self.assertMalformed("noto.json", document={"from": "a@a.test", "body": "x"})
        self.assertIn('"to"', text)
        text = self.assertMalformed("nofrom.json", document={"to": "b@b.test", "body": "x"})
        self.assertIn('"from"', text)
        text = self.assertMalformed("nobody.json", document=outgoing(body=None))
        self.assertIn('"body"', text)
        text = self.assertMalformed("numbody.json", document=outgoing(body=42))
        self.assertIn('"body"', text)
        text = self.assertMalformed("badid.json", document=outgoing(id=7))
        self.assertIn('"id"', text)
        text = self.assertMalformed("badtype.json", document=outgoing(content_type=["x"]))
        self.assertIn('"content_type"', text)
        self.assertEqual(self.listing("sent"), [])
        self.assertEqual(self.sender.sent, [])

    def test_malformedDoesNotBlock(self):
        """
        A malformed file does not keep the good files after it in the same
        poll from being sent.
        """
        self.writeOutbox("1-bad.json", raw=b"nonsense")
        self.writeOutbox("2-good.json", outgoing())
        self.start()
        self.assertEqual([m.messageId for m in self.sender.messages()], ["2-good"])
        self.assertEqual(self.listing("failed"), ["1-bad.json", "1-bad.json.error"])

    def test_inFlightNotSentTwice(self):
        """
        A file whose send is still in progress is not sent again by later
        polls; once settled it is gone from the outbox and not sent again
        either.
        """
        self.writeOutbox("m.json", outgoing())
        self.start()
        self.backend.poll()
        self.sender.clock.advance(self.pollInterval)
        self.sender.clock.advance(self.pollInterval)
        self.assertEqual(len(self.sender.sent), 1)
        self.sender.sent[0][1].callback(None)
        self.backend.poll()
        self.sender.clock.advance(self.pollInterval)
        self.assertEqual(len(self.sender.sent), 1)
        self.assertEqual(self.listing("sent"), ["m.json"])

    def test_inFlightAndNew(self):
        """
        A file written while another is in flight is sent by the next poll.
        """
        self.writeOutbox("1.json", outgoing())
        self.start()
        self.writeOutbox("2.json", outgoing(body="second"))
        self.backend.poll()
        self.assertEqual([m.messageId for m in self.sender.messages()], ["1", "2"])

    def test_dotFilesIgnored(self):
        """
        Files whose names start with C{.} (half-written or hidden files)
        are neither sent nor moved.
        """
        self.writeOutbox(".partial.json", outgoing())
        self.writeOutbox(".hidden", raw=b"nonsense")
        self.start()
        self.sender.clock.advance(self.pollInterval)
        self.assertEqual(self.sender.sent, [])
        self.assertEqual(self.listing("outbox"), [".hidden", ".partial.json"])
        self.assertEqual(self.listing("failed"), [])

    def test_defaults(self):
        """
        Without C{id} the message id is the file name without C{.json};
        without C{content_type} it is C{text/plain; charset=utf-8}.
        """
        self.writeOutbox("greeting.json", outgoing())
        self.writeOutbox("plain", outgoing())
        self.start()
        first, second = self.sender.messages()
        self.assertEqual(first.messageId, "greeting")
        self.assertEqual(first.contentType, DEFAULT_CONTENT_TYPE)
        self.assertEqual(second.messageId, "plain")
        self.assertEqual(second.contentType, DEFAULT_CONTENT_TYPE)

    def test_orderAndBatch(self):
        """
        Files are sent in name order, at most L{spool.BATCH} per poll; the
        rest wait for a later poll.
        """
        self.patch(spool, "BATCH", 2)
        for name in ("c.json", "a.json", "b.json"):
            self.writeOutbox(name, outgoing())
        self.start()
        self.assertEqual([m.messageId for m in self.sender.messages()], ["a", "b"])
        for _, deferred in self.sender.sent:
            deferred.callback(None)
        self.sender.clock.advance(self.pollInterval)
        self.assertEqual([m.messageId for m in self.sender.messages()], ["a", "b", "c"])

    def test_waitingFilesDoNotStarve(self):
        """
        Files in flight or waiting for a retry do not use up a poll's
        batch: a new file behind them is still sent.
        """
        self.patch(spool, "BATCH", 2)
        for name in ("a.json", "b.json"):
            self.writeOutbox(name, outgoing())
        self.start()
        self.writeOutbox("c.json", outgoing())
        self.sender.clock.advance(self.pollInterval)
        self.assertEqual([m.messageId for m in self.sender.messages()], ["a", "b", "c"])

    def test_idOnlyFromJsonSuffix(self):
        """
        The default id drops a final C{.json} only: C{a.json.bak} keeps its
        whole name.
        """
        self.writeOutbox("a.json.bak", outgoing())
        self.start()
        self.assertEqual([m.messageId for m in self.sender.messages()], ["a.json.bak"])

    def test_pollRepeats(self):
        """
        The outbox is read at start and then every poll interval of the
        sender's clock.
        """
        self.start()
        self.writeOutbox("1.json", outgoing())
        self.sender.clock.advance(self.pollInterval - 0.5)
        self.assertEqual(self.sender.sent, [])
        self.sender.clock.advance(0.5)
        self.assertEqual([m.messageId for m in self.sender.messages()], ["1"])
        self.writeOutbox("2.json", outgoing())
        self.sender.clock.advance(self.pollInterval)
        self.assertEqual([m.messageId for m in self.sender.messages()], ["1", "2"])

    def test_stop(self):
        """
        After L{SpoolBackend.stop} the outbox is no longer read; stopping
        twice, or before starting, is harmless.
        """
        SpoolBackend("a.test", self.directory).stop()
        self.start()
        self.backend.stop()
        self.backend.stop()
        self.writeOutbox("1.json", outgoing())
        self.sender.clock.advance(self.pollInterval * 10)
        self.assertEqual(self.sender.sent, [])
        self.assertEqual(self.listing("outbox"), ["1.json"])
        self.assertEqual(self.sender.clock.getDelayedCalls(), [])

    def test_settleAfterStop(self):
        """
        A send still in progress when the backend stops is settled when it
        completes.
        """
        self.writeOutbox("1.json", outgoing())
        self.start()
        self.backend.stop()
        self.sender.sent[0][1].callback(None)
        self.assertEqual(self.listing("sent"), ["1.json"])


class ReportTests(SpoolTestsMixin, SynchronousTestCase):
    """
    Delivery reports move files from C{sent/}, also after a restart.
    """

    def setUp(self):
        super().setUp()
        self.backend.prepare()

    def test_reportAfterRestart(self):
        """
        A file whose id is not its name, accepted before a restart, is found
        by a new backend's report and moved to C{delivered/}; a failed one
        to C{failed/} with its reason.
        """
        self.writeOutbox("2024-note.json", outgoing(id="note/1"))
        self.writeOutbox("other.json", outgoing(id="other-id"))
        self.start()
        for _, sent in self.sender.sent:
            sent.callback(None)
        self.assertEqual(self.listing("sent"), ["2024-note.json", "other.json"])
        self.backend.stop()
        self.backend = SpoolBackend("a.test", self.directory, self.pollInterval)
        self.start()
        delivered, failed = [record for record, _ in self.sender.sent]
        self.backend.deliveryReport(delivered, None)
        self.backend.deliveryReport(failed, Refused(ErrorCode.UNKNOWN_USER, "no bob"))
        self.assertEqual(self.listing("sent"), [])
        self.assertEqual(self.listing("delivered"), ["2024-note.json"])
        self.assertEqual(self.listing("failed"), ["other.json", "other.json.error"])
        self.assertEqual(self.readJSON("failed", "other.json.error")["code"], 514)


class RetryTests(SpoolTestsMixin, SynchronousTestCase):
    """
    A temporary refusal (4xx) keeps the file in C{outbox/} and it is tried
    again later, with backoff, until it is sent, refused permanently, or
    given up after L{spool.GIVE_UP_AFTER} seconds.
    """

    pollInterval = 0.5

    def setUp(self):
        super().setUp()
        self.backend.prepare()
        self.writeOutbox("m.json", outgoing())
        self.start()

    def refuseLast(self, refusal):
        """
        Fail the latest send with C{refusal}.
        """
        self.sender.sent[-1][1].errback(refusal)

    def advanceToNextSend(self, limit=600.0):
        """
        Let poll intervals pass until the next send, at most C{limit}
        seconds.

        @return: the clock's time at that send.
        """
        count = len(self.sender.sent)
        deadline = self.sender.clock.seconds() + limit
        while len(self.sender.sent) == count:
            if self.sender.clock.seconds() >= deadline:
                self.fail(f"not tried again within {limit:g} s")
            self.sender.clock.advance(self.pollInterval)
        return self.sender.clock.seconds()

    def sendsAfter(self, seconds):
        """
        Let C{seconds} pass in poll intervals.

        @return: how many sends have been made in all.
        """
        for _ in range(int(seconds / self.pollInterval)):
            self.sender.clock.advance(self.pollInterval)
        return len(self.sender.sent)

    def test_temporaryKeptAndRetried(self):
        """
        A file refused with a temporary error stays in C{outbox/}, with no
        report, and is sent again after 1 second, then after 2 more; once
        accepted it moves to C{sent/}.
        """
        self.refuseLast(Refused(ErrorCode.RECIPIENT_UNAVAILABLE, "try later"))
        self.assertEqual(self.listing("outbox"), ["m.json"])
        self.assertEqual(self.listing("failed"), [])
        self.assertEqual(self.sendsAfter(0.5), 1)
        self.assertEqual(self.sendsAfter(0.5), 2)
        self.refuseLast(Refused(ErrorCode.TEMPORARY_FAILURE))
        self.assertEqual(self.sendsAfter(1.5), 2)
        self.assertEqual(self.sendsAfter(0.5), 3)
        self.assertEqual(self.sender.messages()[1], self.sender.messages()[2])
        self.sender.sent[-1][1].callback(None)
        self.assertEqual(self.listing("outbox"), [])
        self.assertEqual(self.listing("sent"), ["m.json"])
        self.assertEqual(self.listing("failed"), [])

    def test_retryStateForgotten(self):
        """
        Once a file has been sent, a new file of the same name starts
        afresh: sent at the next poll, and tried again after 1 second if
        refused for now.
        """
        self.refuseLast(Refused(ErrorCode.RECIPIENT_UNAVAILABLE))
        self.advanceToNextSend()
        self.refuseLast(Refused(ErrorCode.RECIPIENT_UNAVAILABLE))
        self.advanceToNextSend()
        self.sender.sent[-1][1].callback(None)
        self.writeOutbox("m.json", outgoing(body="again"))
        self.assertEqual(self.sendsAfter(0.5), 4)
        self.refuseLast(Refused(ErrorCode.RECIPIENT_UNAVAILABLE))
        start = self.sender.clock.seconds()
        self.assertEqual(self.advanceToNextSend() - start, 1)

    def test_backoff(self):
        """
        The waits between tries double from 1 second up to
        L{spool.MAX_BACKOFF}, and stay there.
        """
        times = [self.sender.clock.seconds()]
        while len(times) < 13:
            self.refuseLast(Refused(ErrorCode.SHUTTING_DOWN))
            times.append(self.advanceToNextSend())
        waits = [later - earlier for earlier, later in zip(times, times[1:])]
        self.assertEqual(
            waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, spool.MAX_BACKOFF, 300, 300]
        )
        self.assertEqual(spool.MAX_BACKOFF, 300)

    def test_retryAfter(self):
        """
        A refusal with RETRY_AFTER is tried again after that many seconds.
        """
        self.refuseLast(Refused(ErrorCode.RATE_LIMITED, "slow down", retryAfter=30))
        self.assertEqual(self.sendsAfter(29.5), 1)
        self.assertEqual(self.sendsAfter(0.5), 2)

    def test_permanentAfterTemporary(self):
        """
        A permanent refusal after temporary ones moves the file to
        C{failed/} with the permanent refusal's report.
        """
        self.refuseLast(Refused(ErrorCode.RECIPIENT_UNAVAILABLE))
        self.sendsAfter(1)
        self.refuseLast(Refused(ErrorCode.UNKNOWN_USER, "no user bob"))
        self.assertEqual(self.listing("outbox"), [])
        self.assertEqual(
            self.readJSON("failed", "m.json.error"),
            {"code": 514, "error": "unknown-user", "text": "no user bob"},
        )
        self.assertEqual(self.sendsAfter(10), 2)

    def test_giveUp(self):
        """
        A file still refused temporarily L{spool.GIVE_UP_AFTER} seconds
        after its first refusal moves to C{failed/} with the last refusal's
        report, and is not tried again.
        """
        self.patch(spool, "GIVE_UP_AFTER", 10.0)
        first = self.sender.clock.seconds()
        for _ in range(10):
            self.refuseLast(Refused(ErrorCode.DIALBACK_TIMEOUT, "no answer"))
            if "m.json" not in self.listing("outbox"):
                break
            self.advanceToNextSend()
        self.assertLess(self.sender.clock.seconds() - first, 20)
        self.assertGreaterEqual(self.sender.clock.seconds() - first, 10)
        self.assertEqual(self.listing("failed"), ["m.json", "m.json.error"])
        self.assertEqual(
            self.readJSON("failed", "m.json.error"),
            {"code": 405, "error": "dialback-timeout", "text": "no answer"},
        )
        tries = len(self.sender.sent)
        self.assertEqual(self.sendsAfter(100), tries)

    def test_otherFailure(self):
        """
        A send that fails with something other than L{Refused} counts as a
        temporary internal error: it is tried again, and when given up it
        is reported as C{internal-error} with the failure's message.
        """
        self.patch(spool, "GIVE_UP_AFTER", 2.0)
        self.refuseLast(RuntimeError("the router broke"))
        self.assertEqual(self.listing("failed"), [])
        self.assertEqual(self.sendsAfter(1), 2)
        self.refuseLast(RuntimeError("the router broke"))
        self.sendsAfter(2)
        self.refuseLast(RuntimeError("the router broke"))
        self.assertEqual(self.listing("failed"), ["m.json", "m.json.error"])
        self.assertEqual(
            self.readJSON("failed", "m.json.error"),
            {"code": 406, "error": "internal-error", "text": "the router broke"},
        )

    def test_othersNotHeldUp(self):
        """
        A file waiting to be tried again does not hold up other files.
        """
        self.refuseLast(Refused(ErrorCode.RECIPIENT_UNAVAILABLE))
        self.writeOutbox("n.json", outgoing())
        self.sender.clock.advance(self.pollInterval)
        self.assertEqual([m.messageId for m in self.sender.messages()], ["m", "n"])


class ReceivingTests(SpoolTestsMixin, SynchronousTestCase):
    """
    Messages delivered to the domain are written to C{inbox/}.
    """

    def setUp(self):
        super().setUp()
        self.start()

    def inbox(self):
        """
        @return: the inbox documents, in file name order.
        """
        return [self.readJSON("inbox", name) for name in self.listing("inbox")]

    def test_deliverText(self):
        """
        A delivered message becomes one JSON file in C{inbox/} with C{from},
        C{to}, C{id}, C{content_type} and the body as text; the delivery
        succeeds and leaves nothing in C{tmp/}.
        """
        message = Message(
            sender="bob@b.test",
            recipient="alice@a.test",
            messageId="m-9",
            contentType="text/plain; charset=utf-8",
            body="hi \u2603".encode("utf-8"),
        )
        result = self.successResultOf(self.backend.deliverMessage(message))
        self.assertIsNone(result)
        self.assertEqual(
            self.inbox(),
            [
                {
                    "from": "bob@b.test",
                    "to": "alice@a.test",
                    "id": "m-9",
                    "content_type": "text/plain; charset=utf-8",
                    "body": "hi \u2603",
                }
            ],
        )
        self.assertTrue(self.listing("inbox")[0].endswith(".json"))
        self.assertEqual(self.listing("tmp"), [])

    def test_deliverBinary(self):
        """
        A body that is not UTF-8 is written as C{body_base64}, without
        C{body}.
        """
        body = b"\x89PNG\r\n\x1a\n\xff\x00"
        message = Message(
            sender="bob@b.test",
            recipient="alice@a.test",
            messageId="img",
            contentType="image/png",
            body=body,
        )
        self.successResultOf(self.backend.deliverMessage(message))
        (document,) = self.inbox()
        self.assertNotIn("body", document)
        self.assertEqual(base64.b64decode(document["body_base64"]), body)
        self.assertEqual(document["content_type"], "image/png")
        self.assertEqual(document["id"], "img")

    def test_oneFilePerMessage(self):
        """
        Each delivery writes its own file, even at the same instant, and
        the names list in delivery order.
        """
        ids = []
        for step in (0, 0, 1.5, 0, 1000):
            self.sender.clock.advance(step)
            messageId = f"m{len(ids)}"
            ids.append(messageId)
            self.successResultOf(
                self.backend.deliverMessage(
                    Message(
                        sender="bob@b.test",
                        recipient="alice@a.test",
                        messageId=messageId,
                        contentType=DEFAULT_CONTENT_TYPE,
                        body=b"x",
                    )
                )
            )
        self.assertEqual([d["id"] for d in self.inbox()], ids)

    def test_writeFails(self):
        """
        A delivery that cannot be written fails with
        C{recipient-unavailable}, so that the sender tries again later.
        """
        os.rmdir(self.path("inbox"))
        message = Message(
            sender="bob@b.test",
            recipient="alice@a.test",
            messageId="m",
            contentType=DEFAULT_CONTENT_TYPE,
            body=b"x",
        )
        failure = self.failureResultOf(self.backend.deliverMessage(message), Refused)
        self.assertEqual(failure.value.code, ErrorCode.RECIPIENT_UNAVAILABLE)
        self.assertTrue(failure.value.temporary)
        self.assertEqual(os.listdir(self.path("tmp")), [])

    def test_notificationsRefused(self):
        """
        Notifications are refused as unsupported for now.
        """
        failure = self.failureResultOf(self.backend.deliverNotification(object()), Refused)
        self.assertEqual(failure.value.code, ErrorCode.UNSUPPORTED)


class RegistrationTests(SynchronousTestCase):
    """
    The C{spool} kind is registered and usable from the configuration.
    """

    def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.path = os.path.join(self.base, "imxd.toml")

    def config(self, **options):
        return {
            "domain": [
                {"name": "a.test", "backend": "spool", "backend_options": options}
            ]
        }

    def test_registered(self):
        """
        C{spool} is a known backend kind, built by L{SpoolBackend.fromConfig}
        and checked by L{validateOptions}.
        """
        self.assertIn("spool", backends.backendKinds())
        self.assertIn("memory", backends.backendKinds())
        registration = backends.lookupBackend("spool")
        self.assertEqual(registration.factory, SpoolBackend.fromConfig)
        self.assertIs(registration.validateOptions, validateOptions)

    def test_parseConfig(self):
        """
        A domain with backend C{spool} and a relative C{directory} is
        accepted, with the directory taken from the configuration file's
        directory; parsing creates nothing.
        """
        config = parseConfig(self.config(directory="spool"), self.path, self.base)
        domain = config.domains[0]
        self.assertEqual(domain.backend, "spool")
        self.assertEqual(
            dict(domain.backendOptions),
            {"directory": os.path.join(self.base, "spool"), "pollInterval": 1.0},
        )
        self.assertFalse(os.path.exists(os.path.join(self.base, "spool")))

    def test_parseConfigBadOption(self):
        """
        Options the spool refuses are reported at
        C{domain[0].backend_options}, with the reason.
        """
        for options, part in [
            ({"directory": "spool", "colour": "red"}, "'colour'"),
            ({}, "directory"),
            ({"directory": "spool", "poll_interval": True}, "poll_interval"),
            ({"directory": "spool", "poll_interval": 0}, "greater than 0"),
        ]:
            error = self.assertRaises(
                ConfigError, parseConfig, self.config(**options), self.path, self.base
            )
            self.assertEqual(error.key, "domain[0].backend_options")
            self.assertIn(part, error.problem)

    def test_aggregator(self):
        """
        An L{Aggregator} built from the configuration serves the domain with
        a L{SpoolBackend} on the configured directory, created at once.
        """
        config = parseConfig(
            self.config(directory="spool", poll_interval=2.5), self.path, self.base
        )
        backend = Aggregator(config).domain("a.test").backend
        self.assertIsInstance(backend, SpoolBackend)
        self.assertEqual(backend.directory, os.path.join(self.base, "spool"))
        self.assertEqual(backend.pollInterval, 2.5)
        self.assertEqual(
            set(os.listdir(os.path.join(self.base, "spool"))), set(SUBDIRECTORIES)
        )


def spoolServer(network, host, domain, directory):
    """
    Start a server at C{host:5275} on C{network} hosting C{domain} with a
    spool backend on C{directory} (polled every second), built the way
    L{Network.server} builds its memory-backed servers.

    @return: its L{Federation}.
    """
    config = parseConfig(
        {
            "domain": [
                {
                    "name": domain,
                    "backend": "spool",
                    "backend_options": {"directory": directory},
                }
            ]
        },
        "test.toml",
        ".",
    )
    aggregator = Aggregator(config)
    federation = Federation(
        network.clock,
        PeerSettings(hostedDomains=aggregator.hostedDomains()),
        aggregator,
        DialbackTokens(host.encode() * 4, f"node-{host}"),
        DialbackSecrets(lifetime=15.0),
        Discovery(network.resolver, network.clock),
        network.connector(host),
        LimitsConfig(),
        dialbackTimeout=15.0,
    )
    aggregator.attachFederation(federation)
    aggregator.startService()
    federation.host = host
    network.servers[(host, 5275)] = federation
    network.publish(domain, (0, 0, 5275, f"imx.{host}"))
    return federation


class FederationTests(SpoolTestsMixin, SynchronousTestCase):
    """
    A spool-backed domain served by a real L{Federation} exchanges messages
    with a memory-backed domain on another server of an in-memory network.
    """

    def setUp(self):
        super().setUp()
        self.network = Network()
        self.a = spoolServer(self.network, "10.0.0.1", "a.test", self.directory)
        self.addCleanup(self.a.aggregator.stopService)
        self.b = self.network.server("10.0.0.2", ["b.test"])

    def test_sendAcross(self):
        """
        An outbox file is picked up on the federation's clock, sent to the
        remote domain's server, delivered there, and moved to C{sent/}.
        """
        self.writeOutbox("hello.json", outgoing())
        self.network.advance(1.0)
        received = self.b.aggregator.domain("b.test").backend.messages
        self.assertEqual(
            received,
            [
                Message(
                    sender="alice@a.test",
                    recipient="bob@b.test",
                    messageId="hello",
                    contentType=DEFAULT_CONTENT_TYPE,
                    body=b"Hello, Bob",
                )
            ],
        )
        self.assertEqual(self.listing("outbox"), [])
        self.assertEqual(self.listing("sent"), [])
        self.assertEqual(self.listing("delivered"), ["hello.json"])

    def test_senderMismatch(self):
        """
        A file whose sender is not an address of the spool's domain is
        refused with C{sender-mismatch} and not sent.
        """
        self.writeOutbox("forged.json", outgoing(**{"from": "mallory@b.test"}))
        self.network.advance(1.0)
        self.assertEqual(self.b.aggregator.domain("b.test").backend.messages, [])
        self.assertEqual(self.readJSON("failed", "forged.json.error")["code"], 515)

    def test_receiveAcross(self):
        """
        A message from the remote server is accepted and written to the
        spool's C{inbox/}.
        """
        record = message("bob@b.test", "alice@a.test", "m-7", body=b"Hi Alice")
        sent = self.b.aggregator.domain("b.test").sendMessage(record)
        self.network.flush()
        self.assertIsNone(self.successResultOf(sent))
        self.assertEqual(self.b.aggregator.domain("b.test").backend.reports, [(record, None)])
        (name,) = self.listing("inbox")
        self.assertEqual(
            self.readJSON("inbox", name),
            {
                "from": "bob@b.test",
                "to": "alice@a.test",
                "id": "m-7",
                "content_type": DEFAULT_CONTENT_TYPE,
                "body": "Hi Alice",
            },
        )
