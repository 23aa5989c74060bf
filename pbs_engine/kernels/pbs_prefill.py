"""PBS-Attn prefill: select blocks (pbs_select.py), then FlashAttention over only the kept key blocks of the
permuted K/V, the causal mask applied through the keys' original positions.

Layouts: q (N, Hq, D); k, v (N_kv, Hkv, D), N_kv >= N, the first N_kv - N keys a fully visible cached prefix.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pbs_engine.kernels.config import PBSConfig
from pbs_engine.kernels.dispatch import use_triton
from pbs_engine.kernels.pbs_select import PBSSelection, PBSStats, pbs_select


def pbs_attention_ref(q: torch.Tensor, sel: PBSSelection, cfg: PBSConfig, scale: float) -> torch.Tensor:
    """Masked dense attention in float32: query i sees permuted key slot j when j's block is kept for i's block
    and the key's original position is <= i's position."""
    n, hq, d = q.shape
    hkv, npad, _ = sel.keys.shape
    group, bs = hq // hkv, cfg.block_size
    q_pos = torch.arange(n, device=q.device) + sel.q_offset
    out = torch.empty_like(q)
    for h in range(hq):
        g = h // group
        keep = torch.zeros(-(-n // bs), npad // bs, dtype=torch.bool, device=q.device)
        for m in range(keep.shape[0]):
            keep[m, sel.block_idx[h, m, : sel.block_count[h, m]].long()] = True
        allowed = keep.repeat_interleave(bs, 0)[:n].repeat_interleave(bs, 1)
        allowed &= sel.key_pos[g][None, :] <= q_pos[:, None]
        scores = (q[:, h].float() @ sel.keys[g].float().T) * scale
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
        out[:, h] = (probs @ sel.values[g].float()).to(q.dtype)
    return out


@triton.jit
def _pbs_attention_kernel(Q, K, V, POS, IDX, CNT, O, sm_scale, n_q, q_offset,
                          s_qt, s_qh, s_kh, s_kt, s_vh, s_vt, s_ph, s_ih, s_im, s_ch, s_ot, s_oh,
                          GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    # Program (query block m, query head h): online softmax over the CNT[h, m] key blocks listed in IDX[h, m],
    # read from the permuted K/V of KV head h // GROUP; key j visible to query i iff POS[j] <= position(i).
    m = tl.program_id(0)
    h = tl.program_id(1)
    g = h // GROUP
    offs_m = m * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + offs_m[:, None] * s_qt + h * s_qh + offs_d[None, :], mask=(offs_m < n_q)[:, None], other=0.0)
    q_pos = offs_m + q_offset
    acc = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    count = tl.load(CNT + h * s_ch + m)
    for c in range(count):
        j = tl.load(IDX + h * s_ih + m * s_im + c).to(tl.int64)
        rows = j * BLOCK + offs_n
        k = tl.load(K + g * s_kh + rows[:, None] * s_kt + offs_d[None, :])
        pos = tl.load(POS + g * s_ph + rows)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(pos[None, :] <= q_pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + g * s_vh + rows[:, None] * s_vt + offs_d[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / tl.where(l_i == 0, 1.0, l_i)[:, None]
    tl.store(O + offs_m[:, None] * s_ot + h * s_oh + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=(offs_m < n_q)[:, None])


def pbs_attention_triton(q: torch.Tensor, sel: PBSSelection, cfg: PBSConfig, scale: float) -> torch.Tensor:
    n, hq, d = q.shape
    out = torch.empty_like(q)
    keys, values = sel.keys, sel.values
    warps = 8 if q.is_cuda and cfg.block_size >= 128 else 4
    _pbs_attention_kernel[(sel.block_count.shape[1], hq)](
        q, keys, values, sel.key_pos, sel.block_idx, sel.block_count, out, scale, n, sel.q_offset,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        sel.key_pos.stride(0), sel.block_idx.stride(0), sel.block_idx.stride(1), sel.block_count.stride(0),
        out.stride(0), out.stride(1),
        GROUP=hq // keys.shape[0], HEAD_DIM=d, BLOCK=cfg.block_size, num_warps=warps,
        num_stages=2 if q.is_cuda else 1)
    return out


def _run(q, k, v, config: PBSConfig, sm_scale, attend) -> tuple[torch.Tensor, PBSStats]:
    scale = sm_scale if sm_scale is not None else q.shape[-1] ** -0.5
    sel = pbs_select(q, k, v, config, scale)
    return attend(q, sel, config, scale), PBSStats(kept=sel.kept, visible=sel.visible)


def pbs_prefill_ref(q, k, v, config: PBSConfig, sm_scale=None) -> tuple[torch.Tensor, PBSStats]:
    return _run(q, k, v, config, sm_scale, pbs_attention_ref)


def pbs_prefill(q, k, v, config: PBSConfig, sm_scale=None) -> tuple[torch.Tensor, PBSStats]:
    """Approximate causal attention of q over k/v keeping only the selected blocks; returns (output, stats)."""
    return _run(q, k, v, config, sm_scale, pbs_attention_triton if use_triton(q) else pbs_attention_ref)
