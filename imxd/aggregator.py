"""
The Aggregator: the root service of an imxd process, and one
L{VirtualDomain} per hosted domain.

The listeners, the federation (peer connections, outbound pool) and the
router are attached by L{imxd.tap.makeService}.
"""

from __future__ import annotations

from typing import Optional

from twisted.application import service
from twisted.logger import Logger

from imxd.backend import lookupBackend
from imxd.backend.interfaces import IDomainService
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.python.failure import Failure
from zope.interface import implementer

from imxd.config import Config, DomainConfig
from imxd.content import mediaTypeOf
from imxd.peer import Refused
from imxd.presence import Presence
from imxd.wire import ErrorCode, Message, withTag

__all__ = ["VirtualDomain", "Aggregator"]


@implementer(IDomainService)
class VirtualDomain(service.Service):
    """
    One hosted domain: its configuration and its backend adapter.

    The service is named after the domain.

    @ivar config: the domain's L{DomainConfig}.
    @ivar backend: its backend adapter, providing
        L{imxd.backend.interfaces.IBackend}.
    """

    _log = Logger()

    def __init__(self, config: DomainConfig) -> None:
        """
        Build the domain's backend from its registered kind.

        @param config: the domain's L{DomainConfig}, already validated.
        """
        self.config = config
        self.name = config.name
        self.backend = lookupBackend(config.backend).factory(config)
        self.presence = Presence(self)

    def startService(self) -> None:
        """
        Start serving the domain; logs one line.
        """
        super().startService()
        self.presence.start()
        self.backend.start(self)
        self._log.info(
            "Hosting {domain} (backend {backend})",
            domain=self.config.name,
            backend=self.config.backend,
        )

    def stopService(self):
        """
        Stop the backend.
        """
        super().stopService()
        self.presence.stop()
        return self.backend.stop()

    @property
    def clock(self):
        """
        The clock the federation runs on, for backends that schedule work.
        """
        return self.parent.federation.clock

    @property
    def serverConfig(self):
        """
        The process's L{imxd.config.ServerConfig}, once part of an
        Aggregator.
        """
        return self.parent.config.server if self.parent is not None else None

    # -- IDomainService ------------------------------------------------------

    def route(self, record) -> Deferred:
        """
        Send a Data record from this domain: to another hosted domain in
        process, or to the remote domain's server.

        @return: a L{Deferred} firing with the answer (an ACK or a response
            record), or failing with L{imxd.peer.Refused}
            (C{sender-mismatch} if the sender is not of this domain).
        """
        router = self.parent.router if self.parent is not None else None
        if router is None:
            return fail(Refused(ErrorCode.SHUTTING_DOWN, "imxd is not routing"))
        return router.send(record, self.name)

    def sendMessage(self, message: Message) -> Deferred:
        """
        See L{IDomainService.sendMessage}.
        """
        accepted = Deferred()
        self.sendMessageThen(message, accepted.callback, accepted.errback)
        return accepted

    def sendMessageThen(self, message: Message, onAccepted, onFailure, *args, onOutcome=None) -> None:
        """
        L{sendMessage}, calling C{onAccepted(None, *args)} or
        C{onFailure(failure, *args)} instead of returning a L{Deferred}
        (for imxd's own link listener, on the per-message path);
        C{onOutcome} as for L{imxd.outbox.Outbox.submitThen}.
        """
        router = self.parent.router if self.parent is not None else None
        if router is None:
            onFailure(Failure(Refused(ErrorCode.SHUTTING_DOWN, "imxd is not routing")), *args)
            return
        try:
            router.submitThen(message, self.name, onAccepted, onFailure, args, onOutcome)
        except Exception:
            onFailure(Failure(), *args)

    def deliveryReport(self, message: Message, refusal) -> None:
        """
        Tell the backend what became of a message it sent (L{None}:
        delivered); a backend that fails to take the report is logged.
        """
        try:
            taken = self.backend.deliveryReport(message, refusal)
        except Exception:
            taken = fail()
        # Most backends take a report at once and return None: no Deferred
        # is made for them (one report per message sent).
        if taken is not None and isinstance(taken, Deferred):
            taken.addErrback(self._reportNotTaken)

    def _reportNotTaken(self, failure) -> None:
        self._log.failure(
            "{domain}: the backend failed to take a delivery report",
            failure,
            domain=self.name,
        )

    def subscribe(self, subscriber: str, publisher: str) -> Deferred:
        """
        See L{IDomainService.subscribe}.
        """
        return self.presence.subscribe(subscriber, publisher)

    def unsubscribe(self, subscriber: str, publisher: str) -> Deferred:
        """
        See L{IDomainService.unsubscribe}.
        """
        return self.presence.unsubscribe(subscriber, publisher)

    def decide(self, publisher: str, subscriber: str, grant: bool) -> Deferred:
        """
        See L{IDomainService.decide}.
        """
        return self.presence.decide(publisher, subscriber, grant)

    def publishPresence(self, user: str, presence: str, status=None, attributes=None) -> Deferred:
        """
        See L{IDomainService.publishPresence}.
        """
        return self.presence.publish(user, presence, status, attributes)

    def remoteAttributes(self, requester: str, target: str) -> Deferred:
        """
        See L{IDomainService.remoteAttributes}.
        """
        return self.presence.remoteAttributes(requester, target)

    # -- receiving ----------------------------------------------------------

    def receive(self, record) -> Deferred:
        """
        A Data record for this domain (tag 0).  A MESSAGE is checked against
        the domain's accepted types and size, then handed to the backend;
        the rest goes to the presence service.

        @return: a L{Deferred} firing with the response record, or L{None}
            for an ACK; or failing with L{imxd.peer.Refused}.
        """
        if not isinstance(record, Message):
            return self.presence.receive(record)
        received = Deferred()
        self.receiveMessageThen(record, received.callback, received.errback)
        return received

    def receiveMessageThen(self, message: Message, onAccepted, onFailure, args=()) -> None:
        """
        L{receive} for a MESSAGE, calling C{onAccepted(None, *args)} or
        C{onFailure(failure, *args)} (C{args} a tuple); a backend with the optional
        C{deliverMessageThen} (L{imxd.backend.interfaces.IFastBackend}) is
        asked without a L{Deferred}, and given the message as it arrived
        (tag and all: it sends it on with a tag of its own); any other
        backend gets it with tag 0.
        """
        config = self.config
        mediaType = mediaTypeOf(message.contentType)
        if mediaType not in config.acceptedTypes:
            refusal = Refused(
                ErrorCode.MEDIA_TYPE_REFUSED,
                f"{self.name} accepts {', '.join(config.acceptedTypes)}, not {mediaType}",
            )
        elif len(message.body) > config.maxMessageSize:
            refusal = Refused(
                ErrorCode.MESSAGE_TOO_LARGE,
                f"{len(message.body)} octets; {self.name} accepts at most "
                f"{config.maxMessageSize}",
            )
        else:
            refusal = None
        if refusal is not None:
            onFailure(Failure(refusal), *args)
            return
        fast = getattr(self.backend, "deliverMessageThen", None)
        if fast is not None:
            try:
                fast(message, onAccepted, onFailure, *args)
            except Exception:
                onFailure(Failure(), *args)
            return
        if message.tag:
            message = withTag(message, 0)
        delivered = maybeDeferred(self.backend.deliverMessage, message)
        delivered.addCallbacks(onAccepted, onFailure, args, None, args)

    def __repr__(self) -> str:
        return f"<VirtualDomain {self.config.name} backend={self.config.backend}>"


