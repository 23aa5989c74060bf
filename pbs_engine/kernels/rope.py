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


def rope_and_cache_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                       cos_sin_cache: torch.Tensor, slot_mapping: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor):
    """apply_rope_ref, then the rotated k and v written into the flat paged caches (num_slots, Hkv, D) at rows
    slot_mapping (T,); returns rotated q, k and v contiguous."""
    q, k = apply_rope_ref(q, k, positions, cos_sin_cache)
    k_cache[slot_mapping] = k.to(k_cache.dtype)
    v_cache[slot_mapping] = v.to(v_cache.dtype)
    return q, k, v.contiguous()


@triton.jit
def _rotate_heads(X, O, C, t, slot, cos, sin, s_xt, s_xh, s_ot, s_oh, s_ct, s_ch, n_heads, HEADS_PAD: tl.constexpr,
                  HALF: tl.constexpr, STORE: tl.constexpr):
    heads = tl.arange(0, HEADS_PAD)[:, None]
    cols = tl.arange(0, HALF)[None, :]
    mask = heads < n_heads
    x_ptr = X + t * s_xt + heads * s_xh + cols
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    y1 = (x1 * cos - x2 * sin).to(O.dtype.element_ty)
    y2 = (x2 * cos + x1 * sin).to(O.dtype.element_ty)
    o_ptr = O + t * s_ot + heads * s_oh + cols
    tl.store(o_ptr, y1, mask=mask)
    tl.store(o_ptr + HALF, y2, mask=mask)
    if STORE:
        c_ptr = C + slot * s_ct + heads * s_ch + cols
        tl.store(c_ptr, y1.to(C.dtype.element_ty), mask=mask)
        tl.store(c_ptr + HALF, y2.to(C.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, QO, KO, POS, CACHE, s_qt, s_qh, s_kt, s_kh, s_qot, s_qoh, s_kot, s_koh, s_c, n_qh, n_kh,
                 V, VO, KC, VC, SLOT, s_vt, s_vh, s_vot, s_voh, s_cs, s_ch,
                 QH_PAD: tl.constexpr, KH_PAD: tl.constexpr, HALF: tl.constexpr, STORE: tl.constexpr):
    # Program (token t): all heads of q (T, Hq, D) and k (T, Hkv, D), D contiguous, rotated by the cos/sin row of
    # POS[t] in CACHE (max_pos, D) = [cos | sin], in float32; dims i and i + HALF form one rotating pair. STORE
    # (the fused KV-cache write): rotated k and v (T, Hkv, D) also go to row SLOT[t] of the flat paged caches KC/VC
    # (num_slots, Hkv, D), one layout, D contiguous, and v to VO (T, Hkv, D); without it V..s_ch are unused.
    t = tl.program_id(0).to(tl.int64)
    row = CACHE + tl.load(POS + t).to(tl.int64) * s_c + tl.arange(0, HALF)[None, :]
    cos = tl.load(row).to(tl.float32)
    sin = tl.load(row + HALF).to(tl.float32)
    slot = tl.load(SLOT + t).to(tl.int64) if STORE else 0
    _rotate_heads(Q, QO, Q, t, slot, cos, sin, s_qt, s_qh, s_qot, s_qoh, 0, 0, n_qh, QH_PAD, HALF, False)
    _rotate_heads(K, KO, KC, t, slot, cos, sin, s_kt, s_kh, s_kot, s_koh, s_cs, s_ch, n_kh, KH_PAD, HALF, STORE)
    if STORE:
        heads = tl.arange(0, KH_PAD)[:, None]
        cols = tl.arange(0, 2 * HALF)[None, :]
        mask = heads < n_kh
        x = tl.load(V + t * s_vt + heads * s_vh + cols, mask=mask)
        tl.store(VO + t * s_vot + heads * s_voh + cols, x, mask=mask)
        tl.store(VC + slot * s_cs + heads * s_ch + cols, x.to(VC.dtype.element_ty), mask=mask)


def _rope_triton(q, k, positions, cos_sin_cache, v=None, slot_mapping=None, k_cache=None, v_cache=None):
    """The one launch behind apply_rope_triton (v None) and rope_and_cache_triton."""
    q, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k))
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    store = v is not None
    if store:
        v = v if v.stride(-1) == 1 else v.contiguous()
        v_out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        store_args = (v, v_out, k_cache, v_cache, slot_mapping, v.stride(0), v.stride(1), v_out.stride(0),
                      v_out.stride(1), k_cache.stride(0), k_cache.stride(1))
    else:
        store_args = (q, q_out, q, q, positions) + (0,) * 6  # placeholders the kernel compiles out
    t, hq, d = q.shape
    hk = k.shape[1]
    if t:
        _rope_kernel[(t,)](q, k, q_out, k_out, positions, cos_sin_cache, q.stride(0), q.stride(1), k.stride(0),
                           k.stride(1), q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
                           cos_sin_cache.stride(0), hq, hk, *store_args, QH_PAD=triton.next_power_of_2(hq),
                           KH_PAD=triton.next_power_of_2(hk), HALF=d // 2, STORE=store, num_warps=4)
    return (q_out, k_out, v_out) if store else (q_out, k_out)


def apply_rope_triton(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor):
    return _rope_triton(q, k, positions, cos_sin_cache)


def rope_and_cache_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                          cos_sin_cache: torch.Tensor, slot_mapping: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor):
    return _rope_triton(q, k, positions, cos_sin_cache, v, slot_mapping, k_cache, v_cache)


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor):
    """Rotate q (T, Hq, D) and k (T, Hkv, D) by positions (T,) with the NEOX layout; Triton on CUDA."""
    return (apply_rope_triton if use_triton(q) else apply_rope_ref)(q, k, positions, cos_sin_cache)


def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                   cos_sin_cache: torch.Tensor, slot_mapping: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor):
    """apply_rope plus the KV-cache write: rotated k and v into the flat caches (num_slots, Hkv, D) at rows
    slot_mapping, and v made contiguous, in one kernel on CUDA (instead of RoPE, a copy and two index_puts: the
    decode step's small launches). Returns q, k, v."""
    return (rope_and_cache_triton if use_triton(q) else rope_and_cache_ref)(q, k, v, positions, cos_sin_cache,
                                                                            slot_mapping, k_cache, v_cache)
