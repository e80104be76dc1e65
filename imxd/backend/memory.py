"""
The C{memory} backend: keeps what it is given in lists.

It exists for tests and for running imxd before a real backend is chosen.
It accepts no options.
"""

from __future__ import annotations

from typing import Any, Mapping

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from imxd.backend.interfaces import IBackend


def validateOptions(options: Mapping[str, Any], baseDirectory: str = ".") -> dict:
    """
    Check the options of a C{memory} backend: it has none.

    @param options: the C{backend_options} table.
    @param baseDirectory: unused (the memory backend has no paths).
    @return: an empty L{dict}.
    @raise ValueError: naming the first unknown option, if there is any.
    """
    if options:
        name = sorted(options)[0]
        raise ValueError(
            f"unknown option {name!r}: the memory backend takes no options"
        )
    return {}


@implementer(IBackend)
class MemoryBackend:
    """
    A backend that records every message and notification delivered to it.

    @ivar domain: the normalised name of the hosted domain served.
    @ivar messages: the messages delivered, oldest first.
    @ivar notifications: the notifications delivered, oldest first.
    @ivar reports: C{(message, refusal)} for each delivery report on a
        message this domain sent (C{refusal} L{None}: delivered).
    """

    def __init__(self, domain: str) -> None:
        """
        @param domain: the normalised name of the hosted domain served.
        """
        self.domain = domain
        self.sender: Any = None
        self.defaultDecision = "pending"
        self.decisions: dict[str, str] = {}
        self.subscriptionRequests: list[tuple[str, str]] = []
        self.subscriptionChanges: list[tuple[str, str, str]] = []
        self.attributes: dict[str, dict[str, str]] = {}
        self.messages: list[Any] = []
        self.notifications: list[Any] = []
        self.reports: list[tuple[Any, Any]] = []

    @classmethod
    def fromConfig(cls, domainConfig: Any) -> "MemoryBackend":
        """
        Build the backend of a hosted domain.

        @param domainConfig: the domain's L{imxd.config.DomainConfig}.
        @return: a new, empty L{MemoryBackend}.
        """
        return cls(domainConfig.name)

    def start(self, sender: Any) -> None:
        """
        Keep the hosted domain so that tests can send through
        C{self.sender.sendMessage}; see L{IBackend.start}.
        """
        self.sender = sender

    def stop(self) -> None:
        """
        Nothing to release; see L{IBackend.stop}.
        """

    def deliverMessage(self, message: Any) -> Deferred[None]:
        """
        Record C{message}; see L{IBackend.deliverMessage}.

        @return: a L{Deferred} that has already fired with L{None}.
        """
        self.messages.append(message)
        return succeed(None)

    def deliveryReport(self, message: Any, refusal: Any) -> None:
        """
        Record the report; see L{IBackend.deliveryReport}.
        """
        self.reports.append((message, refusal))

    def decideSubscription(self, subscriber: str, publisher: str) -> Deferred[str]:
        """
        Record the request and answer from C{decisions} (by publisher), or
        C{defaultDecision}; see L{IBackend.decideSubscription}.
        """
        self.subscriptionRequests.append((subscriber, publisher))
        return succeed(self.decisions.get(publisher, self.defaultDecision))

    def subscriptionChanged(self, subscriber: str, publisher: str, state: str) -> None:
        """
        Record the change; see L{IBackend.subscriptionChanged}.
        """
        self.subscriptionChanges.append((subscriber, publisher, state))

    def userAttributes(self, user: str, requester: str) -> Deferred[dict]:
        """
        Answer from C{attributes} (by user), or no attributes; see
        L{IBackend.userAttributes}.
        """
        return succeed(dict(self.attributes.get(user, {})))

    def deliverNotification(self, notification: Any) -> Deferred[None]:
        """
        Record C{notification}; see L{IBackend.deliverNotification}.

        @return: a L{Deferred} that has already fired with L{None}.
        """
        self.notifications.append(notification)
        return succeed(None)

    def __repr__(self) -> str:
        return (
            f"<MemoryBackend {self.domain} messages={len(self.messages)}"
            f" notifications={len(self.notifications)}>"
        )
