"""
The outbound pool: connections this server opens to remote domains.

A connection is opened on demand when a hosted domain first has Data for a
remote domain, found through discovery (SRV targets tried in order until one
answers), shared by every hosted domain and user, and closed by the idle
timeout of the connection itself; the next Data opens a new one.  At most
C{maxPerPeer} connections are kept per remote domain.  A REDIRECT received
on a connection this server opened moves that domain to the given address,
within the safety rules of C{docs/protocol.md} section 14.
"""

import ipaddress

import attrs
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from imxd.discovery import DiscoveryError, NoService, Target
from imxd.peer import REQUEST_TIMEOUT, Refused, RemoteError
from imxd.waiters import Waiters
from imxd.wire import EncodeError, ErrorCode

#: Redirects followed in a row for one domain before discovery is used again.
MAX_REDIRECTS = 3

#: The longest a redirect address replaces discovery, in seconds.  It is
#: also cut to the expiry of the discovery answer it replaces, but kept at
#: least L{MIN_REDIRECT_LIFETIME}.
REDIRECT_LIFETIME = 3600.0
MIN_REDIRECT_LIFETIME = 60.0

#: Times a request refused with C{shutting-down} is sent again on another
#: connection.
RESEND_ATTEMPTS = 3


def tcpConnector(reactor, resolver, timeout):
    """
    The pool's way of opening TCP connections: host names are resolved with
    the server's own resolver (the one discovery uses), never with an
    address a peer sent.

    @param reactor: an L{IReactorTCP} and L{IReactorTime} provider.
    @param resolver: an L{IResolver} for host names.
    @param timeout: seconds allowed for each TCP connect.
    @return: C{connect(host, port, protocol)} returning a L{Deferred} that
        fires once the TCP connection is made.
    """

    def connect(host, port, protocol):
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            resolved = resolver.getHostByName(host, timeout=(timeout,))
            return resolved.addCallback(lambda ip: connect(ip, port, protocol))
        endpointType = TCP6ClientEndpoint if address.version == 6 else TCP4ClientEndpoint
        endpoint = endpointType(reactor, str(address), port, timeout=timeout)
        return endpoint.connect(_OneConnection(protocol))

    return connect


class _OneConnection(Factory):
    """
    A factory for exactly one connection, built elsewhere; quiet in logs.
    """

    noisy = False

    def __init__(self, protocol):
        self._protocol = protocol

    def buildProtocol(self, addr):
        return self._protocol


class RedirectTarget(Target):
    """
    An address a REDIRECT gave: connections to it are authenticated like
    any other but do not carry the trust of this server's own discovery.
    """


@attrs.define
class Redirection:
    """
    Where a REDIRECT sent a remote domain.

    @ivar target: the address to use instead of discovery.
    @ivar expiry: clock seconds after which discovery is used again.
    @ivar hops: redirects followed in a row for the domain.
    """

    target: Target
    expiry: float
    hops: int


