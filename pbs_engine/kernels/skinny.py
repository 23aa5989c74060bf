"""Skinny linear layers: y = x W^T (+ b) for a few rows (a decode step), which is bound by reading the weight once.
One Triton kernel for bf16/fp16 weights and for e4m3 weights with per-channel scales (e4m3 rows with per-token
scales, or plain rows, as input): the rows padded to 16 for tl.dot (on an H200 a register-FMA variant for one row
reached only half the bandwidth: conversion-bound). The grid has one program per BLOCK_N output columns and, for
long inputs or few columns, SPLIT programs along K whose float32 partial sums a second tiny launch adds up, so
that a 3584-column projection still spreads its weight over every SM. e4m3 rows against an e4m3 weight (W8A8)
multiply in fp8 on the tensor cores."""
from __future__ import annotations

import os

import torch

from pbs_engine.kernels.triton_compat import tl, triton

SKINNY_ROWS = 16  # at most this many rows take the skinny kernel (above: cuBLAS / torch._scaled_mm)
# bf16 weights: whether decode projections use this kernel instead of cuBLAS ("1"/"0"); fp8 weights always do
BF16_SKINNY = os.environ.get("PBS_ENGINE_BF16_SKINNY", "0") == "1"


def skinny_tiles(n: int, k: int, rows: int, weight_bytes: int, sms: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_K, SPLIT, num_warps, num_stages), from `pbs-engine bench tiles --only skinny` on an H200:
    64 columns per program where that still gives 4 programs per SM (gate_up, LM head: 0.74-0.84 of copy
    bandwidth in e4m3), else 32 and split along K until it does (down 0.31 -> 0.56, o 0.27 -> 0.35)."""
    block_k = 256 if weight_bytes == 1 else 128
    block_n = 64 if triton.cdiv(n, 64) >= 4 * sms else 32
    split = 1
    while triton.cdiv(n, block_n) * split < 4 * sms and k // (split * 2) >= block_k:
        split *= 2
    return block_n, block_k, split, 4, 4


@triton.jit
def _skinny_kernel(X, XS, W, WS, B, Y, P, M, N, K, k_per_split, s_xm, s_wn, s_ym,
                   HAS_XS: tl.constexpr, HAS_WS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                   ROWS: tl.constexpr, IEEE: tl.constexpr, FP8_DOT: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    # Program (column tile n, K slice s): rows [0, M) x columns of tile n over K in [s * k_per_split, +k_per_split).
    # SPLIT == 1: scales, bias and the cast applied here, stored to Y; else the raw float32 partial goes to
    # P (SPLIT, M, N) for _skinny_reduce.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, ROWS)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + offs_k
        x = tl.load(X + offs_m[:, None] * s_xm + ks[None, :], mask=(offs_m[:, None] < M) & (ks[None, :] < k_hi),
                    other=0.0)
        w = tl.load(W + offs_n[:, None] * s_wn + ks[None, :], mask=(offs_n[:, None] < N) & (ks[None, :] < k_hi),
                    other=0.0)
        if FP8_DOT:  # e4m3 rows and weight: the tensor cores' fp8 product, no conversion of the weight tile; a
            # fresh float32 sum per tile, so Hopper's reduced-precision fp8 accumulation spans BLOCK_K terms only
            acc += tl.dot(x, tl.trans(w))
        elif IEEE:  # float32 operands: no tf32 rounding
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x.to(tl.float32).to(tl.bfloat16), tl.trans(w.to(tl.float32).to(tl.bfloat16)), acc)
    if SPLIT == 1:
        if HAS_XS:
            acc = acc * tl.load(XS + offs_m, mask=offs_m < M, other=0.0)[:, None]
        if HAS_WS:
            acc = acc * tl.load(WS + offs_n, mask=offs_n < N, other=0.0)[None, :]
        if HAS_BIAS:
            acc += tl.load(B + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + offs_m[:, None] * s_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))
    else:
        tl.store(P + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], acc,
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _skinny_reduce(P, XS, WS, B, Y, M, N, s_ym, HAS_XS: tl.constexpr, HAS_WS: tl.constexpr,
                   HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    # Program (row m, column block): the SPLIT partials summed, scaled, biased and cast into Y.
    m = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLIT):
        acc += tl.load(P + (s * M + m) * N + offs, mask=mask, other=0.0)
    if HAS_XS:
        acc = acc * tl.load(XS + m)
    if HAS_WS:
        acc = acc * tl.load(WS + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + m * s_ym + offs, acc.to(Y.dtype.element_ty), mask=mask)


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  x_scale: torch.Tensor | None = None, w_scale: torch.Tensor | None = None,
                  out_dtype: torch.dtype | None = None, tiles: tuple[int, int, int, int, int] | None = None
                  ) -> torch.Tensor:
    """x (M <= SKINNY_ROWS, K) @ weight (N, K)^T (+ bias) -> (M, N) in out_dtype (default x's dtype): weight in
    bf16/fp16/fp32, or e4m3 with w_scale (N,) float32 per output channel; x likewise, e4m3 with x_scale (M, 1).
    tiles = (BLOCK_N, BLOCK_K, SPLIT, num_warps, num_stages), default skinny_tiles."""
    rows, k = x.shape
    n = weight.shape[0]
    if rows > SKINNY_ROWS:
        raise ValueError(f"skinny_linear: {rows} rows, at most {SKINNY_ROWS}")
    out_dtype = out_dtype or x.dtype
    y = torch.empty(rows, n, dtype=out_dtype, device=x.device)
    if rows == 0:
        return y
    x = x if x.stride(-1) == 1 else x.contiguous()
    block_n, block_k, split, warps, stages = tiles or skinny_tiles(n, k, rows, weight.element_size(),
                                                                   _sm_count(x.device))
    row_pad = max(triton.next_power_of_2(rows), 16)  # tl.dot takes at least 16 rows
    k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    split = triton.cdiv(k, k_per_split)
    xs = x_scale.reshape(-1).contiguous() if x_scale is not None else None
    # operands of at most bf16 precision (bf16, e4m3) are widened to bf16 exactly for tl.dot; float32 stays float32
    half = x.is_cuda and x.dtype != torch.float32 and weight.dtype != torch.float32
    fp8_dot = x.is_cuda and x.dtype == weight.dtype == torch.float8_e4m3fn  # W8A8 (the interpreter widens instead)
    dummy = weight  # any pointer for the arguments a constexpr switches off
    partial = torch.empty(split, rows, n, dtype=torch.float32, device=x.device) if split > 1 else dummy
    _skinny_kernel[(triton.cdiv(n, block_n), split)](
        x, xs if xs is not None else dummy, weight, w_scale if w_scale is not None else dummy,
        bias if bias is not None else dummy, y, partial, rows, n, k, k_per_split, x.stride(0), weight.stride(0),
        y.stride(0), HAS_XS=xs is not None, HAS_WS=w_scale is not None, HAS_BIAS=bias is not None, SPLIT=split,
        ROWS=row_pad, IEEE=not half, FP8_DOT=fp8_dot, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
        num_stages=stages)
    if split > 1:
        block = 1024 if x.is_cuda else 64
        _skinny_reduce[(rows, triton.cdiv(n, block))](
            partial, xs if xs is not None else dummy, w_scale if w_scale is not None else dummy,
            bias if bias is not None else dummy, y, rows, n, y.stride(0), HAS_XS=xs is not None,
            HAS_WS=w_scale is not None, HAS_BIAS=bias is not None, SPLIT=split, BLOCK=block, num_warps=4)
    return y
