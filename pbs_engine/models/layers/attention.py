"""The attention backend: writes new K/V into the paged cache (fused with RoPE where it can), then runs dense or
PBS prefill, or paged decode.

The runner builds one `AttentionMetadata` per forward pass and hands it down explicitly; kernels choose Triton on
CUDA tensors and their PyTorch references elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pbs_engine.kernels import PBSConfig, flash_prefill, paged_decode, pbs_prefill, rope_and_cache
from pbs_engine.kernels.paged_decode import dequantize_kv, quantize_kv
from pbs_engine.kernels.selection import dense_stats
from pbs_engine.models.layers.rotary import RotaryEmbedding


@dataclass
class AttentionMetadata:
    """What one forward pass needs to know about its batch. Prefill batches are varlen; decode is one token/seq."""

    is_prefill: bool  # False: every row is a decode token; True: prefill chunks, after num_decode_tokens decode rows
    slot_mapping: torch.Tensor | None  # (T,) int64 cache slot (block * page + offset) per new token; None: no cache
    block_tables: torch.Tensor | None = None  # (B, max_blocks) int32, decode rows' sequences first
    num_decode_tokens: int = 0  # in a mixed batch: the first rows are one decode token per running sequence
    # prefill rows
    cu_seqlens_q: torch.Tensor | None = None  # (P+1,) int32 over the P prefill sequences
    cu_seqlens_k: torch.Tensor | None = None  # (P+1,) int32
    seq_lens_q: list[int] = field(default_factory=list)
    seq_lens_k: list[int] = field(default_factory=list)
    row_cu_seqlens: torch.Tensor | None = None  # (P, 2, 2) int32: [0, q_len], [0, k_len] of each prefill row alone
    # decode rows
    context_lens: torch.Tensor | None = None  # (D,) int32, tokens in cache including the new one
    # PBS
    prefill_method: str = "dense"  # "dense" | "pbs"
    pbs: PBSConfig | None = None
    pbs_stats: list | None = None  # when a list, each PBS call appends (layer_idx, prefill row, PBSStats)

    @property
    def has_prefix(self) -> bool:
        return any(k != q for q, k in zip(self.seq_lens_q, self.seq_lens_k))


class Attention(nn.Module):
    """Attention over q/k/v already projected and rotated. `k_cache`/`v_cache`: (num_blocks, page, Hkv, D), in the
    model's dtype, or e4m3 with one float32 scale per (token, head) in `k_scale`/`v_scale` (num_blocks, page, Hkv)
    for an FP8 cache: written quantised, dequantised where read (the decode kernel, the gathered prefix of a
    chunked prefill, so dense and PBS prefill and PBS selection see it in the model's dtype)."""

    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.k_scale: torch.Tensor | None = None  # FP8 cache only
        self.v_scale: torch.Tensor | None = None

    def _flat_caches(self) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(c.view(-1, self.num_kv_heads, self.head_dim) for c in (self.k_cache, self.v_cache))

    def rotate_and_store(self, rotary: RotaryEmbedding, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor, meta: AttentionMetadata
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """(q, k, v, stored): q and k rotated by their positions, v contiguous; with a cache in the model's dtype the
        same kernel also writes k and v into it (stored True: pass it to forward, which then skips its write), one
        launch where RoPE, a copy and two index_puts were. An FP8 cache is still written, quantised, by forward."""
        if self.k_cache is None or meta.slot_mapping is None or self.k_scale is not None:
            q, k = rotary(positions, q, k)
            return q, k, v.contiguous(), False
        q, k, v = rope_and_cache(q, k, v, positions, rotary.cos_sin_cache, meta.slot_mapping, *self._flat_caches())
        return q, k, v, True

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                stored: bool = False) -> torch.Tensor:
        """stored: k and v are already in the cache (rotate_and_store wrote them)."""
        if not stored and self.k_cache is not None and meta.slot_mapping is not None:
            flat_k, flat_v = self._flat_caches()
            if self.k_scale is None:
                flat_k[meta.slot_mapping] = k.to(flat_k.dtype)
                flat_v[meta.slot_mapping] = v.to(flat_v.dtype)
            else:
                for x, flat, scales in ((k, flat_k, self.k_scale), (v, flat_v, self.v_scale)):
                    x8, sc = quantize_kv(x)
                    flat[meta.slot_mapping] = x8
                    scales.view(-1, self.num_kv_heads)[meta.slot_mapping] = sc
        scales = dict(k_scale=self.k_scale, v_scale=self.v_scale)
        if not meta.is_prefill:
            return paged_decode(q, self.k_cache, self.v_cache, meta.block_tables, meta.context_lens,
                                sm_scale=self.scale, **scales)
        nd = meta.num_decode_tokens
        if nd == 0:
            return self._prefill(q, k, v, meta)
        out = torch.empty_like(q)
        out[:nd] = paged_decode(q[:nd], self.k_cache, self.v_cache, meta.block_tables[:nd], meta.context_lens,
                                sm_scale=self.scale, **scales)
        out[nd:] = self._prefill(q[nd:], k[nd:], v[nd:], meta)
        return out

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if meta.has_prefix:
            k, v = self._gather_context(meta, q.dtype)
        if meta.prefill_method == "pbs":
            return self._pbs(q, k, v, meta)
        return flash_prefill(q, k, v, meta.cu_seqlens_q, meta.cu_seqlens_k, causal=True, sm_scale=self.scale,
                             max_seqlen_q=max(meta.seq_lens_q))

    def _gather_context(self, meta: AttentionMetadata, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Each prefill sequence's whole context (cached prefix + this chunk) from the paged cache, packed varlen,
        in `dtype` (an FP8 cache dequantised)."""
        page = self.k_cache.shape[1]
        ks, vs = [], []
        for i, kv_len in enumerate(meta.seq_lens_k):
            blocks = meta.block_tables[meta.num_decode_tokens + i, : (kv_len + page - 1) // page].long()
            for cache, scale, out in ((self.k_cache, self.k_scale, ks), (self.v_cache, self.v_scale, vs)):
                rows = cache[blocks].flatten(0, 1)[:kv_len]
                out.append(dequantize_kv(rows, None if scale is None else scale[blocks].flatten(0, 1)[:kv_len],
                                         dtype))
        return torch.cat(ks), torch.cat(vs)

    def _pbs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """PBS prefill row by row; a row whose context is shorter than the PBS `min_length` runs dense (there the
        selection costs more than it saves) and counts as fully dense in the stats."""
        out = torch.empty_like(q)
        q0 = k0 = 0
        min_length = meta.pbs.dense_below(q.device)
        for row, (q_len, k_len) in enumerate(zip(meta.seq_lens_q, meta.seq_lens_k)):
            rows, keys = slice(q0, q0 + q_len), slice(k0, k0 + k_len)
            if k_len < min_length:
                cu = (meta.row_cu_seqlens[row] if meta.row_cu_seqlens is not None else
                      torch.tensor([[0, q_len], [0, k_len]], dtype=torch.int32, device=q.device))
                out[rows] = flash_prefill(q[rows], k[keys], v[keys], cu[0], cu[1], causal=True, sm_scale=self.scale,
                                          max_seqlen_q=q_len)
                stats = dense_stats(meta.pbs, q_len, k_len, self.num_heads, q.device)
            else:
                o, stats = pbs_prefill(q[rows], k[keys], v[keys], meta.pbs, sm_scale=self.scale)
                if q_len == q.shape[0]:  # the only row: no copy
                    out = o
                else:
                    out[rows] = o
            if meta.pbs_stats is not None:
                meta.pbs_stats.append((self.layer_idx, row, stats))
            q0, k0 = q0 + q_len, k0 + k_len
        return out
