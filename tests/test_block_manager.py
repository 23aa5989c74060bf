"""Block allocation order: freed blocks are reused before new memory is touched, cached prefixes are evicted last."""
from __future__ import annotations

from pbs_engine import SamplingParams
from pbs_engine.engine.block_manager import BlockManager
from pbs_engine.engine.sequence import Sequence


def run(blocks: BlockManager, prompt: list[int]) -> Sequence:
    """A sequence that takes its cached prefix, computes the rest of its prompt and finishes."""
    seq = Sequence("r", None, prompt, SamplingParams(max_tokens=1))
    blocks.match_prefix(seq)
    blocks.allocate(seq, len(prompt))
    seq.num_computed_tokens = len(prompt)
    blocks.free_seq(seq)
    return seq


def test_a_freed_block_is_reused_before_a_new_one():
    blocks = BlockManager(num_blocks=8, block_size=4)
    first = Sequence("a", None, list(range(8)), SamplingParams(max_tokens=1))
    blocks.allocate(first, 8)
    assert first.block_table == [0, 1]
    blocks.free_seq(first)
    second = Sequence("b", None, list(range(12)), SamplingParams(max_tokens=1))
    blocks.allocate(second, 12)
    assert second.block_table == [0, 1, 2]


def test_never_used_blocks_go_before_cached_prefixes_are_evicted():
    blocks = BlockManager(num_blocks=6, block_size=4, enable_prefix_caching=True)
    doc = list(range(100, 109))  # two full blocks (cached when freed) and one partial block (not)
    run(blocks, doc)
    other = Sequence("b", None, list(range(200, 212)), SamplingParams(max_tokens=1))
    blocks.allocate(other, 12)
    assert other.block_table == [2, 3, 4]  # the partial block, then never-used ones; blocks 0 and 1 keep the doc
    blocks.free_seq(other)
    again = run(blocks, doc)
    assert again.metrics.num_cached_tokens == 8


def test_cached_blocks_are_evicted_oldest_first():
    blocks = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=True)
    old, new = list(range(100, 105)), list(range(200, 205))
    run(blocks, old)  # blocks 0 (cached) and 1 (partial, free again)
    run(blocks, new)  # blocks 1 (cached) and 2 (partial)
    big = Sequence("c", None, list(range(300, 312)), SamplingParams(max_tokens=1))
    blocks.allocate(big, 12)  # block 2, the never-used block 3, then one eviction: the older prefix
    assert sorted(big.block_table) == [0, 2, 3]
    blocks.free_seq(big)
    assert run(blocks, new).metrics.num_cached_tokens == 4
    assert run(blocks, old).metrics.num_cached_tokens == 0
