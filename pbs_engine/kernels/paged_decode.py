"""Decode attention over the paged KV cache: one query token per sequence, split-K (flash-decoding).

Layouts: q (B, Hq, D); k_cache, v_cache (num_blocks, PAGE, Hkv, D); block_tables int32 (B, max_pages);
seq_lens int32 (B,) cached tokens per sequence, the current one included. An FP8 cache (`kv_cache_dtype="fp8"`)
holds e4m3 values with one float32 scale per (token, KV head): k_scale, v_scale (num_blocks, PAGE, Hkv), value =
e4m3 x scale (`quantize_kv` writes them, `dequantize_kv` reads them back).
"""
from __future__ import annotations

import functools

import torch
from pbs_engine.kernels.triton_compat import tl, triton

from pbs_engine.kernels.dispatch import use_triton


KV_FP8 = torch.float8_e4m3fn
KV_FP8_MAX = 448.0


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, Hkv, D) -> (e4m3 (T, Hkv, D), float32 scale (T, Hkv)): each (token, head) row scaled by its amax."""
    xf = x.float()
    scale = xf.abs().amax(-1).clamp(min=1e-12) / KV_FP8_MAX
    return (xf / scale[..., None]).clamp(-KV_FP8_MAX, KV_FP8_MAX).to(KV_FP8), scale


def dequantize_kv(x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Cache rows back in `dtype`: x (..., D) e4m3 times scale (...), or x itself for a cache in the model's dtype."""
    return x.to(dtype) if scale is None else (x.float() * scale[..., None]).to(dtype)


def paged_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, sm_scale: float | None = None, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Per sequence: gather its pages (dequantised for an FP8 cache), repeat K/V heads for their groups,
    softmax(q k^T * scale) v in float32."""
    scale = sm_scale if sm_scale is not None else q.shape[-1] ** -0.5
    page, group = k_cache.shape[1], q.shape[1] // k_cache.shape[2]
    out = torch.empty_like(q)
    for i in range(q.shape[0]):
        n = int(seq_lens[i])
        blocks = block_tables[i, : (n + page - 1) // page].long()
        ks, vs = (None if x is None else x[blocks].flatten(0, 1)[:n] for x in (k_scale, v_scale))
        k = dequantize_kv(k_cache[blocks].flatten(0, 1)[:n], ks, torch.float32).repeat_interleave(group, dim=1)
        v = dequantize_kv(v_cache[blocks].flatten(0, 1)[:n], vs, torch.float32).repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[i].float(), k) * scale
        out[i] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v).to(q.dtype)
    return out


@triton.jit
def _paged_decode_split_kernel(Q, KC, VC, KS, VS, tables, lens, O_part, LSE_part, sm_scale,
                               s_qb, s_qh, s_kb, s_kp, s_kh, s_vb, s_vp, s_vh, s_sb, s_sp, s_tb, s_ob, s_oh, s_os,
                               s_lb, s_lh,
                               GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                               PAGE: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, FP8: tl.constexpr):
    # Program (sequence b, KV head g, split s): online softmax of the GROUP query heads of g (rows of one tile, so
    # each K/V tile is read once for the group) over split s's share of the sequence, walked in BLOCK_N-token tiles
    # (BLOCK_N divides PAGE; a tile's page comes from tables[b, token // PAGE]). K/V rows are (token, g) slices of
    # the caches, D contiguous. Writes the split's normalised output (B, Hq, SPLITS, D) and base-2 log-sum-exp.
    # FP8: the caches hold e4m3 rows, each times its scale in KS/VS (num_blocks, PAGE, Hkv), strides s_sb, s_sp, 1.
    b = tl.program_id(0)
    g = tl.program_id(1)
    split = tl.program_id(2)
    n = tl.load(lens + b)
    tiles = tl.cdiv(n, BLOCK_N)
    per_split = tl.cdiv(tiles, SPLITS)
    t_lo = split * per_split
    t_hi = tl.minimum(t_lo + per_split, tiles)
    offs_h = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    heads = g * GROUP + offs_h
    hmask = offs_h < GROUP
    q = tl.load(Q + b * s_qb + heads[:, None] * s_qh + offs_d[None, :], mask=hmask[:, None], other=0.0)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    for t in range(t_lo, t_hi):
        tok = t * BLOCK_N + offs_n
        block = tl.load(tables + b * s_tb + t * BLOCK_N // PAGE).to(tl.int64)
        rows = block * s_kb + (tok % PAGE)[:, None] * s_kp
        k = tl.load(KC + rows + g * s_kh + offs_d[None, :])
        if FP8:
            srow = block * s_sb + (tok % PAGE) * s_sp + g
            k = (k.to(tl.float32) * tl.load(KS + srow)[:, None]).to(q.dtype)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(tok[None, :] < n, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(VC + block * s_vb + (tok % PAGE)[:, None] * s_vp + g * s_vh + offs_d[None, :])
        if FP8:
            v = (v.to(tl.float32) * tl.load(VS + srow)[:, None]).to(q.dtype)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    empty = l_i == 0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(O_part + b * s_ob + heads[:, None] * s_oh + split * s_os + offs_d[None, :], out, mask=hmask[:, None])
    tl.store(LSE_part + b * s_lb + heads * s_lh + split, lse, mask=hmask)


@triton.jit
def _paged_decode_reduce_kernel(O_part, LSE_part, O, s_ob, s_oh, s_os, s_lb, s_lh, s_qb, s_qh,
                                HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr):
    # Program (sequence b, query head h): combine the SPLITS partial outputs (B, Hq, SPLITS, D) float32 by their
    # base-2 log-sum-exps (B, Hq, SPLITS); empty splits have lse -inf and weigh nothing. Writes O (B, Hq, D).
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    lse = tl.load(LSE_part + b * s_lb + h * s_lh + offs_s, mask=offs_s < SPLITS, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))
    w = tl.where(lse == float("-inf"), 0.0, w)
    part = tl.load(O_part + b * s_ob + h * s_oh + offs_s[:, None] * s_os + offs_d[None, :],
                   mask=(offs_s < SPLITS)[:, None], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(part * w[:, None], 0) / tl.where(total == 0, 1.0, total)
    tl.store(O + b * s_qb + h * s_qh + offs_d, out.to(O.dtype.element_ty))


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def decode_tiles(page: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_N tokens per tile, num_warps, num_stages, programs wanted per SM) of the split kernel."""
    return (min(page, 64), 4, 3, 4) if device.type == "cuda" else (page, 4, 1, 1)


