"""Rotary position embedding, NEOX layout (dimension i rotates with i + D/2), with Llama-3.1's frequency scaling
folded into the inverse frequencies that build the cos/sin cache."""
from __future__ import annotations

import math

import torch
from pbs_engine.kernels.triton_compat import tl, triton

from pbs_engine.kernels.dispatch import use_triton


def rope_inv_freq(head_dim: int, theta: float, rope_scaling: dict | None = None) -> torch.Tensor:
    """Rotary inverse frequencies (float64); rope_scaling of rope_type "llama3" rescales them as HF's
    `_compute_llama3_parameters` does: long wavelengths / factor, short ones kept, a smooth blend between."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if not rope_scaling:
        return inv_freq
    factor, low, high = rope_scaling["factor"], rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
    original = rope_scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    middle = (wavelen <= original / low) & (wavelen >= original / high)
    return torch.where(middle, blended, scaled)


def build_cos_sin_cache(inv_freq: torch.Tensor, max_position: int) -> torch.Tensor:
    """(max_position, head_dim): cos of position x frequency in the first half, sin in the second."""
    angles = torch.outer(torch.arange(max_position, dtype=inv_freq.dtype), inv_freq)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def apply_rope_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor):
    """Rotate q (T, Hq, D) and k (T, Hkv, D) by their positions in float32; returns new tensors in their dtypes."""
    cos, sin = cos_sin_cache[positions].float().unsqueeze(1).chunk(2, dim=-1)

    def rotate(x):
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


@triton.jit
def _rotate_heads(X, O, t, cos, sin, s_xt, s_xh, s_ot, s_oh, n_heads, HEADS_PAD: tl.constexpr, HALF: tl.constexpr):
    heads = tl.arange(0, HEADS_PAD)[:, None]
    cols = tl.arange(0, HALF)[None, :]
    mask = heads < n_heads
    x_ptr = X + t * s_xt + heads * s_xh + cols
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    o_ptr = O + t * s_ot + heads * s_oh + cols
    tl.store(o_ptr, (x1 * cos - x2 * sin).to(O.dtype.element_ty), mask=mask)
    tl.store(o_ptr + HALF, (x2 * cos + x1 * sin).to(O.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, QO, KO, POS, CACHE, s_qt, s_qh, s_kt, s_kh, s_qot, s_qoh, s_kot, s_koh, s_c, n_qh, n_kh,
                 QH_PAD: tl.constexpr, KH_PAD: tl.constexpr, HALF: tl.constexpr):
    # Program (token t): all heads of q (T, Hq, D) and k (T, Hkv, D), D contiguous, rotated by the cos/sin row of
    # POS[t] in CACHE (max_pos, D) = [cos | sin], in float32; dims i and i + HALF form one rotating pair.
    t = tl.program_id(0).to(tl.int64)
    row = CACHE + tl.load(POS + t).to(tl.int64) * s_c + tl.arange(0, HALF)[None, :]
    cos = tl.load(row).to(tl.float32)
    sin = tl.load(row + HALF).to(tl.float32)
    _rotate_heads(Q, QO, t, cos, sin, s_qt, s_qh, s_qot, s_qoh, n_qh, QH_PAD, HALF)
    _rotate_heads(K, KO, t, cos, sin, s_kt, s_kh, s_kot, s_koh, n_kh, KH_PAD, HALF)


def apply_rope_triton(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor):
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    t, hq, d = q.shape
    hk = k.shape[1]
    if t:
        _rope_kernel[(t,)](q, k, q_out, k_out, positions, cos_sin_cache, q.stride(0), q.stride(1), k.stride(0),
                           k.stride(1), q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
                           cos_sin_cache.stride(0), hq, hk, QH_PAD=triton.next_power_of_2(hq),
                           KH_PAD=triton.next_power_of_2(hk), HALF=d // 2, num_warps=4)
    return q_out, k_out


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor):
    """Rotate q (T, Hq, D) and k (T, Hkv, D) by positions (T,) with the NEOX layout; Triton on CUDA."""
    return (apply_rope_triton if use_triton(q) else apply_rope_ref)(q, k, positions, cos_sin_cache)
