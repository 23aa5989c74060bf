"""FP8 (e4m3) layer kernels: the quantising Triton kernels against their references (CPU interpreter; compiled on a
GPU with TRITON_INTERPRET=0, bfloat16 inputs there too), the weight quantisation's error bound, and the FP8 GEMM
through torch._scaled_mm (on CPU as well) against the dequantised reference and the unquantised matmul."""
from __future__ import annotations

import os

import pytest
import torch

from pbs_engine.kernels import fp8
from pbs_engine.kernels.fp8 import (FP8_DTYPE, FP8_MAX, fp8_linear, fp8_linear_ref, fp8_linear_scaled_mm,
                                    quantize_per_token_ref, quantize_per_token_triton, quantize_weight,
                                    rms_norm_quant_ref, rms_norm_quant_triton, silu_and_mul_quant_ref,
                                    silu_and_mul_quant_triton, supports_fp8)
from pbs_engine.kernels.fused import rms_norm_ref, silu_and_mul_ref

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Triton kernels: on CPU tensors in the interpreter, else compiled on the GPU. The interpreter rounds float32 to
# bfloat16 by truncation (triton 3.9), so bfloat16 inputs, whose kernels round intermediates, run compiled only.
KERNEL_DEVICES = ["cpu"] if INTERPRETED else ["cuda"] if torch.cuda.is_available() else []
KERNEL_CASES = [(d, dtype) for d in KERNEL_DEVICES for dtype in [torch.float32] + [torch.bfloat16] * (d == "cuda")]
def _cpu_rowwise_scaled_mm() -> bool:
    """Whether this torch's CPU torch._scaled_mm takes row-wise scales (2.13 does; 2.11 only per-tensor)."""
    x = torch.zeros(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(x, x.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


GEMM_DEVICES = (["cpu"] if _cpu_rowwise_scaled_mm() else []) + (["cuda"] if supports_fp8("cuda") else [])


@pytest.fixture(params=["one program per row", "rows split over tiles"])
def row_path(request, monkeypatch):
    """The two launches of the row-quantising kernels: many rows (prefill) and fewer than FEW_ROWS (decode)."""
    monkeypatch.setattr(fp8, "FEW_ROWS", 0 if request.param == "one program per row" else 1 << 30)


def rand(*shape, seed, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


def e4m3_position(q: torch.Tensor) -> torch.Tensor:
    """Place on the e4m3 number line: neighbouring values differ by one, +0 and -0 are both 0."""
    code = q.view(torch.uint8).int()
    return torch.where(code >= 0x80, -(code & 0x7F), code & 0x7F)


def assert_quantised_close(got, want, dtype):
    """Within one e4m3 step, scales within 1e-6; from bfloat16 inputs a kernel's row maximum may round to the
    neighbouring bfloat16 value (approximate rsqrt / exp on the GPU), so its scale within one bfloat16 step."""
    (q, scale), (q_ref, scale_ref) = got, want
    assert q.dtype == FP8_DTYPE and q.shape == q_ref.shape and scale.shape == scale_ref.shape
    assert (e4m3_position(q) - e4m3_position(q_ref)).abs().max() <= 1
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6 if dtype == torch.float32 else 2 ** -7, atol=0)


@pytest.mark.parametrize("device, dtype", KERNEL_CASES)
@pytest.mark.parametrize("width", [200, 3000])
def test_quantize_per_token_matches_reference(device, dtype, width, row_path):
    """One column tile and two (ROW_TILE = 2048), rows of different magnitudes."""
    x = (rand(6, width, seed=1) * torch.tensor([1e-3, 1, 1, 5, 100, 3e4])[:, None]).to(device, dtype)
    assert_quantised_close(quantize_per_token_triton(x), quantize_per_token_ref(x), dtype)


@pytest.mark.parametrize("device, dtype", KERNEL_CASES)
@pytest.mark.parametrize("hidden", [96, 200])
def test_rms_norm_quant_matches_reference(device, dtype, hidden):
    x, w = rand(5, hidden, seed=2, dtype=dtype, device=device), rand(hidden, seed=3, dtype=dtype, device=device)
    assert_quantised_close(rms_norm_quant_triton(x, w, 1e-6), rms_norm_quant_ref(x, w, 1e-6), dtype)


@pytest.mark.parametrize("device, dtype", KERNEL_CASES)
@pytest.mark.parametrize("hidden", [96, 200])
def test_rms_norm_quant_with_residual_matches_reference_and_returns_the_sum(device, dtype, hidden):
    x, res, w = (rand(*shape, seed=seed, dtype=dtype, device=device)
                 for shape, seed in [((3, 7, hidden), 4), ((3, 7, hidden), 5), ((hidden,), 6)])
    q, scale, new_res = rms_norm_quant_triton(x, w, 1e-5, res)
    q_ref, scale_ref, ref_res = rms_norm_quant_ref(x, w, 1e-5, res)
    assert_quantised_close((q, scale), (q_ref, scale_ref), dtype)
    assert torch.equal(new_res, x + res) and torch.equal(ref_res, x + res)


@pytest.mark.parametrize("device, dtype", KERNEL_CASES)
@pytest.mark.parametrize("inter", [300, 2500])
def test_silu_and_mul_quant_matches_reference(device, dtype, inter, row_path):
    """One column tile and two; the rows of the 7B shape (18944) take ten."""
    x = rand(4, 3, 2 * inter, seed=7, dtype=dtype, device=device) * 3
    assert_quantised_close(silu_and_mul_quant_triton(x), silu_and_mul_quant_ref(x), dtype)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_kernels_round_to_the_nearest_e4m3_value_ties_to_even(device):
    """A row of amax 448 has scale 1: its midpoints between e4m3 values (subnormal ones included) reach the
    rounding unchanged and go to the neighbour with the even code, as torch rounds."""
    values = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()
    grid = values[values.isfinite()].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    row = torch.cat([torch.tensor([FP8_MAX]), mids, -mids, grid, torch.tensor([1e-5, -1e-5, 0.0, -0.0])])
    q, scale = quantize_per_token_triton(row[None].to(device))
    q_ref, _ = quantize_per_token_ref(row[None])
    assert scale.item() == 1.0 and torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))
    assert (q_ref[0, 1:1 + len(mids)].view(torch.uint8) % 2 == 0).all()


