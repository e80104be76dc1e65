"""
A filter in memory over the dedupe table, so that a MESSAGE_ID never
received before (nearly every one) is known new without a database
look-up.

It is a chain of Bloom filters, one per generation of ids in the order
they were received: a filter answers "certainly not seen" or "perhaps
seen", and only "perhaps" (the ids really seen, and under 1 % of the new
ones) costs a C{SELECT}.  A Bloom filter cannot forget one id, so the
chain forgets a whole generation once every id in it is older than the
dedupe window.
"""

from __future__ import annotations

#: Ids the first generation holds; each next one holds twice as many, up
#: to L{LARGEST_GENERATION}.
FIRST_GENERATION = 1 << 14

#: Ids one generation holds at most (its bits take 1.25 octets per id).
LARGEST_GENERATION = 1 << 22

#: Bit positions set per id.  With 10 bits per id this leaves under 1 %
#: of new ids answered "perhaps".
PROBES = 7

#: Bits per id a generation is sized for (rounded up to a power of two).
BITS_PER_ID = 10


class _Generation:
    """
    One Bloom filter: the ids received in one stretch of time.

    @ivar newest: the latest receiving time of an id in it.
    @ivar count: ids added.
    @ivar capacity: ids it is sized for.
    """

    __slots__ = ("bits", "mask", "count", "capacity", "newest")

    def __init__(self, capacity):
        size = 8
        while size < capacity * BITS_PER_ID:
            size <<= 1
        self.bits = bytearray(size >> 3)
        self.mask = size - 1
        self.count = 0
        self.capacity = capacity
        self.newest = float("-inf")

    def add(self, first, step, at):
        bits, mask = self.bits, self.mask
        for _ in range(PROBES):
            position = first & mask
            bits[position >> 3] |= 1 << (position & 7)
            first += step
        self.count += 1
        if at > self.newest:
            self.newest = at

    def mayContain(self, first, step):
        bits, mask = self.bits, self.mask
        for _ in range(PROBES):
            position = first & mask
            if not bits[position >> 3] & (1 << (position & 7)):
                return False
            first += step
        return True


def _probes(origin, messageId):
    """
    @return: the first bit position and the step between positions of an
        id (double hashing over one 64-bit hash; the step is odd so that
        it reaches every bit of a power-of-two filter).
    """
    value = hash((origin, messageId)) & 0xFFFFFFFFFFFFFFFF
    return value & 0xFFFFFFFF, (value >> 32) | 1


class SeenFilter:
    """
    Which (origin, MESSAGE_ID) pairs may have been seen.  It never answers
    "not seen" for a pair added and not yet forgotten.

    The hash is Python's own (salted per process), so the filter lives in
    memory only and is built again from the table at start.
    """

    def __init__(self):
        self._generations = [_Generation(FIRST_GENERATION)]

    def add(self, origin, messageId, at):
        """
        Remember a pair received at clock time C{at}.
        """
        newest = self._generations[-1]
        if newest.count >= newest.capacity:
            newest = _Generation(min(newest.capacity * 2, LARGEST_GENERATION))
            self._generations.append(newest)
        first, step = _probes(origin, messageId)
        newest.add(first, step, at)

    def mayContain(self, origin, messageId):
        """
        @return: L{False} if the pair was certainly not added (or was
            forgotten), L{True} if it may have been.
        """
        first, step = _probes(origin, messageId)
        for generation in reversed(self._generations):
            if generation.mayContain(first, step):
                return True
        return False

    def forget(self, before):
        """
        Drop every generation whose ids were all received before clock
        time C{before}; the newest generation always stays (emptied if it
        is old).
        """
        kept = [g for g in self._generations if g.newest >= before]
        if not kept:
            kept = [_Generation(FIRST_GENERATION)]
        self._generations = kept

    def generations(self):
        """
        @return: how many Bloom filters the chain holds.
        """
        return len(self._generations)
