"""
A filter in memory over the dedupe table, so that a MESSAGE_ID never
received before (nearly every one) is known new without a database
look-up.

It is a chain of Bloom filters, one per generation of ids in the order
they were received: a filter answers "certainly not seen" or "perhaps
seen", and only "perhaps" (the ids really seen, and about 0.4 % of the
new ones per generation) costs a C{SELECT}.  A Bloom filter cannot forget one id, so the
chain forgets a whole generation once every id in it is older than the
dedupe window.
"""

from __future__ import annotations

from array import array

#: Ids the first generation holds (256 KiB); each next one holds twice as
#: many, up to L{LARGEST_GENERATION}.  A new id is looked for in every
#: generation, so few and large ones are cheaper: 2 after 300,000 ids
#: received, where generations of 16,384 made 5.
FIRST_GENERATION = 1 << 17

#: Ids one generation holds at most (2 octets per id).
LARGEST_GENERATION = 1 << 22

#: Bits per id a generation is sized for.
BITS_PER_ID = 16

#: Bits set per id, all in one 64-bit word (a "blocked" Bloom filter: one
#: word read per generation instead of one per bit).  With 16 bits per id
#: this answers "perhaps" for about 0.4 % of new ids per full generation.
PROBES = 6


class _Generation:
    """
    One Bloom filter: the ids received in one stretch of time.

    @ivar words: the filter, in 64-bit words.
    @ivar mask: selects a word from an id's index.
    @ivar newest: the latest receiving time of an id in it.
    @ivar count: ids added.
    @ivar capacity: ids it is sized for.
    """

    __slots__ = ("words", "mask", "count", "capacity", "newest")

    def __init__(self, capacity):
        size = 1
        while size * 64 < capacity * BITS_PER_ID:
            size <<= 1
        self.words = array("Q", bytes(8 * size))
        self.mask = size - 1
        self.count = 0
        self.capacity = capacity
        self.newest = float("-inf")

    def add(self, index, bits, at):
        self.words[index & self.mask] |= bits
        self.count += 1
        if at > self.newest:
            self.newest = at


#: The two bits that 12 bits of a hash select: bit C{i & 63} and bit
#: C{i >> 6}.  Three look-ups give an id's six bits (cheaper than six
#: shifts of big integers).
_BIT_PAIRS = tuple((1 << (i & 63)) | (1 << (i >> 6)) for i in range(4096))


def _probes(origin, messageId):
    """
    @return: the index of an id's word (to be masked to a generation's
        size) and the L{PROBES} bits it sets in that word, from one 64-bit
        hash: six 6-bit positions from the low 36 bits, the index from the
        rest.
    """
    value = hash((origin, messageId)) & 0xFFFFFFFFFFFFFFFF
    return value >> 36, (
        _BIT_PAIRS[value & 4095] | _BIT_PAIRS[value >> 12 & 4095] | _BIT_PAIRS[value >> 24 & 4095]
    )


class SeenFilter:
    """
    Which (origin, MESSAGE_ID) pairs may have been seen.  It never answers
    "not seen" for a pair added and not yet forgotten.

    The hash is Python's own (salted per process), so the filter lives in
    memory only and is built again from the table at start.
    """

    def __init__(self, firstGeneration=FIRST_GENERATION):
        """
        @param firstGeneration: ids the first generation holds (a power of
            two; smaller in tests).
        """
        self.firstGeneration = firstGeneration
        self._generations = [_Generation(firstGeneration)]
        # The pair last looked for and its probes: a new id is looked for,
        # then added.
        self._last = (None, None, 0, 0)

    def add(self, origin, messageId, at):
        """
        Remember a pair received at clock time C{at}.
        """
        newest = self._generations[-1]
        if newest.count >= newest.capacity:
            newest = _Generation(min(newest.capacity * 2, LARGEST_GENERATION))
            self._generations.append(newest)
        lastOrigin, lastId, index, bits = self._last
        if origin is not lastOrigin or messageId is not lastId:
            index, bits = _probes(origin, messageId)
        newest.add(index, bits, at)

    def mayContain(self, origin, messageId):
        """
        @return: L{False} if the pair was certainly not added (or was
            forgotten), L{True} if it may have been.
        """
        index, bits = _probes(origin, messageId)
        self._last = (origin, messageId, index, bits)
        for generation in reversed(self._generations):
            if generation.words[index & generation.mask] & bits == bits:
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
            kept = [_Generation(self.firstGeneration)]
        self._generations = kept

    def generations(self):
        """
        @return: how many Bloom filters the chain holds.
        """
        return len(self._generations)
