"""Pure: which part of a prompt a provider's prefix cache would serve.

DeepSeek caches prompt prefixes in blocks of 64 tokens: a request's cached tokens are the
longest prefix, in whole blocks, of its prompt's token ids that an earlier request already
sent. :class:`PrefixCache` models that with a bounded LRU of *chained* block fingerprints:
block ``i``'s fingerprint hashes block ``i - 1``'s fingerprint with block ``i``'s ids, so one
fingerprint stands for the whole prefix up to and including its block, and a prompt hits the
cache block by block until the first block whose prefix was never sent.

Fingerprints are Python's 64-bit tuple hashes: stable within one process (all an estimate
needs), with a collision chance that is negligible at any capacity that fits in memory.
Memory is about 140 bytes per remembered block; :class:`CompactPrefixCache` answers the same
in about 10 (``pipeline estimate`` uses it, so that a million-row estimate stays small).
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections import OrderedDict, deque
from collections.abc import Sequence

BLOCK_TOKENS = 64
DEFAULT_CAPACITY_BLOCKS = 1 << 20
"""About a million blocks (64M tokens of prefixes), about 100 MB."""


class PrefixCache:
    """A bounded LRU of chained fingerprints of ``block_tokens``-token prompt blocks."""

    def __init__(
        self, capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS, block_tokens: int = BLOCK_TOKENS
    ) -> None:
        if capacity_blocks < 0:
            raise ValueError("capacity_blocks must be >= 0")
        if block_tokens < 1:
            raise ValueError("block_tokens must be >= 1")
        self.capacity_blocks = capacity_blocks
        self.block_tokens = block_tokens
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        """Blocks remembered now."""
        return len(self._blocks)

    def lookup_and_add(self, ids: Sequence[int]) -> int:
        """Cached tokens of a prompt with token ``ids``, sent now; remembers its blocks.

        The answer is a multiple of the block size: the longest whole-block prefix of ``ids``
        that an earlier prompt already sent (and the cache still holds). Every whole block of
        ``ids`` is remembered afterwards, the hit ones refreshed as most recently used.
        """
        return self.lookup_and_add_blocks(block_fingerprints(ids, self.block_tokens))

    def lookup_and_add_blocks(self, fingerprints: Sequence[int]) -> int:
        """:meth:`lookup_and_add` for a prompt given by its :func:`block_fingerprints` (which
        lets a caller drop the token ids as soon as they are fingerprinted)."""
        blocks = self._blocks
        capacity = self.capacity_blocks
        cached = 0
        hitting = True
        for index, chained in enumerate(fingerprints):
            if hitting and chained in blocks:
                blocks.move_to_end(chained)
                cached = (index + 1) * self.block_tokens
                continue
            hitting = False
            if capacity:
                blocks[chained] = None
                blocks.move_to_end(chained)
                if len(blocks) > capacity:
                    blocks.popitem(last=False)
        return cached


GENERATION_BLOCKS = 1 << 16
"""Blocks in :class:`CompactPrefixCache`'s newest generation."""


class CompactPrefixCache:
    """:class:`PrefixCache`'s answers in about 10 bytes per remembered block, not 140.

    Blocks are remembered by generation: the newest ``generation`` of them in a dict, each
    older generation as a sorted array of 8-byte fingerprints, searched by bisection. When the
    newest generation is full it becomes the youngest sorted one, and the oldest is forgotten
    once ``capacity_blocks`` would be exceeded. A block found in an older generation is
    remembered again in the newest (as an LRU refreshes it), so what is forgotten is a
    generation of blocks no prompt used since: an LRU at the grain of a generation. Until the
    first generation is forgotten the answers equal :class:`PrefixCache`'s exactly.
    """

    def __init__(
        self,
        capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS,
        block_tokens: int = BLOCK_TOKENS,
        generation: int = GENERATION_BLOCKS,
    ) -> None:
        if capacity_blocks < 0:
            raise ValueError("capacity_blocks must be >= 0")
        if block_tokens < 1 or generation < 1:
            raise ValueError("block_tokens and generation must be >= 1")
        self.capacity_blocks = capacity_blocks
        self.block_tokens = block_tokens
        self._generation = max(1, min(generation, capacity_blocks))
        self._keep = max(0, capacity_blocks // self._generation - 1)
        """Sorted generations kept besides the newest."""
        self._newest: dict[int, None] = {}
        self._older: deque[array[int]] = deque()

    def __len__(self) -> int:
        """Blocks remembered now (a refreshed block may count twice)."""
        return len(self._newest) + sum(len(older) for older in self._older)

    def _known(self, chained: int) -> bool:
        if chained in self._newest:
            return True
        for older in self._older:
            at = bisect_left(older, chained)
            if at < len(older) and older[at] == chained:
                return True
        return False

    def _remember(self, chained: int) -> None:
        newest = self._newest
        newest[chained] = None
        if len(newest) >= self._generation:
            if self._keep:
                self._older.appendleft(array("q", sorted(newest)))
                if len(self._older) > self._keep:
                    self._older.pop()
            self._newest = {}

    def lookup_and_add_blocks(self, fingerprints: Sequence[int]) -> int:
        """As :meth:`PrefixCache.lookup_and_add_blocks`."""
        if not self.capacity_blocks:
            return 0
        cached = 0
        hitting = True
        for index, chained in enumerate(fingerprints):
            if hitting and self._known(chained):
                cached = (index + 1) * self.block_tokens
                if chained not in self._newest:
                    self._remember(chained)
                continue
            hitting = False
            self._remember(chained)
        return cached


def block_fingerprints(ids: Sequence[int], block_tokens: int = BLOCK_TOKENS) -> tuple[int, ...]:
    """The chained fingerprints of the whole ``block_tokens``-token blocks of ``ids``: block
    ``i``'s hashes block ``i - 1``'s with block ``i``'s ids."""
    whole = len(ids) - len(ids) % block_tokens
    if whole == 0:
        return ()
    as_tuple = tuple(ids[:whole])
    chained = 0
    found = []
    for start in range(0, whole, block_tokens):
        chained = hash((chained, as_tuple[start : start + block_tokens]))
        found.append(chained)
    return tuple(found)