@pytest.mark.parametrize("device, dtype", KERNEL_CASES)
@pytest.mark.parametrize("op", ["quantize_per_token", "rms_norm_quant", "silu_and_mul_quant"])
def test_zero_rows_quantise_to_zeros_with_a_finite_scale(device, dtype, op, row_path):
    x = rand(3, 2 * 2500, seed=8, dtype=dtype, device=device)
    x[1] = 0
    w = rand(x.shape[-1], seed=9, dtype=dtype, device=device)
    q, scale = {"quantize_per_token": lambda: quantize_per_token_triton(x),
                "rms_norm_quant": lambda: rms_norm_quant_triton(x, w, 1e-6),
                "silu_and_mul_quant": lambda: silu_and_mul_quant_triton(x)}[op]()
    assert (q[1].float() == 0).all() and scale[1].isfinite().all() and (scale[1] > 0).all()
    assert (q[[0, 2]].float() != 0).any()


@pytest.mark.parametrize("op", ["rms_norm", "silu_and_mul"])
def test_quantised_activations_are_the_unquantised_ops_within_e4m3_rounding(op):
    """The references quantise what rms_norm / silu_and_mul return (bfloat16 rounding included): dequantised, each
    value within half an e4m3 step, i.e. 1/16 relative where it is normal (>= 2^-6 x scale), scale / 2^10 below."""
    x, w = rand(4, 320, seed=10, dtype=torch.bfloat16), rand(320, seed=11, dtype=torch.bfloat16)
    (q, scale), want = ((rms_norm_quant_ref(x, w, 1e-6), rms_norm_ref(x, w, 1e-6)) if op == "rms_norm" else
                        (silu_and_mul_quant_ref(x), silu_and_mul_ref(x)))
    assert_within_half_an_e4m3_step(q.float() * scale, want.float(), scale)


def assert_within_half_an_e4m3_step(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor):
    err, normal = (got - want).abs(), want.abs() >= 2 ** -6 * scale
    assert normal.float().mean() > 0.9
    assert (err[normal] <= want.abs()[normal] / 16).all()
    assert (err <= (scale * (1 + 1e-6) / 2 ** 10).expand_as(err))[~normal].all()  # slack: float32 products


def test_quantize_weight_round_trip_error_bound():
    """Per-output-channel scale amax / 448 (each row's largest weight becomes +-448 exactly); dequantised weights
    within half an e4m3 step: 1/16 relative for normal values."""
    w = rand(48, 200, seed=12, dtype=torch.bfloat16) * torch.logspace(-3, 2, 48)[:, None].bfloat16()
    w_fp8, scale = quantize_weight(w)
    assert w_fp8.dtype == FP8_DTYPE and w_fp8.shape == w.shape and scale.dtype == torch.float32
    assert scale.shape == (48,)
    torch.testing.assert_close(scale, w.float().abs().amax(1) / FP8_MAX, rtol=0, atol=0)
    assert (w_fp8.float().abs().amax(1) == FP8_MAX).all()
    assert_within_half_an_e4m3_step(w_fp8.float() * scale[:, None], w.float(), scale[:, None])


def test_quantize_weight_zero_row_gives_zeros_and_a_finite_scale():
    w = rand(16, 32, seed=13)
    w[3] = 0
    w_fp8, scale = quantize_weight(w)
    assert (w_fp8[3].float() == 0).all() and scale[3].isfinite() and scale[3] > 0


def quantised_operands(rows: int, seed: int, k: int = 256, n: int = 48):
    """x (rows, k) and w (n, k) in bfloat16, quantised as the layers quantise them; K and N multiples of 16 as
    torch._scaled_mm needs on CUDA."""
    x, w = rand(rows, k, seed=seed, dtype=torch.bfloat16), rand(n, k, seed=seed + 1, dtype=torch.bfloat16)
    return x, w, quantize_per_token_ref(x), quantize_weight(w)


