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

from imxd.wire.accelerator import speedups

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


class Bloom:
    """
    One blocked Bloom filter of 64-bit hashes, in 64-bit words: a hash
    selects a word by its top 28 bits and sets L{PROBES} bits in it, chosen
    by six 6-bit pieces of its low 36 bits.  The reference for the C
    accelerator's C{Bloom}, which has the same methods.
    """

    __slots__ = ("_words", "_mask")

    def __init__(self, words):
        """
        @param words: 64-bit words (a power of two).
        """
        if words < 1 or words & (words - 1):
            raise ValueError("Bloom(words): a power of two")
        self._words = array("Q", bytes(8 * words))
        self._mask = words - 1

    def add(self, value):
        """
        Remember a hash.
        """
        index, bits = _probes(value)
        self._words[index & self._mask] |= bits

    def mayContain(self, value):
        """
        @return: L{False} if the hash was certainly not added.
        """
        index, bits = _probes(value)
        return self._words[index & self._mask] & bits == bits


class _Generation:
    """
    One Bloom filter: the ids received in one stretch of time.

    @ivar bloom: the filter, a L{Bloom} (or the accelerator's).
    @ivar newest: the latest receiving time of an id in it.
    @ivar count: ids added.
    @ivar capacity: ids it is sized for.
    """

    __slots__ = ("bloom", "count", "capacity", "newest")

    def __init__(self, capacity):
        size = 1
        while size * 64 < capacity * BITS_PER_ID:
            size <<= 1
        self.bloom = (Bloom if speedups is None else speedups.Bloom)(size)
        self.count = 0
        self.capacity = capacity
        self.newest = float("-inf")

    def add(self, value, at):
        self.bloom.add(value)
        self.count += 1
        if at > self.newest:
            self.newest = at


#: The two bits that 12 bits of a hash select: bit C{i & 63} and bit
#: C{i >> 6}.  Three look-ups give an id's six bits (cheaper than six
#: shifts of big integers).
_BIT_PAIRS = tuple((1 << (i & 63)) | (1 << (i >> 6)) for i in range(4096))


def _probes(value):
    """
    @return: the index of a hash's word (to be masked to a filter's size)
        and the L{PROBES} bits it sets in that word: six 6-bit positions
        from the low 36 bits, the index from the rest.
    """
    value &= 0xFFFFFFFFFFFFFFFF
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
        # The pair last looked for and its hash: a new id is looked for,
        # then added.
        self._last = (None, None, 0)

    def add(self, origin, messageId, at):
        """
        Remember a pair received at clock time C{at}.
        """
        newest = self._generations[-1]
        if newest.count >= newest.capacity:
            newest = _Generation(min(newest.capacity * 2, LARGEST_GENERATION))
            self._generations.append(newest)
        lastOrigin, lastId, value = self._last
        if origin is not lastOrigin or messageId is not lastId:
            value = hash((origin, messageId))
        newest.add(value, at)

    def mayContain(self, origin, messageId):
        """
        @return: L{False} if the pair was certainly not added (or was
            forgotten), L{True} if it may have been.
        """
        value = hash((origin, messageId))
        self._last = (origin, messageId, value)
        for generation in reversed(self._generations):
            if generation.bloom.mayContain(value):
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
