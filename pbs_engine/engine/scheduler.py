"""Who runs next: every step carries one decode token of each running sequence, then prefill chunks of the
waiting ones in the token budget that is left (mixed steps, as vLLM V1 and SGLang do).

Fairness between prompts: when several prompts wait, or sequences are decoding, each prompt takes at most
`long_prefill_token_threshold` tokens a step, so short prompts get their turn beside a long one instead of behind
it and running streams are not held up by a whole long chunk; at most `max_num_partial_prefills` prompts are
part-way at once, and prompts that finish in the step may pass them. A prompt alone with no stream running takes
the whole budget. The oldest prompt always
goes first and so progresses every step. The scheduler only moves sequences between queues and reserves cache
blocks; it never touches tensors.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from pbs_engine.engine.block_manager import BlockManager
from pbs_engine.engine.sequence import Sequence, SequenceStatus

LONG_PREFILL_CAP = 8192  # default per-step share of one prompt while others run or wait: a step of 8K prefill tokens
# plus the decodes takes ~0.25 s on the Qwen2.5-7B-1M shape (H200), the longest a running stream then waits


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]  # the first num_decodes are decode rows (one token each), then prefill rows
    num_tokens: list[int]  # tokens computed for each sequence in this step
    num_decodes: int = 0

    @property
    def has_prefill(self) -> bool:
        return len(self.seqs) > self.num_decodes

    def completes_prompt(self, i: int) -> bool:
        """Whether this step computes the last pending token of sequence i (so a new token is sampled)."""
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_tokens[i] == len(seq)

    def row(self, i: int) -> "ScheduledBatch":
        """Sequence i alone, as a batch of its own."""
        return ScheduledBatch([self.seqs[i]], [self.num_tokens[i]], int(i < self.num_decodes))


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, chunked_prefill: bool,
                 max_num_partial_prefills: int = 4, long_prefill_token_threshold: int | None = None):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked_prefill = chunked_prefill
        self.max_num_partial_prefills = max_num_partial_prefills
        self.long_prefill_token_threshold = long_prefill_token_threshold or max(1, min(max_num_batched_tokens // 4,
                                                                                       LONG_PREFILL_CAP))
        self.waiting: deque[Sequence] = deque()  # arrival order; prompts partly prefilled stay here until done
        self.running: list[Sequence] = []  # prompt done: one decode token per step
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        decodes = self._schedule_decodes()
        seqs, counts = self._schedule_prefills(self.max_num_batched_tokens - len(decodes))
        if not decodes and not seqs:
            return None
        return ScheduledBatch(decodes + seqs, [1] * len(decodes) + counts, num_decodes=len(decodes))

    def _schedule_decodes(self) -> list[Sequence]:
        """Every running sequence that its next token's cache slot can be found for; when the cache is full the
        newest running sequence is preempted (recomputed later) to make room for the older ones."""
        scheduled: list[Sequence] = []
        queue = list(self.running)[:self.max_num_batched_tokens]
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
        return scheduled

    def _schedule_prefills(self, budget: int) -> tuple[list[Sequence], list[int]]:
        """Prefill chunks in arrival order. Under contention (several prompts wait, or streams decode) each prompt
        takes at most `long_prefill_token_threshold` tokens, and at most `max_num_partial_prefills` prompts that
        stay unfinished after this step take part: a prompt that finishes in this step (a short one) may pass them,
        as vLLM's max_long_partial_prefills lets short prompts jump the queue. A lone prompt with no stream running
        takes the whole budget. A prompt whose next chunk does not fit the free cache waits (and so do the
        ones behind it: first come, first served)."""
        waiting = list(self.waiting)[:max(0, self.max_num_seqs - len(self.running))]
        contended = len(waiting) > 1 or bool(self.running)
        cap = self.long_prefill_token_threshold if contended else budget
        seqs, counts, partial = [], [], 0
        for seq in waiting:
            if budget <= 0:
                break
            if seq.num_computed_tokens == 0 and not seq.block_table:
                self.blocks.match_prefix(seq)  # cached prompt blocks count as computed
            pending = len(seq) - seq.num_computed_tokens
            n = min(pending, budget, cap) if self.chunked_prefill else min(pending, budget)
            if n < pending and not self.chunked_prefill and seqs:
                break
            if n < pending and partial >= self.max_num_partial_prefills:
                continue  # enough prompts are part-way: only ones that finish now go beside them
            if not self.blocks.can_allocate(seq, seq.num_computed_tokens + n) and not (
                    not seqs and self._make_room(seq, seq.num_computed_tokens + n)):
                break
            self.blocks.allocate(seq, seq.num_computed_tokens + n)
            seqs.append(seq)
            counts.append(n)
            partial += n < pending
            budget -= n
        return seqs, counts

    def _make_room(self, seq: Sequence, num_tokens: int) -> bool:
        """The oldest prompt's chunk does not fit: free the cache of the newest partly prefilled prompts behind it
        (they start over later) until it does, so the oldest always progresses; False when even that cannot make
        room (running sequences hold the cache: it waits for them)."""
        behind = [s for s in self.waiting if s is not seq and s.block_table]
        while not self.blocks.can_allocate(seq, num_tokens) and behind:
            victim = behind.pop()
            self.blocks.free_seq(victim)
            self.num_preemptions += 1
        return self.blocks.can_allocate(seq, num_tokens)

    def preempt(self, seq: Sequence) -> None:
        """Free the sequence's cache and put it back at the head of the queue to be recomputed."""
        self.running.remove(seq)
        self.blocks.free_seq(seq)
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def after_step(self, batch: ScheduledBatch) -> None:
        """Account the computed tokens and move sequences whose prompt is done to running."""
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens)):
            seq.num_computed_tokens += n
            if i < batch.num_decodes or seq.status != SequenceStatus.WAITING:
                continue
            self.blocks.cache_full_blocks(seq)
            if seq.num_computed_tokens == len(seq):
                self.waiting.remove(seq)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)

    def pending_prefill_tokens(self) -> int:
        """Prompt tokens admitted and not computed yet."""
        return sum(len(s) - s.num_computed_tokens for s in self.waiting)

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_seq(seq)
        seq.status = SequenceStatus.FINISHED
