"""
Server discovery (draft 4.2.3, C{docs/protocol.md} section 1): the order in
which to try the targets of a domain's C{_imx._tcp} SRV records.

Pure: the DNS look-up and the connection attempts live elsewhere; this
module only orders what DNS answered, as RFC 2782 says, with randomness
passed in so that tests can fix it.
"""

import random

import attrs

from imxd.wire import DEFAULT_PORT


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
    if len(targets) == 1 and targets[0].host in (".", ""):
        raise NoService("the domain publishes no IMX service (SRV target '.')")
    ordered = []
    for priority in sorted({t.priority for t in targets}):
        group = [t for t in targets if t.priority == priority and t.host not in (".", "")]
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
