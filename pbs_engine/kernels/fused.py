"""Element-wise ops of the decoder layer, each one pass over memory: RMSNorm with a fused residual add, and
SiLU-and-mul. Statistics and arithmetic in float32, results in the input dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pbs_engine.kernels.triton_compat import tl, triton

from pbs_engine.kernels.dispatch import use_triton


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """norm(x) * weight, or with a residual: (norm(x + residual) * weight, x + residual), the sum rounded to x's
    dtype before the norm. Statistics in float32."""
    if residual is not None:
        x = (x.float() + residual.float()).to(x.dtype)
        residual = x
    xf = x.float()
    out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    return out if residual is None else (out, residual)


@triton.jit
def _rms_norm_row(X, R, W, R_out, t, eps, n_cols, s_x, s_r, s_ro, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    # Row t as _rms_norm_kernel describes it: (cols, mask, round(r * rsqrt(mean(r^2) + eps)) * W in float32, not
    # yet rounded to the output dtype); shared with fp8.py's quantising kernel.
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + t * s_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(R + t * s_r + cols, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(R_out + t * s_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    w = tl.load(W + cols, mask=mask, other=0.0)
    return cols, mask, (xf * rstd).to(x.dtype).to(tl.float32) * w.to(tl.float32)


@triton.jit
def _rms_norm_kernel(X, R, W, O, R_out, eps, n_cols, s_x, s_r, s_o, s_ro,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    # Program (row t): one row of X (T, H) with contiguous H (and of R, the residual), in one BLOCK >= H. With a
    # residual, r = round(x + res) is written to R_out and normalised; O = round(r * rsqrt(mean(r^2) + eps)) * W.
    t = tl.program_id(0).to(tl.int64)  # row offsets pass 2^31 elements in long prefill chunks
    cols, mask, y = _rms_norm_row(X, R, W, R_out, t, eps, n_cols, s_x, s_r, s_ro, HAS_RESIDUAL, BLOCK)
    tl.store(O + t * s_o + cols, y.to(O.dtype.element_ty), mask=mask)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    shape, h = x.shape, x.shape[-1]
    x2 = x.reshape(-1, h).contiguous()
    r2 = residual.reshape(-1, h).contiguous() if residual is not None else x2
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    r_out = torch.empty_like(x2) if residual is not None else out
    block = triton.next_power_of_2(h)
    _rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, out, r_out, eps, h, x2.stride(0), r2.stride(0), out.stride(0),
                                     r_out.stride(0), HAS_RESIDUAL=residual is not None, BLOCK=block,
                                     num_warps=min(16, max(1, block // 256)))
    return out.view(shape) if residual is None else (out.view(shape), r_out.view(shape))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm of x (..., H), or of x + residual returning (out, x + residual); Triton on CUDA."""
    return (rms_norm_triton if use_triton(x) else rms_norm_ref)(x, weight, eps, residual)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x = cat(gate, up) on the last dim -> silu(gate) * up, computed in float32."""
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


@triton.jit
def _silu_and_mul_tile(X, t, s_x, n_cols, cols, mask):
    # Columns `cols` of row t of X as _silu_and_mul_kernel describes it: silu(gate) * up in float32, not yet
    # rounded; shared with fp8.py's quantising kernel.
    gate = tl.load(X + t * s_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + t * s_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    return gate * tl.sigmoid(gate) * up


@triton.jit
def _silu_and_mul_kernel(X, O, n_cols, s_x, s_o, BLOCK: tl.constexpr):
    # Program (row t, column tile c): X (T, 2I) rows hold gate in [0, I) and up in [I, 2I), contiguous; writes
    # O[t, c-tile] = silu(gate) * up of O (T, I), in float32 then rounded.
    t = tl.program_id(0).to(tl.int64)  # 65536 tokens x 2 x 18944 columns pass 2^31 elements
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    out = _silu_and_mul_tile(X, t, s_x, n_cols, cols, mask)
    tl.store(O + t * s_o + cols, out.to(O.dtype.element_ty), mask=mask)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    shape, inter = x.shape, x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * inter).contiguous()
    out = torch.empty(x2.shape[0], inter, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](x2, out, inter, x2.stride(0), out.stride(0),
                                                                   BLOCK=block, num_warps=4)
    return out.view(*shape[:-1], inter)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = cat(gate, up) on the last dim; Triton on CUDA."""
    return (silu_and_mul_triton if use_triton(x) else silu_and_mul_ref)(x)