def test_fp8_linear_ref_is_the_dequantised_matmul():
    _, _, (xq, xs), (wq, ws) = quantised_operands(9, seed=14)
    bias = rand(48, seed=16)
    want = (xq.double() * xs.double()) @ (wq.double() * ws.double()[:, None]).t() + bias.double()
    torch.testing.assert_close(fp8_linear_ref(xq, xs, wq, ws, bias, out_dtype=torch.float32).double(), want,
                               rtol=1e-5, atol=1e-5)


def test_fp8_linear_ref_is_close_to_the_unquantised_matmul():
    """Relative Frobenius error <= 0.05. e4m3 keeps 3 mantissa bits: round to nearest leaves each operand with an
    RMS relative error of ~0.026 (uniform within half a step); the two operands' errors are independent, so the
    product's is ~sqrt(2) x 0.026 = 0.037 (0.035-0.039 over 20 seeds of this shape)."""
    x, w, (xq, xs), (wq, ws) = quantised_operands(33, seed=17)
    want = x.float() @ w.float().t()
    out = fp8_linear_ref(xq, xs, wq, ws, out_dtype=torch.float32)
    assert (out - want).norm() / want.norm() <= 0.05


@pytest.mark.parametrize("device", GEMM_DEVICES)
@pytest.mark.parametrize("rows", [1, 5, 16, 33])
@pytest.mark.parametrize("with_bias", [False, True])
def test_scaled_mm_path_matches_reference(device, rows, with_bias):
    """torch._scaled_mm with row-wise scales (decode-sized row counts padded to 16) against the dequantised float32
    reference: both sum exact products of e4m3 values in float32, so the bfloat16 outputs differ by float32
    summation order, i.e. by at most one bfloat16 step (2^-7 relative), plus a small absolute slack near zero."""
    _, _, (xq, xs), (wq, ws) = quantised_operands(rows, seed=18)
    bias = rand(48, seed=20, dtype=torch.bfloat16) if with_bias else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    out = fp8_linear_scaled_mm(to(xq), to(xs), to(wq), to(ws), to(bias))
    want = fp8_linear_ref(xq, xs, wq, ws, bias)
    assert out.shape == (rows, 48) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.cpu().float(), want.float(), rtol=2 ** -7, atol=1e-3 * want.abs().max().item())


@pytest.mark.parametrize("device", GEMM_DEVICES)
def test_scaled_mm_path_adds_the_bias_to_a_float32_output(device):
    """torch._scaled_mm takes no bias with a float32 output on CUDA: it is added after. Float32 outputs differ
    from the reference by summation order (tensor cores sum in their own order): 1e-3 relative (measured on an
    H200: within that, not within 1e-5)."""
    _, _, (xq, xs), (wq, ws) = quantised_operands(20, seed=21)
    bias = rand(48, seed=23, dtype=torch.bfloat16)
    out = fp8_linear_scaled_mm(xq.to(device), xs.to(device), wq.to(device), ws.to(device), bias.to(device),
                               out_dtype=torch.float32)
    want = fp8_linear_ref(xq, xs, wq, ws, bias, out_dtype=torch.float32)
    torch.testing.assert_close(out.cpu(), want, rtol=1e-3, atol=1e-3 * want.abs().max().item())


def test_fp8_linear_runs_the_reference_on_cpu():
    _, _, (xq, xs), (wq, ws) = quantised_operands(3, seed=24)
    assert torch.equal(fp8_linear(xq, xs, wq, ws), fp8_linear_ref(xq, xs, wq, ws))


def test_supports_fp8_is_false_on_cpu():
    assert not supports_fp8("cpu") and not supports_fp8(torch.device("cpu"))


@pytest.mark.skipif(not KERNEL_DEVICES, reason="needs TRITON_INTERPRET=1 or a GPU")
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_skinny_fp8_kernel_matches_reference(rows, with_bias):
    """The decode-sized FP8 GEMM (weights streamed once, e4m3 widened to bf16 exactly, float32 accumulation)
    against the dequantised float32 reference: only the summation order differs."""
    device = KERNEL_DEVICES[0]
    _, _, (xq, xs), (wq, ws) = quantised_operands(rows, seed=30, k=200, n=40)  # K, N not multiples of the tiles
    bias = rand(40, seed=31) if with_bias else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    out = fp8.fp8_linear_skinny(to(xq), to(xs), to(wq), to(ws), to(bias), out_dtype=torch.float32)
    want = fp8_linear_ref(xq, xs, wq, ws, bias, out_dtype=torch.float32)
    torch.testing.assert_close(out.cpu(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_a_bad_fp8_decode_setting_is_refused_at_import():
    import subprocess
    import sys

    env = {**__import__("os").environ, "PBS_ENGINE_FP8_DECODE": "int4"}
    run = subprocess.run([sys.executable, "-c", "import pbs_engine.kernels.fp8"], env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "PBS_ENGINE_FP8_DECODE='int4': must be bf16 or fp8" in run.stderr
