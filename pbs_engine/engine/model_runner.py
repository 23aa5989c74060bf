"""Tensors in, tokens out: packs a scheduled batch, runs the model over the paged KV cache, samples."""
from __future__ import annotations

import logging

import torch

from pbs_engine.engine.config import CPU_KV_CACHE_MEMORY, EngineConfig
from pbs_engine.engine.cuda_graphs import DecodeGraphs
from pbs_engine.engine.sampler import Sampler, top_logprobs
from pbs_engine.engine.scheduler import ScheduledBatch
from pbs_engine.engine.sequence import Sequence
from pbs_engine.models.layers.attention import AttentionMetadata
from pbs_engine.models.loader import build_model

logger = logging.getLogger(__name__)
LOGITS_CHUNK = 1024  # rows of prompt logits materialised at once for prompt_logprobs


class ModelRunner:
    def __init__(self, config: EngineConfig, model_dir: str, max_model_len_from_model: bool):
        self.config = config
        self.max_model_len_from_model = max_model_len_from_model
        self.device = torch.device(config.device)
        self.model = build_model(model_dir, self.device, config.torch_dtype, config.max_model_len,
                                 config.load_format)
        self.model_config = self.model.config
        self.sampler = Sampler(self.device)
        self.num_kv_blocks = self._allocate_kv_cache()
        self.graphs = None
        if self.device.type == "cuda" and not config.enforce_eager:
            width = -(-config.max_model_len // config.kv_block_size)
            self.graphs = DecodeGraphs(self.model, config.max_num_seqs, width, self.num_kv_blocks,
                                       config.kv_block_size, self.device)

    def kv_bytes_per_block(self) -> int:
        cfg = self.model_config
        elem = torch.empty(0, dtype=self.config.torch_dtype).element_size()
        return 2 * cfg.num_hidden_layers * self.config.kv_block_size * cfg.num_key_value_heads * cfg.head_dim * elem

    def _allocate_kv_cache(self) -> int:
        cfg, conf = self.model_config, self.config
        num_blocks = conf.num_kv_blocks
        if num_blocks is None:
            if self.device.type == "cuda":
                free, total = torch.cuda.mem_get_info(self.device)
                budget = free - (1 - conf.gpu_memory_utilization) * total
                if conf.kv_cache_memory is not None:
                    budget = min(budget, conf.kv_cache_memory)
            else:
                budget = conf.kv_cache_memory or CPU_KV_CACHE_MEMORY
            num_blocks = int(budget // self.kv_bytes_per_block())
            needed = -(-conf.max_model_len // conf.kv_block_size)
            if self.device.type == "cpu":
                num_blocks = min(num_blocks, needed * conf.max_num_seqs)
            if num_blocks < 1:
                raise ValueError(f"a KV cache of {int(budget)} bytes holds no block of {self.kv_bytes_per_block()} "
                                 f"bytes ({conf.kv_block_size} tokens); raise kv_cache_memory")
        capacity = num_blocks * conf.kv_block_size
        if capacity < conf.max_model_len:
            if not self.max_model_len_from_model:
                raise ValueError(
                    f"KV cache of {num_blocks} blocks x {conf.kv_block_size} tokens cannot hold max_model_len="
                    f"{conf.max_model_len}; lower max_model_len or give the cache more memory (kv_cache_memory or "
                    "num_kv_blocks)")
            logger.warning("max_model_len lowered from %d to %d, what the KV cache holds", conf.max_model_len, capacity)
            conf.max_model_len = capacity
        # one extra block at the end: scratch space for the padding rows of CUDA-graph decode batches
        shape = (cfg.num_hidden_layers, num_blocks + 1, conf.kv_block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.k_cache = torch.empty(shape, dtype=conf.torch_dtype, device=self.device)
        self.v_cache = torch.empty(shape, dtype=conf.torch_dtype, device=self.device)
        for i, attn in enumerate(self.model.attention_layers()):
            attn.k_cache, attn.v_cache = self.k_cache[i], self.v_cache[i]
        return num_blocks

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        rows = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        return torch.tensor(rows, dtype=torch.int32, device=self.device)

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs = self.config.kv_block_size
        return [seq.block_table[p // bs] * bs + p % bs for p in range(start, end)]

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        ids, positions, slots, lens_q, lens_k = [], [], [], [], []
        for seq, n in zip(batch.seqs, batch.num_tokens):
            start = seq.num_computed_tokens
            ids += seq.tokens(start, start + n)
            positions += range(start, start + n)
            slots += self._slots(seq, start, start + n)
            lens_q.append(n)
            lens_k.append(start + n)
        dev = self.device

        def cumulative(lens):
            return torch.tensor([0] + lens, dtype=torch.int32, device=dev).cumsum(0).to(torch.int32)

        meta = AttentionMetadata(
            is_prefill=batch.is_prefill,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=self._block_tables(batch.seqs),
            cu_seqlens_q=cumulative(lens_q) if batch.is_prefill else None,
            cu_seqlens_k=cumulative(lens_k) if batch.is_prefill else None,
            seq_lens_q=lens_q if batch.is_prefill else [],
            seq_lens_k=lens_k if batch.is_prefill else [],
            context_lens=None if batch.is_prefill else torch.tensor(lens_k, dtype=torch.int32, device=dev),
            prefill_method=self.config.attention,
            pbs=self.config.pbs,
        )
        as_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=dev)  # noqa: E731
        return as_tensor(ids), as_tensor(positions), meta

    @torch.inference_mode()
    def step(self, batch: ScheduledBatch, decode_token) -> list[int | None]:
        """Run one scheduled batch; returns the sampled token of each sequence whose pending tokens are all done
        (None for a prefill chunk that leaves more of its prompt to compute)."""
        ids, positions, meta = self.prepare(batch)
        if self.graphs is not None and not batch.is_prefill and self.graphs.fits(len(batch.seqs)):
            hidden = self.graphs.run(ids, positions, meta)
        else:
            hidden = self.model(ids, positions, meta)
        ends = torch.tensor(meta.seq_lens_q if batch.is_prefill else [1] * len(batch.seqs),
                            device=self.device).cumsum(0) - 1
        sample_rows = [i for i in range(len(batch.seqs)) if batch.completes_prompt(i)]
        if batch.is_prefill:
            self._prompt_logprobs(batch, hidden, ends, decode_token)
        result: list[int | None] = [None] * len(batch.seqs)
        if not sample_rows:
            return result
        seqs = [batch.seqs[i] for i in sample_rows]
        logits = self.model.compute_logits(hidden[ends[sample_rows]])
        tokens = self.sampler(logits, seqs)
        if any(s.params.logprobs is not None for s in seqs):
            lps = torch.log_softmax(logits, dim=-1)
            for j, seq in enumerate(seqs):
                if seq.params.logprobs is not None:
                    row = top_logprobs(lps[j:j + 1], tokens[j:j + 1], seq.params.logprobs, decode_token)[0]
                    seq.pending_logprobs = row
        for i, tok in zip(sample_rows, tokens.tolist()):
            result[i] = tok
        return result

    def _prompt_logprobs(self, batch: ScheduledBatch, hidden: torch.Tensor, ends: torch.Tensor, decode_token):
        """Log-probs of each prompt token given its prefix, for requests that asked (first computation only)."""
        for seq, n, end in zip(batch.seqs, batch.num_tokens, ends.tolist()):
            begin, first = end - n + 1, seq.num_computed_tokens
            if seq.params.prompt_logprobs is not None and first < seq.num_prompt_tokens:
                if seq.prompt_logprobs is None:
                    seq.prompt_logprobs = [None]
                # hidden row at position p predicts token p + 1; only prompt tokens count
                last = min(first + n, seq.num_prompt_tokens - 1)
                done = len(seq.prompt_logprobs) - 1  # a recompute after preemption skips what is known
                for c0 in range(max(first, done), last, LOGITS_CHUNK):
                    c1 = min(c0 + LOGITS_CHUNK, last)
                    rows = hidden[begin + (c0 - first):begin + (c1 - first)]
                    lps = torch.log_softmax(self.model.compute_logits(rows), dim=-1)
                    targets = torch.tensor(seq.prompt_ids[c0 + 1:c1 + 1], device=self.device)
                    seq.prompt_logprobs += top_logprobs(lps, targets, seq.params.prompt_logprobs, decode_token)
