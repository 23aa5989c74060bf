"""Paged KV-cache bookkeeping: fixed-size blocks, each sequence's block table, and prefix caching.

Prefix caching (vLLM's scheme): every block filled with prompt tokens gets a hash of (previous block's hash, its
token ids), so equal hashes mean equal prefixes. A block is shared by reference count; when the count drops to zero
it keeps its hash and contents among the free blocks, and a later request whose prompt starts with the same
blocks reuses them instead of recomputing.

Allocation order keeps the touched part of the (lazily committed) cache small: first a free block holding no cached
prefix, the most recently freed first (its memory is warm), then a never-used block, lowest first, and only then
the cached block freed longest ago, whose hash is forgotten.
"""
from __future__ import annotations

from collections import OrderedDict

from pbs_engine.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.free_plain = list(range(num_blocks - 1, -1, -1))  # refcount 0, no cached prefix: a stack, next last
        self.free_cached: OrderedDict[int, None] = OrderedDict()  # refcount 0, holding a cached prefix: oldest first
        self.hash_of: dict[int, int] = {}  # block -> hash of the prefix it completes
        self.cached: dict[int, int] = {}  # hash -> block
        self.hits = 0  # prompt tokens served from the cache
        self.queries = 0  # prompt tokens looked up

    @property
    def num_free(self) -> int:
        """Blocks no sequence holds (cached ones included: they are reclaimed on demand)."""
        return len(self.free_plain) + len(self.free_cached)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks to add so that `num_tokens` tokens of `seq` fit in its table."""
        return max(0, (num_tokens + self.block_size - 1) // self.block_size - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq`'s block table to hold `num_tokens` tokens."""
        for _ in range(self.blocks_needed(seq, num_tokens)):
            if self.free_plain:
                block = self.free_plain.pop()
            else:
                block, _ = self.free_cached.popitem(last=False)
                self._forget(block)
            self.ref_count[block] = 1
            seq.block_table.append(block)

    def free_seq(self, seq: Sequence) -> None:
        self.cache_full_blocks(seq)
        for block in reversed(seq.block_table):  # the prefix's first blocks are evicted last
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                if block in self.hash_of:
                    self.free_cached[block] = None
                else:
                    self.free_plain.append(block)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def match_prefix(self, seq: Sequence) -> None:
        """Before a sequence's first prefill: take the cached blocks its prompt starts with and count their tokens
        as computed. At least one prompt token is always left to compute (its logits start the answer); a request
        that wants prompt logprobs computes everything."""
        if not self.enable_prefix_caching or seq.block_table or seq.params.prompt_logprobs is not None:
            return
        usable = (seq.num_prompt_tokens - 1) // self.block_size
        self.queries += seq.num_prompt_tokens
        prev = None
        for i in range(usable):
            h = self._hash(prev, seq.prompt_ids[i * self.block_size:(i + 1) * self.block_size])
            block = self.cached.get(h)
            if block is None:
                break
            if self.ref_count[block] == 0:
                del self.free_cached[block]
            self.ref_count[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            prev = h
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        seq.metrics.num_cached_tokens = seq.num_computed_tokens
        self.hits += seq.num_computed_tokens

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks of `seq` whose prompt tokens are all computed."""
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_computed_tokens, seq.num_prompt_tokens) // self.block_size
        prev = seq.block_hashes[-1] if seq.block_hashes else None
        for i in range(len(seq.block_hashes), min(full, len(seq.block_table))):
            h = self._hash(prev, seq.prompt_ids[i * self.block_size:(i + 1) * self.block_size])
            block = seq.block_table[i]
            if h not in self.cached and block not in self.hash_of:
                self.cached[h] = block
                self.hash_of[block] = h
            seq.block_hashes.append(h)
            prev = h

    def _forget(self, block: int) -> None:
        h = self.hash_of.pop(block, None)
        if h is not None and self.cached.get(h) == block:
            del self.cached[h]

    @staticmethod
    def _hash(prev: int | None, tokens: list[int]) -> int:
        return hash((prev, tuple(tokens)))