class OutboundPool:
    """
    The connections this server opened, by the remote domain they were
    dialled for.
    """

    log = Logger()

    def __init__(self, federation, discovery, connect, clock, maxPerPeer=2):
        """
        @param federation: the L{imxd.federation.Federation} that builds the
            connections.
        @param discovery: the L{imxd.discovery.Discovery}.
        @param connect: C{connect(host, port, protocol)} (L{tcpConnector}).
        @param clock: an L{IReactorTime} provider.
        @param maxPerPeer: the most connections kept to one remote domain.
        """
        self.federation = federation
        self.discovery = discovery
        self._connect = connect
        self.clock = clock
        self.maxPerPeer = maxPerPeer
        self._connections = {}
        self._opening = {}
        self.redirections = {}

    # -- connections ------------------------------------------------------

    def connection(self, domain, trusted=False, localDomain=None):
        """
        An open connection dialled for C{domain}: one already open and
        usable, or a new one.

        @param trusted: require a connection whose address came from this
            server's own discovery, never from a REDIRECT (for dial-back's
            Connection 2).
        @param localDomain: the hosted domain that needs it: a new
            connection presents its certificate in TLS.
        @return: a L{Deferred} firing with the
            L{imxd.federation.FederationProtocol} once its HELLO exchange is
            done, or failing with L{Refused}.
        """
        usable = [
            c
            for c in self._connections.get(domain, ())
            if c.usable()
            and (c.trusted or not trusted)
            and (localDomain is None or c.pairTLSRefusal(localDomain, domain) is None)
        ]
        if usable:
            return defer.succeed(min(usable, key=lambda c: c.pendingRequests()))
        tls = self.federation.tls
        mode = None if tls is None else tls.connectionMode(domain, localDomain)
        key = (domain, trusted, mode)
        waiters = self._opening.get(key)
        if waiters is None:
            refusal = self._openingRefusal(domain)
            if refusal is not None:
                return defer.fail(refusal)
            waiters = self._opening[key] = Waiters()
            waiting = waiters.wait()
            self._open(domain, trusted, localDomain).addBoth(self._opened, key)
            return waiting
        return waiters.wait()

    def _openingRefusal(self, domain):
        """
        @return: a L{Refused} if another connection to C{domain} may not be
            opened now (per-peer cap, or the server's total), else L{None}.
        """
        if len(self._connections.get(domain, ())) >= self.maxPerPeer:
            return Refused(
                ErrorCode.RESOURCE_LIMIT,
                f"{self.maxPerPeer} connections to {domain} are open "
                "and none takes new requests",
            )
        total = self.federation.limits.maxConnectionsTotal
        if len(self.federation.connections) >= total:
            return Refused(
                ErrorCode.RESOURCE_LIMIT,
                f"this server has its maximum of {total} connections open",
            )
        return None

    def _opened(self, result, key):
        """
        Hand the outcome of opening a connection to everyone waiting.
        """
        self._opening.pop(key).fire(result)

    def connections(self, domain=None):
        """
        @return: the connections dialled for C{domain}, or for every domain
            as C{{domain: [connection, ...]}}.
        """
        if domain is None:
            return {d: list(c) for d, c in self._connections.items() if c}
        return list(self._connections.get(domain, ()))

    def forget(self, protocol):
        """
        A connection has closed: stop offering it.
        """
        for domain in protocol.dialledDomains:
            connections = self._connections.get(domain, [])
            if protocol in connections:
                connections.remove(protocol)
            if not connections:
                self._connections.pop(domain, None)

    @defer.inlineCallbacks
    def _open(self, domain, trusted, localDomain):
        """
        Try each target of C{domain} in order until one completes HELLO
        (and TLS, when it is used).
        """
        targets = yield self._targets(domain, followRedirect=not trusted)
        tried = []
        for target in targets:
            protocol = self.federation.buildOutbound(
                domain,
                trusted=not isinstance(target, RedirectTarget),
                localDomain=localDomain,
            )
            try:
                yield self._connect(target.host, target.port, protocol)
                yield protocol.whenOpen()
            except Exception as e:
                reason = _reason(e)
                tried.append(f"{target.host}:{target.port} ({reason})")
                self.log.info(
                    "could not connect to {domain} at {host}:{port}: {reason}",
                    domain=domain,
                    host=target.host,
                    port=target.port,
                    reason=reason,
                )
                if protocol.transport is not None:
                    protocol.transport.abortConnection()
                continue
            self._connections.setdefault(domain, []).append(protocol)
            self.log.info(
                "connected to {domain} at {host}:{port}",
                domain=domain,
                host=target.host,
                port=target.port,
            )
            return protocol
        self.federation.count("connect-failures")
        raise Refused(
            ErrorCode.TEMPORARY_FAILURE,
            f"no server of {domain} answered: tried {', '.join(tried)}",
        )

    @defer.inlineCallbacks
    def _targets(self, domain, followRedirect=True):
        """
        The addresses to try for C{domain}: a live redirect first (unless
        C{followRedirect} is false), then discovery.
        """
        redirection = self.redirections.get(domain) if followRedirect else None
        found = []
        if redirection is not None:
            if redirection.expiry > self.clock.seconds():
                found.append(redirection.target)
            else:
                del self.redirections[domain]
        try:
            discovered = yield self.discovery.targets(domain)
        except NoService:
            if found:
                return found
            raise Refused(
                ErrorCode.UNKNOWN_DOMAIN, f"{domain} publishes no IMX service"
            ) from None
        except DiscoveryError as e:
            if found:
                return found
            raise Refused(ErrorCode.TEMPORARY_FAILURE, str(e)) from None
        return found + [t for t in discovered if t not in found]

    # -- redirects ---------------------------------------------------------

    def redirect(self, protocol, host, port, domains):
        """
        Follow a REDIRECT received on a connection this server opened: the
        named domains (all the connection was dialled for, if none are
        named) use C{host:port} from now on, for at most
        L{REDIRECT_LIFETIME} seconds and L{MAX_REDIRECTS} times in a row.

        @return: the domains redirected.
        """
        moved = []
        for domain in domains or protocol.dialledDomains:
            if domain not in protocol.dialledDomains:
                continue
            earlier = self.redirections.get(domain)
            hops = earlier.hops + 1 if earlier is not None else 1
            if hops > MAX_REDIRECTS:
                self.redirections.pop(domain, None)
                self.log.warn(
                    "{domain}: not following a redirect to {host}:{port}: "
                    "{hops} in a row; using discovery again",
                    domain=domain,
                    host=host,
                    port=port,
                    hops=hops,
                )
                continue
            now = self.clock.seconds()
            expiry = now + REDIRECT_LIFETIME
            replaced = self.discovery.cached().get(domain)
            if replaced is not None:
                expiry = min(expiry, max(replaced.expiry, now + MIN_REDIRECT_LIFETIME))
            self.redirections[domain] = Redirection(
                RedirectTarget(host, port), expiry, hops
            )
            moved.append(domain)
        return moved

    # -- sending -------------------------------------------------------------

    def _bounded(self, deferred, what, remote):
        """
        Fail C{deferred} as temporary if it has not fired within
        L{REQUEST_TIMEOUT} seconds (cancelling the request it stands for).
        """
        deferred.addTimeout(REQUEST_TIMEOUT, self.clock)
        return deferred.addErrback(_timedOut, what, remote)

    def send(self, pair, record):
        """
        Send a Data request for C{pair} to the remote domain: open or reuse
        a connection, authenticate the pair on it (dial-back), send, and
        wait for the answer (each connection fails a request unanswered for
        its request timeout).  A request refused with C{shutting-down} (the
        peer is draining) is sent again on another connection.

        @param pair: C{(localDomain, remoteDomain)}.
        @return: a L{Deferred} firing with the peer's answer (an L{Ack} or a
            response record), or failing with L{Refused} (L{RemoteError}
            when the peer refused).
        """
        return self._send(pair, record, 1)

    def sendThen(self, pair, record, onAnswer, onFailure, args=()):
        """
        L{send}, calling C{onAnswer(answer, *args)} or C{onFailure(failure,
        *args)} (C{args} a tuple) instead of returning a L{Deferred}: on a connection where
        the pair is already authenticated (the usual case once traffic
        flows), no L{Deferred} is made (the per-message path).
        """
        ready = self._ready(pair)
        if ready is None:
            self._connectAndSend(pair, record, 1).addCallbacks(onAnswer, onFailure, args, None, args)
        else:
            self._requestThen(ready, pair, record, 1, onAnswer, onFailure, args)

    def _send(self, pair, record, attempt):
        ready = self._ready(pair)
        if ready is None:
            return self._connectAndSend(pair, record, attempt)
        return self._request(ready, pair, record, attempt)

    def _ready(self, pair):
        """
        @return: the least busy usable connection on which C{pair} is
            already authenticated, or L{None} (the usual case once traffic
            flows, so it is found without a Deferred).
        """
        best = None
        for connection in self._connections.get(pair[1], ()):
            if connection.usable() and connection.pairReady(pair):
                if best is None or connection.pendingRequests() < best.pendingRequests():
                    best = connection
        return best

    @defer.inlineCallbacks
    def _connectAndSend(self, pair, record, attempt):
        """
        Open or reuse a connection, authenticate the pair on it, then send.
        """
        remote = pair[1]
        protocol = yield self.connection(remote, localDomain=pair[0])
        try:
            yield self._bounded(protocol.authenticatePair(pair), "dial-back", remote)
        except RemoteError as e:
            if e.code != ErrorCode.SHUTTING_DOWN or attempt == RESEND_ATTEMPTS:
                raise
            protocol.stopUsing()
            answer = yield self._send(pair, record, attempt + 1)
            return answer
        except Refused:
            raise
        except Exception as e:
            raise Refused(
                ErrorCode.TEMPORARY_FAILURE,
                f"connection to {remote} lost before an answer: {_reason(e)}",
            ) from None
        answer = yield self._request(protocol, pair, record, attempt)
        return answer

    def _request(self, protocol, pair, record, attempt):
        """
        Send the request on C{protocol} and translate what can go wrong.

        @return: a L{Deferred} of the answer.
        """
        answered = defer.Deferred()
        self._requestThen(protocol, pair, record, attempt, answered.callback, answered.errback, ())
        return answered

    def _requestThen(self, protocol, pair, record, attempt, onAnswer, onFailure, args):
        """
        Send the request on C{protocol}, then tell C{onAnswer} or
        C{onFailure} (with C{args}) its answer or what went wrong.
        """
        try:
            protocol.requestThen(
                record,
                self._answered,
                self._unanswered,
                (protocol, pair, record, attempt, onAnswer, onFailure, args),
            )
        except EncodeError as e:
            onFailure(Failure(Refused(ErrorCode.MALFORMED, f"cannot send: {e}")), *args)
            return
        protocol.noteActivity()

    def _answered(self, answer, protocol, pair, record, attempt, onAnswer, onFailure, args):
        protocol.noteActivity()
        onAnswer(answer, *args)

    def _unanswered(self, failure, protocol, pair, record, attempt, onAnswer, onFailure, args):
        """
        A peer that drains is asked again on another connection; a lost
        connection is a temporary failure.
        """
        if failure.check(RemoteError):
            if failure.value.code == ErrorCode.SHUTTING_DOWN and attempt < RESEND_ATTEMPTS:
                protocol.stopUsing()
                resent = self._send(pair, record, attempt + 1)
                resent.addCallbacks(onAnswer, onFailure, args, None, args)
                return
        elif not failure.check(Refused):
            failure = Failure(
                Refused(
                    ErrorCode.TEMPORARY_FAILURE,
                    f"connection to {pair[1]} lost before an answer: {_reason(failure.value)}",
                )
            )
        onFailure(failure, *args)


def _timedOut(failure, what, remote):
    """
    Turn a timeout into a temporary refusal.
    """
    failure.trap(defer.TimeoutError, defer.CancelledError)
    raise Refused(
        ErrorCode.TEMPORARY_FAILURE,
        f"no {what} from {remote} within {REQUEST_TIMEOUT:g} s",
    )


def _reason(exception):
    """
    @return: a short text for why a connection attempt failed.
    """
    text = str(exception) or type(exception).__name__
    return text.splitlines()[0] if text else type(exception).__name__
