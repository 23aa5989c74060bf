"""Dense causal FlashAttention for variable-length prefill batches, GQA without repeating K/V.

Layouts: q (total_q, Hq, D); k, v (total_k, Hkv, D); cu_seqlens_q/k int32 (B+1,) offsets of each sequence.
Each sequence's queries are the last q_len of its kv_len positions (chunked prefill: q_len <= kv_len).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pbs_engine.kernels.triton_compat import tl, triton

from pbs_engine.kernels.dispatch import use_triton

SDPA_CHUNK = 256  # query rows per masked SDPA call after a cached prefix: each call stops at its own last key


def flash_prefill_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor, causal: bool = True, sm_scale: float | None = None) -> torch.Tensor:
    """Per sequence: softmax(q k^T * scale + causal mask) v in float32, K/V heads repeated for their groups."""
    scale = sm_scale if sm_scale is not None else q.shape[-1] ** -0.5
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for i in range(len(cu_seqlens_q) - 1):
        q0, q1, k0, k1 = (int(x) for x in (cu_seqlens_q[i], cu_seqlens_q[i + 1], cu_seqlens_k[i], cu_seqlens_k[i + 1]))
        qi = q[q0:q1].float().transpose(0, 1)
        ki = k[k0:k1].float().repeat_interleave(group, dim=1).transpose(0, 1)
        vi = v[k0:k1].float().repeat_interleave(group, dim=1).transpose(0, 1)
        scores = qi @ ki.transpose(1, 2) * scale
        if causal:
            q_pos = torch.arange(q1 - q0, device=q.device)[:, None] + (k1 - k0) - (q1 - q0)
            scores = scores.masked_fill(torch.arange(k1 - k0, device=q.device)[None, :] > q_pos, float("-inf"))
        out[q0:q1] = (scores.softmax(-1) @ vi).transpose(0, 1).to(q.dtype)
    return out


def flash_prefill_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                       cu_seqlens_k: torch.Tensor, causal: bool = True, sm_scale: float | None = None) -> torch.Tensor:
    """The CPU serving path: torch's fused SDPA per sequence, GQA without repeating K/V. After a cached prefix
    (q_len < kv_len) the causal mask is bottom-right aligned, so it is built per chunk of SDPA_CHUNK query rows
    whose keys end at the chunk's last position (the masked kernel computes every score it is given)."""
    out = torch.empty_like(q)
    for (q0, q1), (k0, k1) in zip(_pairs(cu_seqlens_q), _pairs(cu_seqlens_k)):
        qi, ki, vi = (x.transpose(0, 1)[None] for x in (q[q0:q1], k[k0:k1], v[k0:k1]))
        prefix = (k1 - k0) - (q1 - q0)
        if not causal or prefix == 0:
            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=causal, scale=sm_scale, enable_gqa=True)
            out[q0:q1] = o[0].transpose(0, 1)
            continue
        for r0 in range(0, q1 - q0, SDPA_CHUNK):
            r1 = min(r0 + SDPA_CHUNK, q1 - q0)
            mask = torch.arange(prefix + r1, device=q.device) <= torch.arange(prefix + r0, prefix + r1,
                                                                              device=q.device)[:, None]
            o = F.scaled_dot_product_attention(qi[:, :, r0:r1], ki[:, :, :prefix + r1], vi[:, :, :prefix + r1],
                                               attn_mask=mask, scale=sm_scale, enable_gqa=True)
            out[q0 + r0:q0 + r1] = o[0].transpose(0, 1)
    return out


