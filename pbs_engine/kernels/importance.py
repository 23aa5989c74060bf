"""Key importance for the PBS permutation: the mean attention probability each key receives from the last query
block, over the query heads of its KV group, without materialising the (group x rows x N_kv) probabilities.

Two Triton passes per KV head, both over all keys: (1) each query row's softmax normaliser (max and sum of
exponentials, split over key ranges and merged in torch), (2) per key tile, the sum over rows of exp(s - lse).
`key_importance_ref` is the same in plain torch; the engine's CPU path uses it.
"""
from __future__ import annotations

import torch
from pbs_engine.kernels.triton_compat import tl, triton

from pbs_engine.kernels.dispatch import use_triton

LOG2E = 1.4426950408889634


def key_importance_ref(q: torch.Tensor, k: torch.Tensor, block: int, scale: float) -> torch.Tensor:
    """(Hkv, N_kv) float32: mean attention probability from the last `block` queries, pooled over each KV group's
    query heads (causal: query i of those sits at position N_kv - rows + i)."""
    n, hq, d = q.shape
    n_kv, hkv, _ = k.shape
    group = hq // hkv
    last = q[max(0, n - block):]
    rows = last.shape[0]
    future = torch.ones(rows, rows, dtype=torch.bool, device=q.device).triu_(1)  # among the last `rows` keys
    out = torch.empty(hkv, n_kv, dtype=torch.float32, device=q.device)
    for h in range(hkv):  # one KV head at a time bounds the (group x rows x N_kv) score buffer
        ql = (last[:, h * group:(h + 1) * group].transpose(0, 1) * scale).reshape(group * rows, d)
        scores = (ql @ k[:, h].T).view(group, rows, n_kv)
        scores[..., n_kv - rows:].masked_fill_(future, float("-inf"))
        out[h] = torch.softmax(scores, -1).mean((0, 1), dtype=torch.float32)  # probabilities in q's dtype
    return out


@triton.jit
def _row_stats_kernel(Q, K, M, L, n_rows, rows, n_kv, keys_per_split, qk_scale,
                      s_qh, s_qr, s_kt, s_kh, s_mh, s_ms,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Program (KV head g, row tile r, key split s): running max and sum of exp2 of each row's scores (already in
    # log2 units) over keys [s * keys_per_split, (s + 1) * keys_per_split). Row i of the (group x rows) rows is
    # query i % rows of the last block, at position n_kv - rows + i % rows.
    g = tl.program_id(0)
    r = tl.program_id(1)
    s = tl.program_id(2)
    offs_m = r * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + g * s_qh + offs_m[:, None] * s_qr + offs_d[None, :], mask=(offs_m < n_rows)[:, None], other=0.0)
    pos = n_kv - rows + offs_m % rows
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    lo = s * keys_per_split
    hi = tl.minimum(lo + keys_per_split, n_kv)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        k = tl.load(K + cols[:, None] * s_kt + g * s_kh + offs_d[None, :], mask=(cols < hi)[:, None], other=0.0)
        sc = tl.dot(q, tl.trans(k)) * qk_scale
        sc = tl.where((cols[None, :] < hi) & (cols[None, :] <= pos[:, None]), sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_use) + tl.sum(tl.exp2(sc - m_use[:, None]), 1)
        m_i = m_new
    tl.store(M + g * s_mh + s * s_ms + offs_m, m_i, mask=offs_m < n_rows)
    tl.store(L + g * s_mh + s * s_ms + offs_m, l_i, mask=offs_m < n_rows)


@triton.jit
def _column_mass_kernel(Q, K, LSE, OUT, n_rows, rows, n_kv, qk_scale, inv_rows,
                        s_qh, s_qr, s_kt, s_kh, s_lh, s_oh,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Program (KV head g, key tile t): sum over all rows of exp2(score - lse_row), divided by the row count.
    g = tl.program_id(0)
    t = tl.program_id(1)
    cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(K + cols[:, None] * s_kt + g * s_kh + offs_d[None, :], mask=(cols < n_kv)[:, None], other=0.0)
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(0, n_rows, BLOCK_M):
        offs_m = r0 + tl.arange(0, BLOCK_M)
        live = offs_m < n_rows
        q = tl.load(Q + g * s_qh + offs_m[:, None] * s_qr + offs_d[None, :], mask=live[:, None], other=0.0)
        lse = tl.load(LSE + g * s_lh + offs_m, mask=live, other=float("inf"))
        pos = n_kv - rows + offs_m % rows
        sc = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.exp2(sc - lse[:, None])
        p = tl.where(live[:, None] & (cols[None, :] <= pos[:, None]), p, 0.0)
        total += tl.sum(p, 0)
    tl.store(OUT + g * s_oh + cols, total * inv_rows, mask=cols < n_kv)


def key_importance_triton(q: torch.Tensor, k: torch.Tensor, block: int, scale: float) -> torch.Tensor:
    n, hq, d = q.shape
    n_kv, hkv, _ = k.shape
    group = hq // hkv
    last = q[max(0, n - block):]
    rows = last.shape[0]
    # (Hkv, group * rows, D): row i of KV head g is query head g * group + i // rows at last-block row i % rows
    qs = last.reshape(rows, hkv, group, d).permute(1, 2, 0, 3).reshape(hkv, group * rows, d)
    n_rows = group * rows
    on_gpu = q.device.type == "cuda"
    block_m, block_n = (64, 128) if on_gpu else (16, 16)
    warps = 4 if on_gpu else 1
    row_tiles = triton.cdiv(n_rows, block_m)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if on_gpu else 4
    splits = max(1, min(triton.cdiv(n_kv, block_n), triton.cdiv(4 * sms, hkv * row_tiles)))
    keys_per_split = triton.cdiv(triton.cdiv(n_kv, splits), block_n) * block_n
    splits = triton.cdiv(n_kv, keys_per_split)
    qk_scale = scale * LOG2E
    m = torch.empty(hkv, splits, n_rows, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    _row_stats_kernel[(hkv, row_tiles, splits)](
        qs, k, m, l, n_rows, rows, n_kv, keys_per_split, qk_scale,
        qs.stride(0), qs.stride(1), k.stride(0), k.stride(1), m.stride(0), m.stride(1),
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=2 if on_gpu else 1)
    m_all = m.amax(1)
    lse = (m_all + torch.log2((l * torch.exp2(m - m_all[:, None])).sum(1))).contiguous()  # log2 units
    out = torch.empty(hkv, n_kv, dtype=torch.float32, device=q.device)
    _column_mass_kernel[(hkv, triton.cdiv(n_kv, block_n))](
        qs, k, lse, out, n_rows, rows, n_kv, qk_scale, 1.0 / n_rows,
        qs.stride(0), qs.stride(1), k.stride(0), k.stride(1), lse.stride(0), out.stride(0),
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=2 if on_gpu else 1)
    return out


def key_importance(q: torch.Tensor, k: torch.Tensor, block: int, scale: float) -> torch.Tensor:
    """Triton on CUDA, the torch reference elsewhere."""
    if use_triton(q):
        return key_importance_triton(q, k, block, scale)
    return key_importance_ref(q, k, block, scale)