class Aggregator(service.MultiService):
    """
    The root service: all hosted domains and the listeners they share.

    @ivar config: the L{Config} the Aggregator was built from.
    @ivar dialbackSecret: the server secret that signs dial-back tokens, or
        L{None}.
    @ivar federation: the L{imxd.federation.Federation}, once attached.
    @ivar router: the L{imxd.router.Router} hosted domains send through,
        once attached.
    @ivar database: the L{imxd.store.Database} of the process's durable
        state, once attached.
    """

    def __init__(self, config: Config, dialbackSecret: Optional[bytes] = None) -> None:
        """
        Add one L{VirtualDomain} child per hosted domain.

        @param config: the validated configuration.
        @param dialbackSecret: the server secret
            (L{imxd.dialback.loadOrCreateSecret}), if dial-back is to run.
        """
        super().__init__()
        self.config = config
        self.dialbackSecret = dialbackSecret
        self.federation = None
        self.router = None
        self.database = None
        self._domains: dict[str, VirtualDomain] = {}
        for domainConfig in config.domains:
            virtualDomain = VirtualDomain(domainConfig)
            virtualDomain.setServiceParent(self)
            self._domains[domainConfig.name] = virtualDomain
        self._hosted = frozenset(self._domains)

    def startService(self) -> None:
        """
        Take up the federation's queued messages first (so that what
        backends send at start queues behind them), then start the hosted
        domains.
        """
        if self.federation is not None:
            self.federation.start()
        super().startService()

    def stopService(self):
        """
        Stop the federation's timers and the hosted domains, then close the
        database.
        """
        if self.federation is not None:
            self.federation.stop()
        stopped = super().stopService()
        if self.database is not None:
            stopped.addBoth(self._closeDatabase)
        return stopped

    def _closeDatabase(self, result):
        self.database.close()
        return result

    def attachFederation(self, federation) -> None:
        """
        Route through C{federation} from now on.

        @param federation: the L{imxd.federation.Federation} serving this
            process's peer connections.
        """
        self.federation = federation
        self.router = federation.router
        self.database = federation.database

    def sharedBackendServices(self, reactor) -> list:
        """
        The process-wide services the hosted domains' backends share (the
        local backend's client API listeners, for example), from each
        kind's L{imxd.backend.BackendRegistration.makeServices}.

        @param reactor: the reactor those services use.
        """
        byKind: dict[str, list] = {}
        for virtualDomain in self._domains.values():
            byKind.setdefault(virtualDomain.config.backend, []).append(virtualDomain.backend)
        services = []
        for kind, backends in sorted(byKind.items()):
            makeServices = lookupBackend(kind).makeServices
            if makeServices is not None:
                services.extend(makeServices(backends, reactor))
        return services

    def domain(self, name: str) -> Optional[VirtualDomain]:
        """
        @param name: a normalised domain name.
        @return: the L{VirtualDomain} hosting it, or L{None}.
        """
        return self._domains.get(name)

    def hostedDomains(self) -> frozenset[str]:
        """
        @return: the normalised names of every hosted domain.
        """
        return self._hosted
