"""Pure: which part of a prompt a provider's prefix cache would serve.

DeepSeek caches prompt prefixes in blocks of 64 tokens: a request's cached tokens are the
longest prefix, in whole blocks, of its prompt's token ids that an earlier request already
sent. :class:`PrefixCache` models that with a bounded LRU of *chained* block fingerprints:
block ``i``'s fingerprint hashes block ``i - 1``'s fingerprint with block ``i``'s ids, so one
fingerprint stands for the whole prefix up to and including its block, and a prompt hits the
cache block by block until the first block whose prefix was never sent.

Fingerprints are Python's 64-bit tuple hashes: stable within one process (all an estimate
needs), with a collision chance that is negligible at any capacity that fits in memory.
Memory is about 100 bytes per remembered block.
"""

from __future__ import annotations

from collections import OrderedDict
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