def num_splits(batch: int, kv_heads: int, max_tiles: int, sms: int, per_sm: int) -> int:
    """Enough splits that batch x KV heads x splits gives every SM `per_sm` programs; depends only on static
    sizes, so one launch stays valid inside a CUDA graph for any sequence lengths."""
    want = max(1, (per_sm * sms) // max(1, batch * kv_heads))
    return max(1, min(want, max_tiles, 256))


def paged_decode_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                        seq_lens: torch.Tensor, sm_scale: float | None = None,
                        tiles: tuple[int, int, int, int] | None = None, k_scale: torch.Tensor | None = None,
                        v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """tiles: (BLOCK_N, num_warps, num_stages, programs per SM), None: `decode_tiles`' choice; k_scale/v_scale: the
    per-(token, head) scales of an FP8 cache."""
    scale = sm_scale if sm_scale is not None else q.shape[-1] ** -0.5
    batch, hq, d = q.shape
    hkv, page = k_cache.shape[2], k_cache.shape[1]
    block_n, warps, stages, per_sm = tiles or decode_tiles(page, q.device)
    splits = num_splits(batch, hkv, block_tables.shape[1] * page // block_n, _sm_count(q.device), per_sm)
    o_part = torch.empty(batch, hq, splits, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, hq, splits, dtype=torch.float32, device=q.device)
    fp8 = k_scale is not None
    ks, vs = (k_scale, v_scale) if fp8 else (lse, lse)  # unused without FP8
    _paged_decode_split_kernel[(batch, hkv, splits)](
        q, k_cache, v_cache, ks, vs, block_tables, seq_lens, o_part, lse, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), ks.stride(0) if fp8 else 0,
        ks.stride(1) if fp8 else 0, block_tables.stride(0),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1),
        GROUP=hq // hkv, GROUP_PAD=max(16, triton.next_power_of_2(hq // hkv)), HEAD_DIM=d, PAGE=page,
        BLOCK_N=block_n, SPLITS=splits, FP8=fp8, num_warps=warps, num_stages=stages)
    out = torch.empty_like(q)
    _paged_decode_reduce_kernel[(batch, hq)](
        o_part, lse, out, o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1), HEAD_DIM=d, SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits),
        num_warps=4)
    return out


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, sm_scale: float | None = None, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of each sequence's one new query over its cached tokens (an FP8 cache with its scales);
    Triton on CUDA, the reference elsewhere."""
    if use_triton(q):
        return paged_decode_triton(q, k_cache, v_cache, block_tables, seq_lens, sm_scale, k_scale=k_scale,
                                   v_scale=v_scale)
    return paged_decode_ref(q, k_cache, v_cache, block_tables, seq_lens, sm_scale, k_scale, v_scale)
