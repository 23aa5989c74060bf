"""Split-K paged decode (Triton, CPU interpreter) against its PyTorch reference."""
from __future__ import annotations

import pytest
import torch

from pbs_engine.kernels.paged_decode import paged_decode_ref, paged_decode_triton


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("hq, hkv, d, page", [(7, 1, 64, 16), (8, 2, 128, 16), (4, 1, 64, 128)])
def test_random_block_tables_and_lengths_match_reference(hq, hkv, d, page):
    """Pages scattered through the cache; lengths from one token to a full table; pages larger than a tile."""
    num_blocks, width = 24, 6
    kc, vc = rand(num_blocks, page, hkv, d, seed=4), rand(num_blocks, page, hkv, d, seed=5)
    gen = torch.Generator().manual_seed(6)
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:width] for _ in range(4)]).int()
    lens = torch.tensor([1, page, 2 * page + 13, width * page], dtype=torch.int32)
    q = rand(4, hq, d, seed=7)
    out = paged_decode_triton(q, kc, vc, tables, lens, sm_scale=0.1)
    torch.testing.assert_close(out, paged_decode_ref(q, kc, vc, tables, lens, sm_scale=0.1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hq, hkv, d, page", [(7, 1, 64, 16), (8, 2, 128, 16)])
def test_fp8_cache_matches_reference_on_the_same_cache(hq, hkv, d, page):
    """An e4m3 cache with a scale per (token, head): the kernel dequantises inside the tile loop as the reference
    does before attending; scales span orders of magnitude (heads of very different norms)."""
    from pbs_engine.kernels.paged_decode import quantize_kv

    num_blocks, width = 24, 6
    gen = torch.Generator().manual_seed(8)
    mags = torch.logspace(-2, 2, num_blocks * page * hkv).view(num_blocks, page, hkv, 1)
    kc, ks = quantize_kv((rand(num_blocks * page, hkv, d, seed=9) * mags.view(-1, hkv, 1)))
    vc, vs = quantize_kv(rand(num_blocks * page, hkv, d, seed=10))
    kc, vc = kc.view(num_blocks, page, hkv, d), vc.view(num_blocks, page, hkv, d)
    ks, vs = ks.view(num_blocks, page, hkv), vs.view(num_blocks, page, hkv)
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:width] for _ in range(3)]).int()
    lens = torch.tensor([1, 2 * page + 5, width * page], dtype=torch.int32)
    q = rand(3, hq, d, seed=11) * 0.05
    out = paged_decode_triton(q, kc, vc, tables, lens, sm_scale=0.1, k_scale=ks, v_scale=vs)
    want = paged_decode_ref(q, kc, vc, tables, lens, sm_scale=0.1, k_scale=ks, v_scale=vs)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_kv_quantisation_round_trip():
    """Each (token, head) row back within e4m3's precision (3 mantissa bits: 1/16 relative) of its own amax."""
    from pbs_engine.kernels.paged_decode import dequantize_kv, quantize_kv

    x = rand(50, 4, 64, seed=12) * torch.logspace(-3, 3, 50)[:, None, None]
    x8, scale = quantize_kv(x)
    assert x8.dtype == torch.float8_e4m3fn and scale.shape == (50, 4)
    back = dequantize_kv(x8, scale, torch.float32)
    err = (back - x).abs() / x.abs().amax(-1, keepdim=True)
    assert err.max() <= 1 / 16 and (back.abs().amax(-1) - x.abs().amax(-1)).abs().max() <= 1e-6 * x.abs().max()
