"""Decode attention over the paged KV cache: one query token per sequence, split-K (flash-decoding).

Layouts: q (B, Hq, D); k_cache, v_cache (num_blocks, PAGE, Hkv, D); block_tables int32 (B, max_pages);
seq_lens int32 (B,) cached tokens per sequence, the current one included.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pbs_engine.kernels.dispatch import use_triton


def paged_decode_ref(q, k_cache, v_cache, block_tables, seq_lens, sm_scale=None):
    """Per sequence: gather its pages, repeat K/V heads for their groups, softmax(q k^T * scale) v in float32."""
    scale = sm_scale if sm_scale is not None else q.shape[-1] ** -0.5
    page, group = k_cache.shape[1], q.shape[1] // k_cache.shape[2]
    out = torch.empty_like(q)
    for i in range(q.shape[0]):
        n = int(seq_lens[i])
        blocks = block_tables[i, : (n + page - 1) // page].long()
        k = k_cache[blocks].flatten(0, 1)[:n].float().repeat_interleave(group, dim=1)  # (n, Hq, D)
        v = v_cache[blocks].flatten(0, 1)[:n].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[i].float(), k) * scale
        out[i] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v).to(q.dtype)
    return out


@triton.jit
def _paged_decode_kernel(Q, KC, VC, tables, lens, O_part, LSE_part, sm_scale,
                         s_qb, s_qh, s_kb, s_kp, s_kh, s_vb, s_vp, s_vh, s_tb, s_ob, s_oh, s_os, s_lb, s_lh,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                         SPLITS: tl.constexpr):
    # Program (sequence b, KV head g, split s): the query heads of group g against pages of split s, each K/V
    # page loaded once for the whole group; writes the partial output and its log-sum-exp for the reduction.
    b = tl.program_id(0)
    g = tl.program_id(1)
    split = tl.program_id(2)
    n = tl.load(lens + b)
    num_pages = tl.cdiv(n, PAGE)
    per_split = tl.cdiv(num_pages, SPLITS)
    p_lo = split * per_split
    p_hi = tl.minimum(p_lo + per_split, num_pages)
    offs_h = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_p = tl.arange(0, PAGE)
    heads = g * GROUP + offs_h
    hmask = offs_h < GROUP
    q = tl.load(Q + b * s_qb + heads[:, None] * s_qh + offs_d[None, :], mask=hmask[:, None], other=0.0)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    for p in range(p_lo, p_hi):
        block = tl.load(tables + b * s_tb + p).to(tl.int64)
        tok = p * PAGE + offs_p
        k = tl.load(KC + block * s_kb + offs_p[:, None] * s_kp + g * s_kh + offs_d[None, :])
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(tok[None, :] < n, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        pr = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(pr, 1)
        v = tl.load(VC + block * s_vb + offs_p[:, None] * s_vp + g * s_vh + offs_d[None, :])
        acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v)
        m_i = m_new
    out = acc / tl.where(l_i == 0, 1.0, l_i)[:, None]
    lse = tl.where(l_i == 0, float("-inf"), m_i + tl.log2(l_i))
    tl.store(O_part + b * s_ob + heads[:, None] * s_oh + split * s_os + offs_d[None, :], out, mask=hmask[:, None])
    tl.store(LSE_part + b * s_lb + heads * s_lh + split, lse, mask=hmask)


def num_splits(batch: int, kv_heads: int, max_pages: int, sms: int = 132) -> int:
    """Enough splits that batch x heads x splits fills the GPU twice over; depends only on static sizes, so the
    same launch is valid inside a CUDA graph for any sequence lengths."""
    want = max(1, (2 * sms) // max(1, batch * kv_heads))
    return max(1, min(want, max_pages, 128))


def paged_decode_triton(q, k_cache, v_cache, block_tables, seq_lens, sm_scale=None):
    scale = sm_scale if sm_scale is not None else q.shape[-1] ** -0.5
    batch, hq, d = q.shape
    hkv, page = k_cache.shape[2], k_cache.shape[1]
    group = hq // hkv
    splits = num_splits(batch, hkv, block_tables.shape[1])
    o_part = torch.empty(batch, hq, splits, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, hq, splits, dtype=torch.float32, device=q.device)
    _paged_decode_kernel[(batch, hkv, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, o_part, lse, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=d, PAGE=page, SPLITS=splits,
        num_warps=4, num_stages=2)
    weights = torch.softmax(lse * 0.6931471805599453, dim=-1).nan_to_num_(0.0)  # lse is base 2
    return (o_part * weights[..., None]).sum(2).to(q.dtype)


def paged_decode(q, k_cache, v_cache, block_tables, seq_lens, sm_scale=None):
    if use_triton(q):
        return paged_decode_triton(q, k_cache, v_cache, block_tables, seq_lens, sm_scale)
    return paged_decode_ref(q, k_cache, v_cache, block_tables, seq_lens, sm_scale)
