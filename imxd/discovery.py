"""
Server discovery (draft 4.2.3, C{docs/protocol.md} section 1): find a
domain's IMX servers through its C{_imx._tcp} SRV records (L{Discovery},
over an injected resolver and clock, with a TTL cache) and order them for
trying as RFC 2782 says (L{orderTargets}, with randomness passed in so that
tests can fix it).  Connecting to the targets lives elsewhere.
"""

import random

import attrs
from twisted.internet import defer
from twisted.names import dns, error

from imxd.wire import DEFAULT_PORT


#: The most answers the discovery cache keeps.
MAX_CACHED = 10000


class NoService(Exception):
    """
    The domain says it offers no IMX service (a single SRV record whose
    target is C{.}).
    """


@attrs.frozen
class Target:
    """
    One place to try: a host name or address and a port.

    @ivar priority: lower is tried first.
    @ivar weight: relative share among targets of equal priority.
    """

    host: str
    port: int
    priority: int = 0
    weight: int = 0


def _isNoService(target):
    """
    @return: whether an SRV target is C{.}, the "no service here" mark.
    """
    return target.host in (".", "")


def srvName(domain):
    """
    @param domain: a canonical (ASCII) domain name.
    @return: the DNS name whose SRV records list the domain's IMX servers.
    """
    return f"_imx._tcp.{domain}"


def fallbackTargets(domain):
    """
    The targets to use when a domain publishes no SRV records: the domain
    itself on the default port.

    @return: a one-element list of L{Target}.
    """
    return [Target(domain, DEFAULT_PORT)]


def orderTargets(targets, rng=random):
    """
    Order SRV targets for trying, per RFC 2782: by priority, lowest first;
    within one priority, by repeated weighted random choice, so that a
    target's chance of coming first is its share of the weights and targets
    of equal weight come in random order (as with MX, draft 4.2.3).

    @param targets: L{Target}s from one SRV answer.
    @param rng: an object with C{randint} and C{shuffle}, such as
        L{random.Random}.
    @return: the targets in the order to try them.
    @raise NoService: the answer is the single target C{.}.
    """
    targets = list(targets)
    if len(targets) == 1 and _isNoService(targets[0]):
        raise NoService("the domain publishes no IMX service (SRV target '.')")
    ordered = []
    for priority in sorted({t.priority for t in targets}):
        group = [
            t for t in targets if t.priority == priority and not _isNoService(t)
        ]
        # Shuffle, so that targets of equal weight (zero included) come in
        # random order; then, as RFC 2782 says, zero-weight targets first
        # (the sort is stable), so that they are drawn only on a 0 or when
        # nothing else is left.
        rng.shuffle(group)
        group.sort(key=lambda t: t.weight != 0)
        while group:
            total = sum(t.weight for t in group)
            draw = rng.randint(0, total)
            running = 0
            for index, target in enumerate(group):
                running += target.weight
                if running >= draw:
                    ordered.append(group.pop(index))
                    break
    return ordered


class DiscoveryError(Exception):
    """
    A domain's IMX servers could not be found (DNS failed or timed out).
    """


@attrs.frozen
class CachedAnswer:
    """
    One discovery result kept for its TTL, for reuse and for operators.

    @ivar targets: the unordered targets, or C{()} for a cached failure.
    @ivar expiry: when it stops being used (clock seconds).
    @ivar source: C{"srv"}, C{"fallback"}, C{"override"} or C{"failure"}.
    @ivar reason: why discovery failed, for a cached failure.
    """

    targets: tuple
    expiry: float
    source: str
    reason: str = ""