def _pairs(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    """cu_seqlens (B+1,) -> [(start, end)] of each sequence, on the host."""
    bounds = cu_seqlens.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


@triton.jit
def online_step(acc, m_i, l_i, q, k, v, offs_k, q_pos, k_len, qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr):
    """One online-softmax step of a query tile against a loaded key/value tile (rows offs_k). MASKED: hide keys
    past k_len (and, if CAUSAL, after each query's position q_pos); else the whole tile is visible. Scores stay
    unscaled until the exponent (one multiply-add per score), and P @ V accumulates into acc."""
    s = tl.dot(q, tl.trans(k))
    if MASKED:
        visible = offs_k[None, :] < k_len
        if CAUSAL:
            visible = visible & (offs_k[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    m_use = m_new
    if MASKED:  # a row with nothing visible yet keeps m = -inf; exponentiate against 0 instead
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s * qk_scale - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def kv_tile(K, V, k_start, start, kvh, offs_n, offs_d, k_len, s_kt, s_kh, s_vt, s_vh, HEAD_DIM: tl.constexpr,
            MASKED: tl.constexpr, TMA: tl.constexpr):
    """Rows [start, start + BLOCK_N) of a sequence's keys and values (KV head kvh): through TMA descriptors over
    (tokens, heads x D), or through pointers, loading only rows below k_len when MASKED (a TMA tile may carry the
    next sequence's rows there; the MASKED scores hide them)."""
    if TMA:
        k = K.load([k_start + start, kvh * HEAD_DIM])
        v = V.load([k_start + start, kvh * HEAD_DIM])
    else:
        rows = (k_start + start + offs_n)[:, None]
        if MASKED:
            live = ((start + offs_n) < k_len)[:, None]
            k = tl.load(K + rows * s_kt + kvh * s_kh + offs_d[None, :], mask=live, other=0.0)
            v = tl.load(V + rows * s_vt + kvh * s_vh + offs_d[None, :], mask=live, other=0.0)
        else:
            k = tl.load(K + rows * s_kt + kvh * s_kh + offs_d[None, :])
            v = tl.load(V + rows * s_vt + kvh * s_vh + offs_d[None, :])
    return k, v


@triton.jit
def _flash_prefill_kernel(Q, K, V, O, cu_q, cu_k, sm_scale,
                          s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_ot, s_oh,
                          GROUP: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr):
    # Program (query head h, query block m counted from the END so the longest causal rows start first, sequence
    # b): online softmax over the key tiles m may see, read from KV head h // GROUP. Rows of Q/K/V/O are
    # (token, head) slices with D contiguous. Tiles wholly before the diagonal run unmasked; the rest are masked by
    # key length and causality (query i sits at position kv_len - q_len + i). TMA: Q/K/V are 2-D descriptors over
    # (tokens, heads x D) read by the Hopper tensor-memory accelerator; query rows past the sequence are loaded but
    # not stored.
    h = tl.program_id(0)
    b = tl.program_id(2)
    q_start = tl.load(cu_q + b)
    q_len = tl.load(cu_q + b + 1) - q_start
    k_start = tl.load(cu_k + b)
    k_len = tl.load(cu_k + b + 1) - k_start
    m = tl.cdiv(q_len, BLOCK_M) - 1 - tl.program_id(1)
    if m < 0:
        return
    kvh = h // GROUP
    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if TMA:
        q = Q.load([q_start + m * BLOCK_M, h * HEAD_DIM])
    else:
        q = tl.load(Q + (q_start + offs_m)[:, None] * s_qt + h * s_qh + offs_d[None, :],
                    mask=(offs_m < q_len)[:, None], other=0.0)
    q_pos = offs_m + (k_len - q_len)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    if CAUSAL:
        hi = tl.minimum(k_len, (m + 1) * BLOCK_M + k_len - q_len)
        full = (m * BLOCK_M + k_len - q_len) // BLOCK_N * BLOCK_N
    else:
        hi = k_len
        full = k_len // BLOCK_N * BLOCK_N
    for start in range(0, full, BLOCK_N):
        k, v = kv_tile(K, V, k_start, start, kvh, offs_n, offs_d, k_len, s_kt, s_kh, s_vt, s_vh, HEAD_DIM,
                       MASKED=False, TMA=TMA)
        acc, m_i, l_i = online_step(acc, m_i, l_i, q, k, v, start + offs_n, q_pos, k_len, qk_scale,
                                    MASKED=False, CAUSAL=CAUSAL)
    for start in range(full, hi, BLOCK_N):
        k, v = kv_tile(K, V, k_start, start, kvh, offs_n, offs_d, k_len, s_kt, s_kh, s_vt, s_vh, HEAD_DIM,
                       MASKED=True, TMA=TMA)
        acc, m_i, l_i = online_step(acc, m_i, l_i, q, k, v, start + offs_n, q_pos, k_len, qk_scale,
                                    MASKED=True, CAUSAL=CAUSAL)
    acc = acc / tl.where(l_i == 0, 1.0, l_i)[:, None]
    tl.store(O + (q_start + offs_m)[:, None] * s_ot + h * s_oh + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=(offs_m < q_len)[:, None])


def _tma_descriptors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int, block_n: int):
    """2-D (tokens, heads x D) TMA descriptors of q/k/v, or None where the layout cannot use them (the kernel
    then reads through pointers). Hopper and newer in the engine; the interpreter runs them on CPU in tests."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    descs = []
    for x, rows in ((q, block_m), (k, block_n), (v, block_n)):
        if x.stride(2) != 1 or x.stride(1) != x.shape[2] or (x.stride(0) * x.element_size()) % 16 \
                or x.data_ptr() % 16:
            return None
        descs.append(TensorDescriptor(x, [x.shape[0], x.shape[1] * x.shape[2]], [x.stride(0), 1],
                                      [rows, x.shape[2]]))
    return descs


def prefill_tiles(head_dim: int, device: torch.device, num_keys: int = 0, dtype_bytes: int = 2, tma: bool = False
                  ) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the dense kernel. H100, 28/4 heads, d=128, TFLOP/s at 32K /
    128K (`pbs-engine bench tiles`, cuDNN SDPA 612 / 564 in the same run): TMA 128/128/8/3 575 / 568, TMA
    128/64/8/3 531 / 520; pointers 128/64/8/3 508 / 495, 128/128/8/3 511 / 497, 128/64/8/4 494 / 495."""
    if device.type != "cuda":
        return 16, 16, 4, 1
    if dtype_bytes > 2:  # float32 tiles take twice the shared memory
        return 64, 64, 4, 2
    if head_dim <= 64 or tma:
        return 128, 128, 8, 3
    return 128, 64, 8, 4 if num_keys >= 65536 else 3


def flash_prefill_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, causal: bool = True, sm_scale: float | None = None,
                         max_seqlen_q: int | None = None, tma: bool | None = None,
                         tiles: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """tma: K/V tiles through TMA descriptors (None: on Hopper and newer); tiles: (BLOCK_M, BLOCK_N, num_warps,
    num_stages), None: `prefill_tiles`' choice for the shape (benchmarks sweep others)."""
    scale = sm_scale if sm_scale is not None else q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    batch = cu_seqlens_q.numel() - 1
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    if tma is None:
        tma = q.is_cuda and torch.cuda.get_device_capability(q.device)[0] >= 9
    block_m, block_n, warps, stages = tiles or prefill_tiles(q.shape[-1], q.device, k.shape[0], q.element_size(), tma)
    grid = (q.shape[1], triton.cdiv(max_seqlen_q, block_m), batch)
    descs = _tma_descriptors(q, k, v, block_m, block_n) if tma else None
    _flash_prefill_kernel[grid](
        *(descs or (q, k, v)), out, cu_seqlens_q, cu_seqlens_k, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        GROUP=q.shape[1] // k.shape[1], CAUSAL=causal, HEAD_DIM=q.shape[-1], BLOCK_M=block_m, BLOCK_N=block_n,
        TMA=descs is not None, num_warps=warps, num_stages=stages)
    return out


def flash_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                  cu_seqlens_k: torch.Tensor, causal: bool = True, sm_scale: float | None = None,
                  max_seqlen_q: int | None = None) -> torch.Tensor:
    """Causal (or full) attention of each sequence's queries over its keys; Triton on CUDA, torch's SDPA elsewhere.
    max_seqlen_q: the longest query length, known on the host (None: read from cu_seqlens_q, a host sync)."""
    if use_triton(q):
        return flash_prefill_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, sm_scale, max_seqlen_q)
    return flash_prefill_sdpa(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, sm_scale)
