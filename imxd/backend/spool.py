"""
The C{spool} backend: a hosted domain served through a directory, as a mail
spool is.  Any program that can write a file can send, and any program that
can read one can receive; scripts, cron jobs and tests use it.

Layout under the C{directory} option::

    outbox/   JSON files to send; write them elsewhere (tmp/) and rename
              them in, so that imxd never reads half a file
    sent/     files moved here once imxd accepted them (queued durably)
    delivered/ files moved here from sent/ once the receiving server
              acknowledged them
    failed/   files moved here when refused at once, each with NAME.error
              beside it ({"code", "error", "text"}); a message that fails
              later (refused by the receiving server, or given up) is
              moved here from sent/ the same way
    inbox/    one JSON file per message delivered to the domain's users,
              named TIME-SERIAL-DIGEST.json (DIGEST: of sender and id)
    tmp/      scratch space for atomic writes

An outbox file holds C{{"from", "to", "body"}} and optionally C{"id"}
(default: the file name without C{.json}) and C{"content_type"} (default
C{text/plain; charset=utf-8}).  An inbox file holds C{from}, C{to}, C{id},
C{content_type} and C{body} (text), or C{body_base64} when the body is not
UTF-8.

A message already in the inbox when imxd starts is not written again if it
comes a second time (imxd killed between writing it and recording its id).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import os
from typing import Any, Mapping

from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from imxd.backend import BackendError
from imxd.backend import refuseUnknownOptions
from imxd.backend.interfaces import IBackend
from imxd.peer import Refused
from imxd.wire import ErrorCode, Message

#: Outbox files picked up per poll at most.
BATCH = 1000

#: Seconds a message that imxd refused for now (its queue full, shutting
#: down) is tried again before it is moved to C{failed/}.
GIVE_UP_AFTER = 86400.0

#: The longest wait between two tries of one message, in seconds.
MAX_BACKOFF = 300.0

#: The sub-directories of a spool.
SUBDIRECTORIES = ("outbox", "sent", "delivered", "failed", "inbox", "tmp")


def validateOptions(options: Mapping[str, Any], baseDirectory: str = ".") -> dict:
    """
    Check the options of a C{spool} backend.

    @param options: C{directory} (required; relative to C{baseDirectory};
        created with its parents at start) and C{poll_interval} (seconds,
        default 1.0).
    @return: C{{"directory": absolute path, "pollInterval": float}}.
    @raise ValueError: naming the first problem.
    """
    refuseUnknownOptions(options, {"directory", "poll_interval"})
    directory = options.get("directory")
    if not isinstance(directory, str) or not directory:
        raise ValueError("directory: required, a path")
    interval = options.get("poll_interval", 1.0)
    if isinstance(interval, bool) or not isinstance(interval, (int, float)):
        raise ValueError("poll_interval: expected a number of seconds")
    if interval <= 0:
        raise ValueError("poll_interval: must be greater than 0")
    path = os.path.normpath(os.path.join(baseDirectory, directory))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"directory: not a directory: {path}")
    return {"directory": path, "pollInterval": float(interval)}


@implementer(IBackend)
class SpoolBackend:
    """
    A hosted domain whose users are served through a spool directory.

    @ivar domain: the normalised name of the hosted domain served.
    @ivar directory: the spool's absolute path.
    """

    log = Logger()

    def __init__(self, domain: str, directory: str, pollInterval: float = 1.0):
        self.domain = domain
        self.directory = directory
        self.pollInterval = pollInterval
        self._sender: Any = None
        self._poller: Any = None
        self._inFlight: set[str] = set()
        self._retries: dict[str, tuple[float, int, float]] = {}
        self._serial = itertools.count()
        self._inboxDigests: set[str] = set()
        self._sentNames: dict[str, str] = {}
        self.duplicates = 0

    @classmethod
    def fromConfig(cls, domainConfig: Any) -> "SpoolBackend":
        """
        Build the backend of a hosted domain from its validated options.
        """
        options = domainConfig.backendOptions
        backend = cls(domainConfig.name, options["directory"], options["pollInterval"])
        backend.prepare()
        return backend

    def prepare(self) -> None:
        """
        Create the spool and its sub-directories (mode 0700) if missing.

        @raise BackendError: they cannot be created.
        """
        for name in SUBDIRECTORIES:
            path = self._path(name)
            try:
                os.makedirs(path, mode=0o700, exist_ok=True)
            except OSError as e:
                raise BackendError(
                    f"{self.domain}: spool directory {path}: cannot create: "
                    f"{e.strerror or e}"
                ) from None

    def _path(self, *parts: str) -> str:
        return os.path.join(self.directory, *parts)

    def start(self, sender: Any) -> None:
        """
        Poll the outbox from now on; see L{IBackend.start}.
        """
        self.prepare()
        self._inboxDigests = {
            name[:-5].rpartition("-")[2]
            for name in os.listdir(self._path("inbox"))
            if name.endswith(".json")
        }
        self._sentNames = self._idsInSent()
        self._sender = sender
        self._poller = task.LoopingCall(self.poll)
        self._poller.clock = sender.clock
        self._poller.start(self.pollInterval, now=True).addErrback(
            lambda failure: self.log.failure("spool poller stopped", failure)
        )

    def stop(self) -> None:
        """
        Stop polling; see L{IBackend.stop}.
        """
        if self._poller is not None and self._poller.running:
            self._poller.stop()

    # -- sending ------------------------------------------------------------

    def poll(self) -> None:
        """
        Send every new file in the outbox (at most L{BATCH} per poll).
        """
        try:
            names = sorted(os.listdir(self._path("outbox")))
        except OSError as e:
            self.log.error("cannot read {path}: {e}", path=self._path("outbox"), e=e)
            return
        now = self._sender.clock.seconds()
        ready = [name for name in names if self._ready(name, now)]
        for name in ready[:BATCH]:
            self._inFlight.add(name)
            try:
                record = self._read(name)
            except Refused as refusal:
                self._settle(name, refusal)
                continue
            sent = self._sender.sendMessage(record)
            sent.addCallbacks(
                lambda _, name=name, id=record.messageId: self._settle(name, None, id),
                lambda failure, name=name: self._settle(name, _refusal(failure)),
            )

    def _ready(self, name: str, now: float) -> bool:
        """
        @return: whether an outbox file is to be sent now: not a dot-file,
            not in flight, not waiting for its next try.
        """
        if name.startswith(".") or name in self._inFlight:
            return False
        retry = self._retries.get(name)
        return retry is None or retry[2] <= now

    def _read(self, name: str, directory: str = "outbox") -> Message:
        """
        @return: the MESSAGE an outbox (or sent) file describes.
        @raise Refused: C{malformed}, saying what is wrong with the file.
        """
        try:
            with open(self._path(directory, name), "rb") as f:
                data = json.loads(f.read().decode("utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            data.setdefault("id", name[: -len(".json")] if name.endswith(".json") else name)
            data.setdefault("content_type", "text/plain; charset=utf-8")
            return Message(
                sender=_text(data, "from"),
                recipient=_text(data, "to"),
                messageId=_text(data, "id"),
                contentType=_text(data, "content_type"),
                body=_text(data, "body").encode("utf-8"),
            )
        except (OSError, ValueError, TypeError) as e:
            raise Refused(ErrorCode.MALFORMED, f"{name}: {e}") from None

    def _settle(self, name: str, refusal: Any, messageId: str = "") -> None:
        """
        Move an accepted file to C{sent/}, or a refused one to C{failed/}
        with its reason beside it.
        """
        self._inFlight.discard(name)
        if refusal is not None and refusal.temporary and self._later(name, refusal):
            return
        self._retries.pop(name, None)
        source = self._path("outbox", name)
        try:
            if refusal is None:
                os.replace(source, self._path("sent", name))
                self._sentNames[messageId] = name
                return
            self._fail(source, name, refusal)
        except OSError as e:
            self.log.error("cannot settle {name}: {e}", name=name, e=e)
        if refusal is not None:
            self.log.info(
                "{domain}: {name} refused: {refusal}",
                domain=self.domain,
                name=name,
                refusal=str(refusal),
            )

    def _later(self, name: str, refusal: Refused) -> bool:
        """
        Schedule another try of a message refused with a temporary error:
        exponential backoff (1, 2, 4 ... L{MAX_BACKOFF} seconds) or the
        peer's RETRY_AFTER, for at most L{GIVE_UP_AFTER} seconds.

        @return: C{False} when the message has been tried for too long.
        """
        now = self._sender.clock.seconds()
        first, attempts, _ = self._retries.get(name, (now, 0, now))
        if now - first >= GIVE_UP_AFTER:
            return False
        delay = refusal.retryAfter or min(MAX_BACKOFF, 2.0**attempts)
        self._retries[name] = (first, attempts + 1, now + delay)
        self.log.info(
            "{domain}: {name} refused for now ({refusal}); trying again in {delay:g} s",
            domain=self.domain,
            name=name,
            refusal=str(refusal),
            delay=delay,
        )
        return True

    def _idsInSent(self) -> dict:
        """
        @return: C{{message id: file name}} for the files in C{sent/} (the
            messages imxd holds from before a restart), so that their
            reports find them.
        """
        names = {}
        for name in os.listdir(self._path("sent")):
            try:
                names[self._read(name, "sent").messageId] = name
            except Refused:
                continue
        return names

    def _fail(self, source: str, name: str, refusal: Refused) -> None:
        """
        Move C{source} to C{failed/NAME} with its reason in NAME.error.
        """
        report = {"code": refusal.code, "error": refusal.token, "text": refusal.text}
        self._writeAtomically(self._path("failed", name + ".error"), report)
        os.replace(source, self._path("failed", name))

    def deliveryReport(self, message: Message, refusal: Any) -> None:
        """
        Move the message's file from C{sent/} to C{delivered/}, or to
        C{failed/} with its reason (written there again if the sent file
        is gone); see L{IBackend.deliveryReport}.  The file is found by the
        name it had (read from the files in C{sent/} after a restart), or
        else as C{ID.json}.
        """
        name = self._sentNames.pop(message.messageId, None)
        if name is None:
            name = _safeName(message.messageId) + ".json"
        source = self._path("sent", name)
        try:
            if refusal is None:
                with contextlib.suppress(FileNotFoundError):
                    os.replace(source, self._path("delivered", name))
                return
            if not os.path.exists(source):
                self._writeAtomically(self._path("tmp", name), _document(message))
                source = self._path("tmp", name)
            self._fail(source, name, refusal)
        except OSError as e:
            self.log.error("cannot settle {name}: {e}", name=name, e=e)
            return
        self.log.info(
            "{domain}: {name} failed: {refusal}",
            domain=self.domain,
            name=name,
            refusal=str(refusal),
        )

    # -- receiving ------------------------------------------------------------

    def deliverMessage(self, message: Message) -> defer.Deferred:
        """
        Write a delivered message to C{inbox/}; see
        L{IBackend.deliverMessage}.  A write that fails is reported as
        C{recipient-unavailable}, so the sender retries.
        """
        digest = hashlib.sha256(
            f"{message.sender}\0{message.messageId}".encode("utf-8")
        ).hexdigest()[:24]
        if digest in self._inboxDigests:
            self.duplicates += 1
            return defer.succeed(None)
        now = int(self._sender.clock.seconds() * 1000) if self._sender else 0
        name = f"{now:015d}-{next(self._serial):08d}-{digest}.json"
        try:
            self._writeAtomically(self._path("inbox", name), _document(message))
        except OSError as e:
            return defer.fail(
                Refused(ErrorCode.RECIPIENT_UNAVAILABLE, f"spool write failed: {e.strerror}")
            )
        return defer.succeed(None)

    def decideSubscription(self, subscriber: str, publisher: str) -> defer.Deferred:
        """
        A spool has no presence to share: every subscription request is
        denied.
        """
        return defer.succeed("denied")

    def subscriptionChanged(self, subscriber: str, publisher: str, state: str) -> None:
        """
        A spool's users do not subscribe; nothing to record.
        """

    def userAttributes(self, user: str, requester: str) -> defer.Deferred:
        """
        A spool keeps no attributes of its users.
        """
        return defer.succeed({})

    def deliverNotification(self, notification: Any) -> defer.Deferred:
        """
        A spool's users never subscribe, so a notification for them is
        refused.
        """
        return defer.fail(
            Refused(ErrorCode.UNSUPPORTED, "the spool backend takes no notifications yet")
        )

    def _writeAtomically(self, path: str, document: dict) -> None:
        """
        Write JSON to C{tmp/} and rename it into place.
        """
        scratch = self._path("tmp", f".{os.getpid()}-{next(self._serial)}")
        try:
            with open(scratch, "w", encoding="utf-8") as f:
                json.dump(document, f, ensure_ascii=False)
            os.replace(scratch, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.remove(scratch)
            raise


def _text(data: dict, key: str) -> str:
    """
    @return: a required string member of an outbox file.
    @raise ValueError: it is missing or not a string.
    """
    value = data.get(key)
    if not isinstance(value, str):
        raise ValueError(f'"{key}" must be a string')
    return value


def _document(message: Message) -> dict:
    """
    @return: the JSON document of a message, as inbox files hold it.
    """
    document = {
        "from": message.sender,
        "to": message.recipient,
        "id": message.messageId,
        "content_type": message.contentType,
    }
    try:
        document["body"] = message.body.decode("utf-8")
    except UnicodeDecodeError:
        document["body_base64"] = base64.b64encode(message.body).decode("ascii")
    return document


def _safeName(text: str) -> str:
    """
    @return: C{text} with every character but letters, digits, C{.},
        C{_} and C{-} replaced by C{_} (a MESSAGE_ID as a file name).
    """
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in text)
    return safe.lstrip(".") or "_"


def _refusal(failure: Any) -> Refused:
    """
    @return: the L{Refused} a failed send carries, or an internal error.
    """
    if failure.check(Refused):
        return failure.value
    return Refused(ErrorCode.INTERNAL_ERROR, failure.getErrorMessage())