class Discovery:
    """
    Find the servers of a remote domain: static overrides from the
    configuration first, then C{_imx._tcp} SRV records, then the domain
    itself on the default port.  Answers are cached for their DNS TTL
    (capped), failures briefly; the cache can be listed and flushed.
    """

    def __init__(
        self, resolver, clock, overrides=None, failureTTL=30.0, maxTTL=3600.0, rng=random
    ):
        """
        @param resolver: an L{twisted.internet.interfaces.IResolver}
            (C{twisted.names.client.createResolver(servers=...)}).
        @param clock: an L{IReactorTime} provider.
        @param overrides: domain → L{Target} for private peering.
        @param failureTTL: seconds a failed look-up (or an answer with no
            SRV records) is remembered.
        @param maxTTL: the longest an answer is kept, whatever its TTL.
        @param rng: source of randomness for L{orderTargets}.
        """
        self._resolver = resolver
        self._clock = clock
        self._overrides = dict(overrides or {})
        self._failureTTL = failureTTL
        self._maxTTL = maxTTL
        self._rng = rng
        self._cache = {}

    def targets(self, domain):
        """
        @param domain: a canonical domain name.
        @return: a L{Deferred} firing with the L{Target}s to try, in order,
            or failing with L{DiscoveryError} or L{NoService}.
        """
        override = self._overrides.get(domain)
        if override is not None:
            return defer.succeed([override])
        cached = self._cache.get(domain)
        if cached is not None and cached.expiry > self._clock.seconds():
            return defer.maybeDeferred(self._answer, domain, cached)
        lookup = self._resolver.lookupService(srvName(domain))
        lookup.addCallbacks(
            lambda result: self._remember(domain, result),
            lambda failure: self._failed(domain, failure),
        )
        return lookup.addCallback(lambda answer: self._answer(domain, answer))

    def cached(self):
        """
        @return: C{{domain: CachedAnswer}} for every answer still in use.
        """
        now = self._clock.seconds()
        return {d: a for d, a in self._cache.items() if a.expiry > now}

    def flush(self, domain=None):
        """
        Forget the cached answer for C{domain}, or every one.
        """
        if domain is None:
            self._cache.clear()
        else:
            self._cache.pop(domain, None)

    def _store(self, domain, answer):
        """
        Cache an answer.  Past L{MAX_CACHED} entries, expired answers are
        dropped first, then those that expire soonest, so that look-ups of
        many names (for example dial-backs for invented domains) cannot grow
        the cache without bound.
        """
        cache = self._cache
        cache[domain] = answer
        if len(cache) <= MAX_CACHED:
            return
        now = self._clock.seconds()
        for name in [n for n, a in cache.items() if a.expiry <= now]:
            del cache[name]
        if len(cache) > MAX_CACHED:
            for name in sorted(cache, key=lambda n: cache[n].expiry)[
                : len(cache) - MAX_CACHED
            ]:
                del cache[name]

    def _remember(self, domain, result):
        """
        Cache the SRV answer (or the fallback when there is none).
        """
        answers = [rr for rr in result[0] if rr.type == dns.SRV]
        now = self._clock.seconds()
        if not answers:
            answer = CachedAnswer(
                tuple(fallbackTargets(domain)), now + self._failureTTL, "fallback"
            )
        else:
            ttl = min(min(rr.ttl for rr in answers), self._maxTTL)
            answer = CachedAnswer(
                tuple(
                    Target(
                        rr.payload.target.name.decode("ascii").rstrip(".") or ".",
                        rr.payload.port,
                        rr.payload.priority,
                        rr.payload.weight,
                    )
                    for rr in answers
                ),
                now + ttl,
                "srv",
            )
        self._store(domain, answer)
        return answer

    def _failed(self, domain, failure):
        """
        No such name means no SRV records: fall back.  Anything else
        (timeout, refused, server failure) is a failure, cached briefly.
        """
        if failure.check(error.DNSNameError):
            return self._remember(domain, ([], [], []))
        answer = CachedAnswer(
            (),
            self._clock.seconds() + self._failureTTL,
            "failure",
            f"DNS look-up of {srvName(domain)} failed: "
            f"{failure.type.__name__} {failure.getErrorMessage()}",
        )
        self._store(domain, answer)
        return answer

    def _answer(self, domain, answer):
        """
        Turn a cached answer into the order to try, or its failure.
        """
        if answer.source == "failure":
            raise DiscoveryError(answer.reason)
        return orderTargets(answer.targets, self._rng)
