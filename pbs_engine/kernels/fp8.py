"""FP8 linear layers (e4m3, W8A8): weights quantised once with one scale per output channel, activations per token
inside the kernels that produce them (RMSNorm, SiLU-and-mul) so quantising costs no extra pass over memory, and the
GEMM through torch._scaled_mm with row-wise scales. A scale is float32 and value = fp8 * scale; scale = amax / 448."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from pbs_engine.kernels.dispatch import use_triton
from pbs_engine.kernels.skinny import SKINNY_ROWS, skinny_linear
from pbs_engine.kernels.fused import _rms_norm_row, _silu_and_mul_tile, rms_norm_ref, silu_and_mul_ref
from pbs_engine.kernels.triton_compat import tl, triton

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
MIN_AMAX = 1e-12  # the amax of an all-zero row is taken as this: a finite scale, and the row quantises to zeros
ROW_TILE = 2048  # columns per step of the two-pass row kernels (rows of 18944 in the 7B MLP do not fit registers)
FEW_ROWS = 64  # fewer rows than this (decode) are split over one program per column tile, in two launches, rather
# than walked by one program each: a decode step would otherwise wait on ~20 serial tiles (a first guess, unmeasured)
GEMM_MIN_ROWS = 16  # fp8_linear pads fewer rows (decode) with zero rows to this many before torch._scaled_mm
FP8_UNSUPPORTED = ("quantization='fp8' (--quantization fp8) needs an NVIDIA GPU of compute capability 8.9 or newer "
                   "(Ada, Hopper, Blackwell) and a torch build with float8_e4m3fn and torch._scaled_mm; on a CPU the "
                   "dequantising reference path runs instead")


def supports_fp8(device: torch.device | str) -> bool:
    """Whether fp8_linear runs torch._scaled_mm on `device` (an NVIDIA GPU of compute capability >= 8.9); False on
    CPU, where fp8_linear runs its reference."""
    device = torch.device(device)
    return (device.type == "cuda" and torch.cuda.is_available() and torch.version.hip is None
            and hasattr(torch, "float8_e4m3fn") and hasattr(torch, "_scaled_mm")
            and torch.cuda.get_device_capability(device) >= (8, 9))


def quantize_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> (e4m3 (..., K), float32 scale (..., 1)): each row scaled by amax(|row|) / 448 and rounded to
    the nearest e4m3 value (ties to even)."""
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True).clamp(min=MIN_AMAX) / FP8_MAX
    return (xf * (1.0 / scale)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear layer's weight (N, K) -> (e4m3 (N, K), float32 scale (N,)), one scale per output channel: run once
    at load time, in torch (the reference is the specification)."""
    w_fp8, scale = quantize_per_token_ref(w)
    return w_fp8, scale.view(-1)


@triton.jit
def _to_e4m3(v, inv_scale, FP8_MAX: tl.constexpr):
    # v * inv_scale saturated to +-448 and rounded to the nearest e4m3 value (ties to even), still float32, so the
    # store's cast is exact. The GPU's conversion rounds that way itself; the interpreter's rounds ties up and drops
    # the carry into the exponent (triton 3.9), hence the explicit rounding: 3 mantissa bits by integer rounding of
    # the float32 bits for normal values (>= 2^-6), multiples of 2^-9 by adding and removing 2^14 below that.
    v = tl.minimum(tl.maximum(v * inv_scale, -FP8_MAX), FP8_MAX)
    a = tl.abs(v)
    bits = a.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
    r = tl.where(a >= 0.015625, normal, (a + 16384.0) - 16384.0)
    sign = v.to(tl.int32, bitcast=True) & -0x80000000
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _row_scale(amax, FP8_MAX: tl.constexpr, MIN_AMAX: tl.constexpr):
    # (scale, 1 / scale) of a row from its amax, divided with IEEE rounding as torch divides.
    scale = tl.math.div_rn(tl.maximum(amax, MIN_AMAX), FP8_MAX)
    return scale, tl.math.div_rn(1.0, scale)


@triton.jit
def _rms_norm_quant_kernel(X, R, W, Q, S, R_out, eps, n_cols, s_x, s_r, s_q, s_ro, HAS_RESIDUAL: tl.constexpr,
                           Y_DTYPE: tl.constexpr, BLOCK: tl.constexpr, FP8_MAX: tl.constexpr,
                           MIN_AMAX: tl.constexpr):
    # Program (row t): rms_norm's row y = round(norm(x [+ res]) * W) of X (T, H) (and R, the residual; the sum goes
    # to R_out) with contiguous H, the whole row in one BLOCK >= H, rounded to Y_DTYPE (what rms_norm returns),
    # then quantised in registers: S[t] = max|y| / 448 of S (T, 1) float32, Q[t] = e4m3(y / S[t]) of Q (T, H).
    t = tl.program_id(0).to(tl.int64)  # row offsets pass 2^31 elements in long prefill chunks
    cols, mask, y = _rms_norm_row(X, R, W, R_out, t, eps, n_cols, s_x, s_r, s_ro, HAS_RESIDUAL, BLOCK)
    y = y.to(Y_DTYPE).to(tl.float32)
    scale, inv_scale = _row_scale(tl.max(tl.abs(y), 0), FP8_MAX, MIN_AMAX)
    tl.store(S + t, scale)
    tl.store(Q + t * s_q + cols, _to_e4m3(y, inv_scale, FP8_MAX).to(Q.dtype.element_ty), mask=mask)


@triton.jit
def _row_values(X, t, s_x, n_cols, cols, mask, SILU_MUL: tl.constexpr):
    # Columns `cols` of row t's values, float32: X itself, or with SILU_MUL silu_and_mul's output rounded to X's dtype.
    if SILU_MUL:
        v = _silu_and_mul_tile(X, t, s_x, n_cols, cols, mask).to(X.dtype.element_ty).to(tl.float32)
    else:
        v = tl.load(X + t * s_x + cols, mask=mask, other=0.0).to(tl.float32)
    return v


@triton.jit
def _quantize_rows_kernel(X, Q, S, n_cols, s_x, s_q, SILU_MUL: tl.constexpr, BLOCK: tl.constexpr,
                          FP8_MAX: tl.constexpr, MIN_AMAX: tl.constexpr):
    # Program (row t): the row's K = n_cols values v, from X (T, K) with contiguous K, or with SILU_MUL from X (T, 2K)
    # = [gate | up] as v = round(silu(gate) * up) (silu_and_mul), walked in column tiles of BLOCK twice: pass 1
    # takes max|v|, pass 2 recomputes v (the row is re-read, from L2 mostly) and stores Q[t] = e4m3(v / S[t]) of
    # Q (T, K); S (T, 1) float32 = max|v| / 448.
    t = tl.program_id(0).to(tl.int64)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        amax = tl.maximum(amax, tl.abs(_row_values(X, t, s_x, n_cols, cols, mask, SILU_MUL)))
    scale, inv_scale = _row_scale(tl.max(amax, 0), FP8_MAX, MIN_AMAX)
    tl.store(S + t, scale)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        v = _row_values(X, t, s_x, n_cols, cols, mask, SILU_MUL)
        tl.store(Q + t * s_q + cols, _to_e4m3(v, inv_scale, FP8_MAX).to(Q.dtype.element_ty), mask=mask)


@triton.jit
def _quantize_tiles_kernel(X, Q, S, AMAX, n_cols, s_x, s_q, PASS: tl.constexpr, SILU_MUL: tl.constexpr,
                           BLOCK: tl.constexpr, FP8_MAX: tl.constexpr, MIN_AMAX: tl.constexpr):
    # Program (row t, column tile c), _quantize_rows_kernel's values split for few rows, launched twice: PASS 1
    # folds the tile's max|v| into AMAX[t] (AMAX (T,) float32, zeroed) by an atomic max; PASS 2 recomputes v and
    # stores Q[t, c-tile] = e4m3(v / S[t]), tile 0 also S[t] = AMAX[t] / 448.
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    v = _row_values(X, t, s_x, n_cols, cols, mask, SILU_MUL)
    if PASS == 1:
        tl.atomic_max(AMAX + t, tl.max(tl.abs(v), 0))
    else:
        scale, inv_scale = _row_scale(tl.load(AMAX + t), FP8_MAX, MIN_AMAX)
        if tl.program_id(1) == 0:
            tl.store(S + t, scale)
        tl.store(Q + t * s_q + cols, _to_e4m3(v, inv_scale, FP8_MAX).to(Q.dtype.element_ty), mask=mask)


def _quantized(rows: int, cols: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(rows, cols, dtype=FP8_DTYPE, device=device),
            torch.empty(rows, 1, dtype=torch.float32, device=device))


def _quantize_rows_triton(x: torch.Tensor, n_cols: int, silu_mul: bool) -> tuple[torch.Tensor, torch.Tensor]:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    rows = x2.shape[0]
    q, scale = _quantized(rows, n_cols, x.device)
    block = min(ROW_TILE, triton.next_power_of_2(n_cols))
    tiles = triton.cdiv(n_cols, block)
    meta = dict(SILU_MUL=silu_mul, BLOCK=block, FP8_MAX=FP8_MAX, MIN_AMAX=MIN_AMAX,
                num_warps=min(8, max(1, block // 256)))
    if rows < FEW_ROWS and tiles > 1:
        amax = torch.zeros(rows, dtype=torch.float32, device=x.device)
        for step in (1, 2):
            _quantize_tiles_kernel[(rows, tiles)](x2, q, scale, amax, n_cols, x2.stride(0), q.stride(0), PASS=step,
                                                  **meta)
    else:
        _quantize_rows_kernel[(rows,)](x2, q, scale, n_cols, x2.stride(0), q.stride(0), **meta)
    return q.view(*shape[:-1], n_cols), scale.view(*shape[:-1], 1)


def quantize_per_token_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _quantize_rows_triton(x, x.shape[-1], silu_mul=False)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> (e4m3 (..., K), float32 scale (..., 1)), one scale per row: for activations no fused op
    produces (the attention output before o_proj); Triton on CUDA."""
    return (quantize_per_token_triton if use_triton(x) else quantize_per_token_ref)(x)


def silu_and_mul_quant_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """silu_and_mul(x) (rounded to x's dtype, as the unquantised path returns it), quantised per row."""
    return quantize_per_token_ref(silu_and_mul_ref(x))


def silu_and_mul_quant_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _quantize_rows_triton(x, x.shape[-1] // 2, silu_mul=True)


def silu_and_mul_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x = cat(gate, up) (..., 2I) -> (e4m3 silu(gate) * up (..., I), float32 scale (..., 1)) in one kernel on
    CUDA: the bf16 activation never reaches memory."""
    return (silu_and_mul_quant_triton if use_triton(x) else silu_and_mul_quant_ref)(x)


def rms_norm_quant_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """rms_norm(x, weight, eps[, residual]) quantised per row: (q, scale) or (q, scale, x + residual)."""
    out = rms_norm_ref(x, weight, eps, residual)
    if residual is None:
        return quantize_per_token_ref(out)
    return (*quantize_per_token_ref(out[0]), out[1])


def rms_norm_quant_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    shape, h = x.shape, x.shape[-1]
    x2 = x.reshape(-1, h).contiguous()
    r2 = residual.reshape(-1, h).contiguous() if residual is not None else x2
    q, scale = _quantized(x2.shape[0], h, x.device)
    r_out = torch.empty_like(x2) if residual is not None else x2
    y_dtype = getattr(tl, str(torch.promote_types(x.dtype, weight.dtype)).removeprefix("torch."))
    block = triton.next_power_of_2(h)
    _rms_norm_quant_kernel[(x2.shape[0],)](x2, r2, weight, q, scale, r_out, eps, h, x2.stride(0), r2.stride(0),
                                           q.stride(0), r_out.stride(0), HAS_RESIDUAL=residual is not None,
                                           Y_DTYPE=y_dtype, BLOCK=block, FP8_MAX=FP8_MAX, MIN_AMAX=MIN_AMAX,
                                           num_warps=min(16, max(1, block // 256)))
    q, scale = q.view(shape), scale.view(*shape[:-1], 1)
    return (q, scale) if residual is None else (q, scale, r_out.view(shape))


def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm of x (..., H) (or of x + residual) quantised per row in the same kernel on CUDA: (e4m3 (..., H),
    float32 scale (..., 1)), or with a residual (q, scale, x + residual); the quantised values are those of
    rms_norm's output."""
    return (rms_norm_quant_triton if use_triton(x) else rms_norm_quant_ref)(x, weight, eps, residual)


def fp8_linear_ref(x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
                   bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(x_fp8 * x_scale) @ (w_fp8 * w_scale)^T (+ bias) in float32, cast to out_dtype: x_fp8 (T, K) with x_scale
    (T, 1), w_fp8 (N, K) with w_scale (N,) -> (T, N)."""
    out = (x_fp8.float() * x_scale) @ (w_fp8.float() * w_scale[:, None]).t()
    return (out if bias is None else out + bias.float()).to(out_dtype)


def fp8_linear_scaled_mm(x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
                         bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """fp8_linear through torch._scaled_mm with row-wise scales (x row-major, w_fp8.t() column-major as it needs;
    K and N multiples of 16 on CUDA). Fewer than GEMM_MIN_ROWS rows are padded with zero rows; the bias is fused
    where torch allows it (its dtype must be out_dtype's, and not with a float32 output)."""
    rows = x_fp8.shape[0]
    if rows < GEMM_MIN_ROWS:
        pad = (0, 0, 0, GEMM_MIN_ROWS - rows)
        x_fp8 = F.pad(x_fp8.view(torch.uint8), pad).view(FP8_DTYPE)  # via uint8: padding any dtype, 0x00 = +0.0
        x_scale = F.pad(x_scale, pad, value=1.0)
    fused_bias = bias is not None and out_dtype != torch.float32
    out = torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=x_scale, scale_b=w_scale.view(1, -1),
                           bias=bias.to(out_dtype) if fused_bias else None, out_dtype=out_dtype)[:rows]
    return out if bias is None or fused_bias else out + bias.to(out_dtype)




def fp8_linear_skinny(x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
                      bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """fp8_linear for at most SKINNY_ROWS rows (a decode step, bound by reading the weight: half the bytes of
    bf16) through kernels.skinny's split-K kernel."""
    return skinny_linear(x_fp8, w_fp8, bias, x_scale=x_scale, w_scale=w_scale, out_dtype=out_dtype)


# decode steps of FP8 layers: "bf16" (W8A16: bf16 rows against the e4m3 weight, widened in the skinny kernel) or
# "fp8" (W8A8 as in prefill: rows quantised per token by their producers, fp8 products on the tensor cores)
DECODE_ACTIVATIONS = os.environ.get("PBS_ENGINE_FP8_DECODE", "bf16")
if DECODE_ACTIVATIONS not in ("bf16", "fp8"):
    raise ValueError(f"PBS_ENGINE_FP8_DECODE={DECODE_ACTIVATIONS!r}: must be bf16 or fp8")


def fp8_weight_only(x: torch.Tensor) -> bool:
    """Whether rows x (T, K) of an FP8 layer skip activation quantisation: on CUDA, up to SKINNY_ROWS rows (a decode
    step) run W8A16, the bf16 rows against the e4m3 weight in the skinny kernel, unless DECODE_ACTIVATIONS is "fp8".
    Such a step is bound by reading the weight, and quantising its rows took 4 launches per layer (0.24 ms of GPU
    time per 7B step on an H200, plus the launch gaps) that the GEMV does not need; it is also closer to the
    unquantised layer."""
    return x.is_cuda and x.shape[0] <= SKINNY_ROWS and DECODE_ACTIVATIONS == "bf16"


def fp8_linear(x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """y = x W^T (+ b) from e4m3 operands and their float32 scales: x_fp8 (T, K), x_scale (T, 1), w_fp8 (N, K),
    w_scale (N,) -> (T, N) in out_dtype. On CUDA: up to SKINNY_ROWS rows (decode) the skinny Triton kernel, more
    through torch._scaled_mm (check supports_fp8 at load); elsewhere the reference."""
    if not x_fp8.is_cuda:
        return fp8_linear_ref(x_fp8, x_scale, w_fp8, w_scale, bias, out_dtype)
    if x_fp8.shape[0] <= SKINNY_ROWS:
        return fp8_linear_skinny(x_fp8, x_scale, w_fp8, w_scale, bias, out_dtype)
    return fp8_linear_scaled_mm(x_fp8, x_scale, w_fp8, w_scale, bias, out_dtype)
