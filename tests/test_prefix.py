"""The prefix-cache model: 64-token blocks, chained fingerprints, a bounded LRU."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.rows.prefix import BLOCK_TOKENS, PrefixCache


def ids(seed: int, n: int) -> list[int]:
    return [(seed * 1_000_003 + i * 7919) % 50_000 for i in range(n)]


def test_short_prompts_never_hit_and_are_not_remembered() -> None:
    cache = PrefixCache(100)
    assert cache.lookup_and_add(ids(1, 63)) == 0
    assert cache.lookup_and_add(ids(1, 63)) == 0
    assert len(cache) == 0


def test_a_repeated_prompt_hits_its_whole_blocks() -> None:
    cache = PrefixCache(100)
    prompt = ids(1, 150)
    assert cache.lookup_and_add(prompt) == 0
    assert len(cache) == 2
    assert cache.lookup_and_add(prompt) == 128


def test_a_shared_prefix_hits_up_to_the_first_differing_block() -> None:
    cache = PrefixCache(100)
    shared = ids(1, 100)
    cache.lookup_and_add(shared + ids(2, 200))
    assert cache.lookup_and_add(shared + ids(3, 200)) == 64
    assert cache.lookup_and_add(ids(4, 10) + shared) == 0


def test_blocks_are_chained_so_a_later_equal_block_is_no_prefix() -> None:
    cache = PrefixCache(100)
    a, b, c = ids(1, 64), ids(2, 64), ids(3, 64)
    cache.lookup_and_add(a + b)
    assert cache.lookup_and_add(c + b) == 0  # block b matches, but not after c
    assert cache.lookup_and_add(a + c) == 64


def test_least_recently_used_blocks_are_evicted() -> None:
    cache = PrefixCache(2)
    a, b, c = ids(1, 64), ids(2, 64), ids(3, 64)
    cache.lookup_and_add(a)
    cache.lookup_and_add(b)
    assert cache.lookup_and_add(a) == 64  # refreshes a
    cache.lookup_and_add(c)  # evicts b, the least recently used
    assert len(cache) == 2
    assert cache.lookup_and_add(a) == 64
    assert cache.lookup_and_add(b) == 0


def test_zero_capacity_never_hits() -> None:
    cache = PrefixCache(0)
    cache.lookup_and_add(ids(1, 200))
    assert cache.lookup_and_add(ids(1, 200)) == 0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="capacity"):
        PrefixCache(-1)
    with pytest.raises(ValueError, match="block"):
        PrefixCache(1, block_tokens=0)


def _reference(prompts: list[list[int]]) -> list[int]:
    """Unbounded cache: the longest common prefix with any earlier prompt, in whole blocks."""
    hits = []
    for index, prompt in enumerate(prompts):
        best = 0
        for earlier in prompts[:index]:
            common = 0
            while common < min(len(prompt), len(earlier)) and prompt[common] == earlier[common]:
                common += 1
            best = max(best, common - common % BLOCK_TOKENS)
        hits.append(best)
    return hits


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(st.sampled_from([0, 1]), min_size=0, max_size=6).map(
            lambda blocks: [token for b in blocks for token in [b] * BLOCK_TOKENS]
        ),
        max_size=8,
    ),
    st.integers(min_value=0, max_value=40),
)
def test_matches_the_unbounded_reference_when_nothing_is_evicted(
    prompts: list[list[int]], tail: int
) -> None:
    prompts = [p + [7] * tail for p in prompts]
    cache = PrefixCache(10_000)
    assert [cache.lookup_and_add(p) for p in prompts] == _reference(prompts)


def _prompts(seed: int, count: int) -> list[tuple[int, ...]]:
    """Fingerprint lists of prompts that share prefixes of 0-3 blocks, some repeated."""
    import random

    from pipeline.rows.prefix import block_fingerprints

    rng = random.Random(seed)
    prefixes = [[rng.randrange(1000) for _ in range(BLOCK_TOKENS * n)] for n in (1, 2, 3)]
    prompts = []
    for _ in range(count):
        head = rng.choice([[], *prefixes])
        tail = [rng.randrange(1000) for _ in range(rng.randrange(0, 3 * BLOCK_TOKENS))]
        prompts.append(block_fingerprints(head + tail))
    return prompts


def test_the_compact_cache_answers_as_the_lru_until_it_forgets() -> None:
    from pipeline.rows.prefix import CompactPrefixCache

    prompts = _prompts(0, 3000)
    exact, compact = PrefixCache(100_000), CompactPrefixCache(100_000, generation=512)
    assert [compact.lookup_and_add_blocks(p) for p in prompts] == [
        exact.lookup_and_add_blocks(p) for p in prompts
    ]
    assert sum(exact.lookup_and_add_blocks(p) for p in prompts) > 0


def test_the_compact_cache_stays_within_its_capacity_and_keeps_what_is_used() -> None:
    from pipeline.rows.prefix import CompactPrefixCache

    cache = CompactPrefixCache(1024, generation=128)
    shared = (7, 8, 9)  # a prefix of three blocks, used between all the others
    assert cache.lookup_and_add_blocks(shared) == 0
    for prompt in _prompts(2, 5000):
        cache.lookup_and_add_blocks(prompt)
        assert len(cache) <= 1024 + 128
        assert cache.lookup_and_add_blocks(shared) == 3 * BLOCK_TOKENS
    empty = CompactPrefixCache(0)
    assert empty.lookup_and_add_blocks((1, 2)) == 0
    assert empty.lookup_and_add_blocks((1, 2)) == 0
