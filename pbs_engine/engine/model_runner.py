"""Tensors in, tokens out: packs a scheduled batch into a StepInput, runs the model over the paged KV cache on
every tensor-parallel rank, samples on rank 0.

Under tensor parallelism rank 0 (this process) sends each step's StepInput to the other ranks (engine/workers.py)
and all of them run `execute` in lockstep: the model's collectives join their head and vocabulary slices. The
StepInput also lists the hidden rows whose logits rank 0 needs (sampling, prompt logprobs), so every rank takes
part in the same vocab-parallel gathers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from pbs_engine.engine.config import CPU_KV_CACHE_MEMORY, EngineConfig
from pbs_engine.engine.cuda_graphs import DecodeGraphs
from pbs_engine.engine.sampler import Sampler, top_logprobs
from pbs_engine.engine.scheduler import ScheduledBatch
from pbs_engine.engine.sequence import Sequence
from pbs_engine.kernels import PBSConfig
from pbs_engine.models.layers.attention import AttentionMetadata
from pbs_engine.models.layers.parallel import SINGLE, TensorParallel
from pbs_engine.models.loader import build_model

logger = logging.getLogger(__name__)
LOGITS_CHUNK = 1024  # rows of prompt logits materialised at once for prompt_logprobs
CHUNK_CHOICES = (131072, 65536, 32768, 16384, 8192)  # prefill chunks the runner picks from (largest that fits)
ACTIVATION_MARGIN = 1.25  # on top of the activations counted in prefill_memory: temporaries, allocator slack


@dataclass
class Launched:
    """A decode step enqueued without reading its samples back (async scheduling)."""

    batch: ScheduledBatch
    tokens: torch.Tensor  # (B,) sampled ids on the device, row i for batch.seqs[i]
    host: torch.Tensor  # (B,) their copy in (pinned) host memory, valid once `event` has completed
    event: torch.cuda.Event | None  # None on the CPU, where the copy is done when it returns


@dataclass
class StepInput:
    """One step for the model, in host arrays and lists (what crosses to the other ranks): decode rows first."""

    ids: np.ndarray  # (T,) int64
    positions: np.ndarray  # (T,) int64
    slots: np.ndarray  # (T,) int64 flat cache slots
    block_tables: list[list[int]]
    num_decodes: int
    context_lens: list[int]  # decode rows: tokens in cache including the new one
    lens_q: list[int]  # prefill rows
    lens_k: list[int]
    prefill_method: str
    pbs: PBSConfig
    logit_rows: list[list[int]] = field(default_factory=list)  # hidden rows per logits call rank 0 makes
    fill_dst: list[int] = field(default_factory=list)  # async scheduling: rows whose input token is still on the
    fill_src: list[int] = field(default_factory=list)  # device, and the row of the previous step's samples holding it

    @property
    def has_prefill(self) -> bool:
        return bool(self.lens_q)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_dir: str, max_model_len_from_model: bool,
                 tp: TensorParallel = SINGLE, device: torch.device | None = None, model_config=None):
        self.config = config
        self.max_model_len_from_model = max_model_len_from_model
        self.tp = tp
        self.device = device or torch.device(config.device)
        if config.quantization == "fp8" and self.device.type == "cuda":
            from pbs_engine.kernels import FP8_UNSUPPORTED, supports_fp8

            if not supports_fp8(self.device):
                raise ValueError(FP8_UNSUPPORTED)
        self.model = build_model(model_dir, self.device, config.torch_dtype, config.max_model_len,
                                 config.load_format, tp, model_config, config.quantization)
        self.model_config = self.model.config
        self.sampler = Sampler(self.device)
        self.num_kv_blocks = self._allocate_kv_cache()
        self.graphs = None
        if self.device.type == "cuda" and not config.enforce_eager:
            width = -(-config.max_model_len // config.kv_block_size)
            self.graphs = DecodeGraphs(self.model, config.max_num_seqs, width, self.num_kv_blocks,
                                       config.kv_block_size, self.device)

    def kv_bytes_per_block(self) -> int:
        """K and V of one block over all layers; an FP8 cache: one byte per element and a float32 scale per
        (token, head)."""
        cfg = self.model_config
        attn = self.model.attention_layers()[0]
        if self.config.kv_cache_dtype == "fp8":
            per_head = cfg.head_dim + 4
        else:
            per_head = cfg.head_dim * torch.empty(0, dtype=self.config.torch_dtype).element_size()
        return 2 * cfg.num_hidden_layers * self.config.kv_block_size * attn.num_kv_heads * per_head

    def prefill_memory(self, chunk: int, context: int) -> int:
        """Bytes one prefill step of `chunk` tokens over a `context`-token context needs beyond the weights and the
        KV cache: the widest layer's activations (hidden, residual, qkv, MLP gate/up and its product) and PBS
        selection's buffers (block scores and lists, the permuted and gathered K/V)."""
        cfg, pbs = self.model_config, self.config.pbs
        attn = self.model.attention_layers()[0]
        hq, hkv, d = attn.num_heads, attn.num_kv_heads, cfg.head_dim
        elem = torch.empty(0, dtype=self.config.torch_dtype).element_size()
        inter = -(-cfg.intermediate_size // self.tp.size)
        per_token = elem * (4 * cfg.hidden_size + 3 * inter + 2 * (hq + 2 * hkv) * d)
        nqb, nkb = -(-chunk // pbs.block_size), -(-context // pbs.block_size)
        selection = 4 * hq * nqb * nkb * (pbs.query_reps + 1) + 4 * nqb * nkb + context * hkv * (4 * d * elem + 24)
        return int(ACTIVATION_MARGIN * (per_token * chunk + selection))

    def _prefill_chunk(self, room: float, kv_needed: float, share: float = 1 / 3) -> int:
        """The largest CHUNK_CHOICES chunk (at most max_model_len) whose prefill_memory takes at most `share` of
        `room` bytes and leaves kv_needed bytes of it for the KV cache; the smallest choice when none does."""
        longest = self.config.max_model_len
        for chunk in CHUNK_CHOICES:
            chunk = min(chunk, longest)
            need = self.prefill_memory(chunk, longest)
            if need <= room * share and room - need >= kv_needed:
                return chunk
        return min(CHUNK_CHOICES[-1], longest)

    def _allocate_kv_cache(self) -> int:
        cfg, conf = self.model_config, self.config
        num_blocks = conf.num_kv_blocks
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            room = free - (1 - conf.gpu_memory_utilization) * total
            per_token = self.kv_bytes_per_block() / conf.kv_block_size
            if conf.max_num_batched_tokens is None:  # sized before the cache takes the memory
                conf.max_num_batched_tokens = (
                    self._prefill_chunk(room, per_token * conf.max_model_len) if num_blocks is None
                    else self._prefill_chunk(room, num_blocks * self.kv_bytes_per_block(), share=1.0))
                logger.info("prefill chunk: %d tokens", conf.max_num_batched_tokens)
        if num_blocks is None:
            if self.device.type == "cuda":
                budget = room - self.prefill_memory(conf.max_num_batched_tokens, conf.max_model_len)
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
            if self.tp.size > 1:  # every rank holds the same blocks: as many as the fullest device allows
                num_blocks = int(self.tp.all_min(torch.tensor([num_blocks], device=self.device)).item())
        capacity = num_blocks * conf.kv_block_size
        if capacity < conf.max_model_len:
            if not self.max_model_len_from_model:
                raise ValueError(
                    f"KV cache of {num_blocks} blocks x {conf.kv_block_size} tokens cannot hold max_model_len="
                    f"{conf.max_model_len}; lower max_model_len or give the cache more memory (kv_cache_memory or "
                    "num_kv_blocks)")
            logger.warning("max_model_len lowered from %d to %d, what the KV cache holds", conf.max_model_len, capacity)
            conf.max_model_len = capacity
        attn = self.model.attention_layers()[0]
        # one extra block at the end: scratch space for the padding rows of CUDA-graph decode batches
        shape = (cfg.num_hidden_layers, num_blocks + 1, conf.kv_block_size, attn.num_kv_heads, cfg.head_dim)
        fp8 = conf.kv_cache_dtype == "fp8"
        cache_dtype = torch.float8_e4m3fn if fp8 else conf.torch_dtype
        self.k_cache = torch.empty(shape, dtype=cache_dtype, device=self.device)
        self.v_cache = torch.empty(shape, dtype=cache_dtype, device=self.device)
        if fp8:  # scales start at zero: the scratch block's padding rows then read as zeros, never as NaN
            self.k_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=self.device)
            self.v_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=self.device)
            self.k_cache.view(torch.uint8).zero_()
            self.v_cache.view(torch.uint8).zero_()
        for i, layer in enumerate(self.model.attention_layers()):
            layer.k_cache, layer.v_cache = self.k_cache[i], self.v_cache[i]
            if fp8:
                layer.k_scale, layer.v_scale = self.k_scale[i], self.v_scale[i]
        return num_blocks

    # ---- rank 0: batch -> StepInput, logits -> tokens -------------------------------------------------------------
    def prepare(self, batch: ScheduledBatch) -> StepInput:
        """Pack the batch: decode rows (one token each) first, then each prefill chunk's tokens, in numpy (a
        million-token prompt packs in milliseconds)."""
        bs = self.config.kv_block_size
        ids, positions, slots, tables = [], [], [], []
        inp = StepInput(None, None, None, tables, batch.num_decodes, [], [], [], self.config.attention,
                        self.config.pbs)
        width = max(len(s.block_table) for s in batch.seqs)
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens)):
            start = seq.num_computed_tokens
            pos = np.arange(start, start + n, dtype=np.int64)
            table = np.asarray(seq.block_table, dtype=np.int64)
            ids.append(np.asarray(seq.tokens(start, start + n), dtype=np.int64))
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            tables.append(seq.block_table + [0] * (width - len(seq.block_table)))
            if i < batch.num_decodes:
                inp.context_lens.append(start + 1)
            else:
                inp.lens_q.append(n)
                inp.lens_k.append(start + n)
        inp.ids, inp.positions, inp.slots = (np.concatenate(x) for x in (ids, positions, slots))
        return inp

    def _plan_logits(self, batch: ScheduledBatch, inp: StepInput) -> list[tuple[Sequence, int, int]]:
        """Fill inp.logit_rows: first the rows sampled from, then prompt-logprob chunks; returns (seq, first
        position, last position) of each chunk."""
        ends = (np.cumsum(batch.num_tokens) - 1).tolist()
        inp.logit_rows.append([ends[i] for i in range(len(batch.seqs)) if batch.completes_prompt(i)])
        chunks = []
        for seq, n, end in zip(batch.seqs, batch.num_tokens, ends):
            begin, first = end - n + 1, seq.num_computed_tokens
            if seq.params.prompt_logprobs is None or first >= seq.num_prompt_tokens:
                continue
            # hidden row at position p predicts token p + 1; only prompt tokens count
            last = min(first + n, seq.num_prompt_tokens - 1)
            done = len(seq.prompt_logprobs) - 1 if seq.prompt_logprobs else 0  # a recompute skips what is known
            for c0 in range(max(first, done), last, LOGITS_CHUNK):
                c1 = min(c0 + LOGITS_CHUNK, last)
                inp.logit_rows.append(list(range(begin + c0 - first, begin + c1 - first)))
                chunks.append((seq, c0, c1))
        return chunks

    @torch.inference_mode()
    def step(self, batch: ScheduledBatch, workers=None) -> list[int | None]:
        """Run one scheduled batch; returns the sampled token of each sequence whose pending tokens are all done
        (None for a prefill chunk that leaves more of its prompt to compute)."""
        inp = self.prepare(batch)
        chunks = self._plan_logits(batch, inp)
        if workers is not None:
            workers.send(inp)
        results = self.execute(inp)
        sample_logits = next(results)
        for (seq, c0, c1), logits in zip(chunks, results):
            if seq.prompt_logprobs is None:
                seq.prompt_logprobs = [None]
            targets = torch.tensor(seq.prompt_ids[c0 + 1:c1 + 1], device=self.device)
            seq.prompt_logprobs += top_logprobs(torch.log_softmax(logits, dim=-1), targets, seq.params.prompt_logprobs)
        density = next(results, None)
        if density is not None:
            for seq, (kept, visible) in zip(batch.seqs[batch.num_decodes:], density.tolist()):
                seq.metrics.pbs_kept_blocks += kept
                seq.metrics.pbs_visible_blocks += visible
        sample_rows = [i for i in range(len(batch.seqs)) if batch.completes_prompt(i)]
        result: list[int | None] = [None] * len(batch.seqs)
        if not sample_rows:
            return result
        seqs = [batch.seqs[i] for i in sample_rows]
        tokens = self.sampler(sample_logits, seqs)
        if any(s.params.logprobs is not None for s in seqs):
            lps = torch.log_softmax(sample_logits, dim=-1)
            for j, seq in enumerate(seqs):
                if seq.params.logprobs is not None:
                    seq.pending_logprobs = top_logprobs(lps[j:j + 1], tokens[j:j + 1], seq.params.logprobs)[0]
        for i, tok in zip(sample_rows, tokens.tolist()):
            result[i] = tok
        return result

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, prev: Launched | None = None) -> Launched:
        """Enqueue a decode-only batch (one sampled token per row) and start copying its samples to the host,
        reading nothing back: a sequence whose last token is still in flight in `prev` takes it from prev's
        samples on the device. Single rank, no logprobs or penalties (the engine checks)."""
        inp = self.prepare(batch)
        self._plan_logits(batch, inp)
        if prev is not None:
            rows = {id(s): i for i, s in enumerate(prev.batch.seqs)}
            for i, seq in enumerate(batch.seqs):
                if seq.inflight and id(seq) in rows:
                    inp.fill_dst.append(i)
                    inp.fill_src.append(rows[id(seq)])
        results = self.execute(inp, prev.tokens if prev is not None else None)
        tokens = self.sampler(next(results), batch.seqs)
        for _ in results:  # nothing more for decode rows; drains the generator
            pass
        cuda = tokens.is_cuda
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=cuda)
        host.copy_(tokens, non_blocking=cuda)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        return Launched(batch, tokens, host, event)

    @staticmethod
    def collect(launched: Launched) -> list[int]:
        """The sampled tokens of a launched step (waits for that step only, not for ones launched after it)."""
        if launched.event is not None:
            launched.event.synchronize()
        return launched.host.tolist()

    # ---- every rank ------------------------------------------------------------------------------------------------
    def _tensors(self, inp: StepInput, fill: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[torch.Tensor]]:
        """The step's device tensors (ids, positions, metadata, the hidden rows of each logits call), all packed into one pinned host buffer and copied with one non-blocking
        transfer (no host sync: the GPU may still be running the previous step)."""
        dev = self.device
        prefill = inp.has_prefill
        nq = len(inp.lens_q)
        parts = {"ids": inp.ids, "positions": inp.positions, "slots": inp.slots,
                 "tables": np.asarray(inp.block_tables, dtype=np.int64).reshape(-1)}
        if prefill:
            parts["cu_q"] = np.cumsum([0] + inp.lens_q)
            parts["cu_k"] = np.cumsum([0] + inp.lens_k)
            # per prefill row: [0, q_len] and [0, k_len], for a row whose attention runs on its own
            parts["row_cu"] = np.stack([np.zeros(nq, np.int64), inp.lens_q, np.zeros(nq, np.int64),
                                        inp.lens_k], 1).reshape(-1)
        if inp.context_lens:
            parts["context_lens"] = np.asarray(inp.context_lens, dtype=np.int64)
        for j, rows in enumerate(inp.logit_rows):
            parts[f"logits{j}"] = np.asarray(rows, dtype=np.int64)
        if inp.fill_dst:
            parts["fill_dst"] = np.asarray(inp.fill_dst, dtype=np.int64)
            parts["fill_src"] = np.asarray(inp.fill_src, dtype=np.int64)
        host = torch.from_numpy(np.concatenate(list(parts.values())).astype(np.int64, copy=False))
        if dev.type == "cuda":
            host = host.pin_memory()
        flat = host.to(dev, non_blocking=True)
        views, offset = {}, 0
        for name, arr in parts.items():
            views[name] = flat[offset:offset + len(arr)]
            offset += len(arr)
        if inp.fill_dst:  # input tokens the previous step sampled, still on the device (async scheduling)
            views["ids"][views["fill_dst"]] = fill[views["fill_src"]]
        i32 = lambda name: views[name].to(torch.int32)  # noqa: E731
        row_cu = i32("row_cu").view(nq, 2, 2) if prefill else None
        meta = AttentionMetadata(
            is_prefill=prefill,
            num_decode_tokens=inp.num_decodes if prefill else 0,
            slot_mapping=views["slots"],
            block_tables=i32("tables").view(len(inp.block_tables), -1),
            cu_seqlens_q=i32("cu_q") if prefill else None,
            cu_seqlens_k=i32("cu_k") if prefill else None,
            seq_lens_q=inp.lens_q,
            seq_lens_k=inp.lens_k,
            row_cu_seqlens=row_cu,
            context_lens=i32("context_lens") if inp.context_lens else None,
            prefill_method=inp.prefill_method,
            pbs=inp.pbs,
            pbs_stats=[] if prefill and inp.prefill_method == "pbs" else None,
        )
        return views["ids"], views["positions"], meta, [views[f"logits{j}"] for j in range(len(inp.logit_rows))]

    @torch.inference_mode()
    def execute(self, inp: StepInput, fill: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        """The forward pass, then the logits of each group of inp.logit_rows in turn, then (after a PBS prefill)
        each prefill row's (kept, visible) block pairs summed over layers, heads and ranks. `fill`: the previous
        step's samples, for the input rows inp.fill_dst names (async scheduling)."""
        ids, positions, meta, logit_rows = self._tensors(inp, fill)
        if self.graphs is not None and not inp.has_prefill and self.graphs.fits(len(inp.context_lens)):
            hidden = self.graphs.run(ids, positions, meta)
        else:
            hidden = self.model(ids, positions, meta)
        for rows in logit_rows:
            yield self.model.compute_logits(hidden[rows])
        if meta.pbs_stats is not None:
            counts = torch.zeros(len(inp.lens_q), 2, dtype=torch.long, device=self.device)
            for _, row, st in meta.pbs_stats:
                counts[row, 0] += st.kept.sum().to(counts.device)
                counts[row, 1] += st.visible.sum().to(counts.device)
            yield self.tp.all_reduce(counts)
