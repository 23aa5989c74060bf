"""Who runs next: prefill (in chunks) of waiting requests first, else one decode step for every running one.

The scheduler only moves sequences between queues and reserves cache blocks; it never touches tensors.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from pbs_engine.engine.block_manager import BlockManager
from pbs_engine.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_tokens: list[int]  # tokens computed for each sequence in this step
    is_prefill: bool

    def completes_prompt(self, i: int) -> bool:
        """Whether this step computes the last pending token of sequence i (so a new token is sampled)."""
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_tokens[i] == len(seq)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, chunked_prefill: bool):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        batch = self._schedule_prefill()
        if batch is None:
            batch = self._schedule_decode()
        return batch

    def _schedule_prefill(self) -> ScheduledBatch | None:
        seqs, counts, budget = [], [], self.max_num_batched_tokens
        for seq in self.waiting:
            if len(self.running) + len(seqs) >= self.max_num_seqs or budget == 0:
                break
            if seq.num_computed_tokens == 0:
                self.blocks.match_prefix(seq)  # cached prompt blocks count as computed
            pending = len(seq) - seq.num_computed_tokens
            n = min(pending, budget)
            if n < pending and not self.chunked_prefill and seqs:
                break
            if not self.blocks.can_allocate(seq, seq.num_computed_tokens + n):
                break
            self.blocks.allocate(seq, seq.num_computed_tokens + n)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        if not seqs:
            return None
        return ScheduledBatch(seqs, counts, is_prefill=True)

    def _schedule_decode(self) -> ScheduledBatch | None:
        scheduled: list[Sequence] = []
        queue = list(self.running)
        while queue:
            seq = queue.pop(0)
            while not self.blocks.can_allocate(seq, len(seq)):
                victim = queue.pop() if queue else seq
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.allocate(seq, len(seq))
                scheduled.append(seq)
        if not scheduled:
            return None
        return ScheduledBatch(scheduled, [1] * len(scheduled), is_prefill=False)

    def preempt(self, seq: Sequence) -> None:
        """Free the sequence's cache and put it back at the head of the queue to be recomputed."""
        self.running.remove(seq)
        self.blocks.free_seq(seq)
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def after_step(self, batch: ScheduledBatch) -> None:
        """Account the computed tokens and move sequences whose prompt is done to running."""
        for seq, n in zip(batch.seqs, batch.num_tokens):
            seq.num_computed_tokens += n
            if batch.is_prefill:
                self.blocks.cache_full_blocks(seq)
            if batch.is_prefill and seq.num_computed_tokens == len(seq) and seq.status == SequenceStatus.WAITING:
                self.waiting.remove(seq)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_seq(seq)
        seq.status = SequenceStatus.FINISHED
