"""The skinny (decode-sized) linear kernel against F.linear / the dequantised FP8 reference, in the interpreter (or
on a GPU): one K slice and several (the split-K reduction), with and without bias, unaligned K and N."""
from __future__ import annotations

import os

import pytest
import torch

from pbs_engine.kernels.fp8 import fp8_linear_ref, quantize_per_token_ref, quantize_weight
from pbs_engine.kernels.skinny import SKINNY_ROWS, skinny_linear

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = ["cpu"] if INTERPRETED else ["cuda"] if torch.cuda.is_available() else []
pytestmark = pytest.mark.skipif(not DEVICES, reason="needs TRITON_INTERPRET=1 or a GPU")
SMALL = (16, 32, 1, 1, 1)  # BLOCK_N, BLOCK_K, SPLIT, warps, stages: interpreter-sized
SPLIT = (16, 32, 3, 1, 1)


def operands(rows: int, k: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g) / k ** 0.5,
            torch.randn(n, generator=g))


@pytest.mark.parametrize("rows", [1, 3, 5, 16])
@pytest.mark.parametrize("tiles", [SMALL, SPLIT], ids=["one-slice", "split-k"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_float_weights_match_f_linear(rows, tiles, with_bias):
    x, w, b = operands(rows, k=200, n=40, seed=rows)
    bias = b if with_bias else None
    dev = DEVICES[0]
    out = skinny_linear(x.to(dev), w.to(dev), None if bias is None else bias.to(dev), tiles=tiles)
    torch.testing.assert_close(out.cpu(), torch.nn.functional.linear(x, w, bias), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 4, 9])
@pytest.mark.parametrize("tiles", [SMALL, SPLIT], ids=["one-slice", "split-k"])
def test_fp8_weights_and_rows_match_the_dequantised_reference(rows, tiles):
    x, w, b = operands(rows, k=200, n=40, seed=10 + rows)
    (xq, xs), (wq, ws) = quantize_per_token_ref(x), quantize_weight(w)
    dev = DEVICES[0]
    out = skinny_linear(xq.to(dev), wq.to(dev), b.to(dev), x_scale=xs.to(dev), w_scale=ws.to(dev),
                        out_dtype=torch.float32, tiles=tiles)
    want = fp8_linear_ref(xq, xs, wq, ws, b, out_dtype=torch.float32)
    tol = 1e-3 if dev == "cuda" else 1e-4  # the GPU multiplies in fp8 on the tensor cores: their accumulator is
    # narrower than float32 within a BLOCK_K tile
    torch.testing.assert_close(out.cpu(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_default_tiles_and_refusals():
    x, w, b = operands(2, k=96, n=24, seed=3)
    dev = DEVICES[0]
    torch.testing.assert_close(skinny_linear(x.to(dev), w.to(dev), b.to(dev)).cpu(),
                               torch.nn.functional.linear(x, w, b), rtol=1e-4, atol=1e-4)
    assert skinny_linear(x[:0].to(dev), w.to(dev)).shape == (0, 24)
    with pytest.raises(ValueError, match="at most"):
        skinny_linear(torch.zeros(SKINNY_ROWS + 1, 96, device=dev), w.to(dev))


@pytest.mark.parametrize("rows", [1, 7])
def test_float_rows_against_fp8_weights_match_the_dequantised_weight(rows):
    """W8A16 (decode rows of an FP8 layer on CUDA): unquantised rows against the e4m3 weight and its scales."""
    x, w, b = operands(rows, k=200, n=40, seed=20 + rows)
    wq, ws = quantize_weight(w)
    dev = DEVICES[0]
    out = skinny_linear(x.to(dev), wq.to(dev), b.to(dev), w_scale=ws.to(dev), out_dtype=torch.float32, tiles=SPLIT)
    want = torch.nn.functional.linear(x, wq.float() * ws[:, None], b)
    torch.testing.assert_close(out.cpu(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
