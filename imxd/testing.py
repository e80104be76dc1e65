"""
Test support for backend adapters: L{BackendContractMixin}, the contract
every adapter must pass, and L{FakeDomainService}, an
L{IDomainService} that records what an adapter asks of imxd.

An adapter's test module mixes the contract into a trial test case and
says how to build the adapter::

    class MyBackendContractTests(BackendContractMixin, SynchronousTestCase):
        def makeBackend(self):
            return MyBackend("example.test", ...)
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from imxd.backend.interfaces import DECISIONS, IBackend, IDomainService
from imxd.peer import Refused
from imxd.wire import ErrorCode, Message, Notify


@implementer(IDomainService)
class FakeDomainService:
    """
    An L{IDomainService} that records every call and answers at once.

    @ivar calls: C{(method name, arguments)} in order.
    """

    def __init__(self, name):
        self.name = name
        self.clock = Clock()
        self.calls = []

    def _record(self, method, *arguments, result=None):
        self.calls.append((method, arguments))
        return defer.succeed(result)

    def sendMessage(self, message):
        return self._record("sendMessage", message)

    def sendMessageThen(self, message, onAccepted, onFailure, *args, onOutcome=None):
        self.sendMessage(message).addCallbacks(onAccepted, onFailure, args, None, args)

    def subscribe(self, subscriber, publisher):
        return self._record("subscribe", subscriber, publisher, result="pending")

    def unsubscribe(self, subscriber, publisher):
        return self._record("unsubscribe", subscriber, publisher)

    def decide(self, publisher, subscriber, grant):
        return self._record("decide", publisher, subscriber, grant)

    def publishPresence(self, user, presence, status=None, attributes=None):
        return self._record("publishPresence", user, presence, status, result=0)

    def remoteAttributes(self, requester, target):
        return self._record("remoteAttributes", requester, target, result={})


class BackendContractMixin:
    """
    What every backend adapter must do.  Subclasses define L{makeBackend}
    and may override L{user} (an address the backend knows as a user of
    its domain).
    """

    domainName = "contract.test"

    def makeBackend(self):
        """
        @return: a new adapter serving L{domainName}.
        """
        raise NotImplementedError

    def user(self):
        """
        @return: an address of a user the backend knows.
        """
        return f"user@{self.domainName}"

    def setUp(self):
        super().setUp()
        self.backend = self.makeBackend()
        self.service = FakeDomainService(self.domainName)
        self.backend.start(self.service)
        self.addCleanup(self.backend.stop)

    def test_provides(self):
        """
        The adapter provides L{IBackend} and names its domain.
        """
        self.assertTrue(verifyObject(IBackend, self.backend))
        self.assertEqual(self.backend.domain, self.domainName)

    def test_deliverMessage(self):
        """
        A message for a user is accepted: the Deferred fires with L{None}.
        """
        message = Message(
            sender="someone@elsewhere.test",
            recipient=self.user(),
            messageId="contract-1",
            contentType="text/plain; charset=utf-8",
            body=(
                f"From: someone@elsewhere.test\r\nTo: {self.user()}\r\n"
                "Content-Type: text/plain; charset=utf-8\r\n\r\nhello"
            ).encode("utf-8"),
        )
        self.assertIsNone(self.successResultOf(self.backend.deliverMessage(message)))

    def test_deliveryReport(self):
        """
        Reports on a message one of its users sent, delivered or failed,
        are taken without error.
        """
        message = Message(
            sender=self.user(),
            recipient="someone@elsewhere.test",
            messageId="contract-2",
            contentType="text/plain; charset=utf-8",
            body=b"hello",
        )
        refusal = Refused(ErrorCode.UNKNOWN_USER, "no such user")
        for outcome in (None, refusal):
            self.successResultOf(
                defer.maybeDeferred(self.backend.deliveryReport, message, outcome)
            )

    def test_deliverNotificationAnswers(self):
        """
        A notification is accepted or refused with L{imxd.peer.Refused},
        never left unanswered.
        """
        notify = Notify(
            publisher="someone@elsewhere.test", subscribers=(self.user(),), presence="online"
        )
        result = defer.maybeDeferred(self.backend.deliverNotification, notify)
        outcome = []
        result.addBoth(outcome.append)
        self.assertEqual(len(outcome), 1)
        if isinstance(outcome[0], defer.Failure):
            self.assertTrue(outcome[0].check(Refused))
        else:
            self.assertIsNone(outcome[0])

    def test_decideSubscription(self):
        """
        A subscription request is decided: granted, denied or pending.
        """
        decision = self.successResultOf(
            defer.maybeDeferred(
                self.backend.decideSubscription, "someone@elsewhere.test", self.user()
            )
        )
        self.assertIn(decision, DECISIONS)

    def test_subscriptionChanged(self):
        """
        A change of one of its users' subscriptions is taken without error.
        """
        for state in ("pending", "granted", "denied", "cancelled", "expired"):
            self.successResultOf(
                defer.maybeDeferred(
                    self.backend.subscriptionChanged,
                    self.user(),
                    "someone@elsewhere.test",
                    state,
                )
            )

    def test_userAttributes(self):
        """
        User attributes are a mapping of names to text.
        """
        values = self.successResultOf(
            defer.maybeDeferred(
                self.backend.userAttributes, self.user(), "someone@elsewhere.test"
            )
        )
        self.assertTrue(all(isinstance(k, str) for k in values))
        self.assertTrue(all(isinstance(v, str) for v in values.values()))
