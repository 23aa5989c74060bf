"""Every Triton kernel (CPU interpreter) matches its PyTorch reference; PBS semantics hold."""
from __future__ import annotations

import pytest
import torch

from pbs_engine.kernels import PBSConfig, pbs_prefill, pbs_prefill_ref
from pbs_engine.kernels.flash_prefill import flash_prefill_ref, flash_prefill_triton
from pbs_engine.kernels.paged_decode import paged_decode_ref, paged_decode_triton
from pbs_engine.kernels.pbs_prefill import pbs_attention_triton
from pbs_engine.kernels.pbs_select import pbs_select

SHAPES = [(7, 1, 64), (8, 2, 128)]  # (query heads, KV heads, head_dim): GQA 7:1 and 4:1
SMALL = dict(block_size=16, segment_size=32)


def dense(q, k, v):
    return flash_prefill_ref(q, k, v, torch.tensor([0, len(q)], dtype=torch.int32),
                             torch.tensor([0, len(k)], dtype=torch.int32))


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("hq, hkv, d", SHAPES)
def test_flash_prefill_varlen_with_prefix_matches_reference(hq, hkv, d):
    lens_q, lens_k = [37, 5, 50], [37, 21, 70]  # q_len < kv_len: chunks after a cached prefix
    cu_q = torch.tensor([0, *lens_q]).cumsum(0).int()
    cu_k = torch.tensor([0, *lens_k]).cumsum(0).int()
    q, k, v = rand(sum(lens_q), hq, d, seed=1), rand(sum(lens_k), hkv, d, seed=2), rand(sum(lens_k), hkv, d, seed=3)
    torch.testing.assert_close(flash_prefill_triton(q, k, v, cu_q, cu_k), flash_prefill_ref(q, k, v, cu_q, cu_k),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hq, hkv, d", SHAPES)
def test_paged_decode_matches_reference(hq, hkv, d):
    num_blocks, page = 24, 16
    kc, vc = rand(num_blocks, page, hkv, d, seed=4), rand(num_blocks, page, hkv, d, seed=5)
    gen = torch.Generator().manual_seed(6)
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:7] for _ in range(4)]).int()
    lens = torch.tensor([1, 16, 45, 112], dtype=torch.int32)
    q = rand(4, hq, d, seed=7)
    torch.testing.assert_close(paged_decode_triton(q, kc, vc, tables, lens), paged_decode_ref(q, kc, vc, tables, lens),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hq, hkv, d", SHAPES)
@pytest.mark.parametrize("n, n_kv", [(100, 100), (70, 133)])
@pytest.mark.parametrize("cfg", [PBSConfig(threshold=0.6, **SMALL), PBSConfig(budget=0.3, permute=False, **SMALL)],
                         ids=["threshold", "budget-nopermute"])
def test_pbs_triton_matches_reference(hq, hkv, d, n, n_kv, cfg):
    q, k, v = rand(n, hq, d, seed=8), rand(n_kv, hkv, d, seed=9), rand(n_kv, hkv, d, seed=10)
    ref, stats = pbs_prefill_ref(q, k, v, cfg)
    sel = pbs_select(q, k, v, cfg, d ** -0.5)
    torch.testing.assert_close(pbs_attention_triton(q, sel, cfg, d ** -0.5), ref, atol=1e-5, rtol=1e-5)
    assert 0 < stats.density < 1


@pytest.mark.parametrize("hq, hkv, d", SHAPES)
@pytest.mark.parametrize("n, n_kv", [(100, 100), (70, 133)])
def test_pbs_threshold_one_equals_dense(hq, hkv, d, n, n_kv):
    q, k, v = rand(n, hq, d, seed=11), rand(n_kv, hkv, d, seed=12), rand(n_kv, hkv, d, seed=13)
    out, stats = pbs_prefill(q, k, v, PBSConfig(threshold=1.0, **SMALL))
    torch.testing.assert_close(out, dense(q, k, v), atol=1e-5, rtol=1e-5)
    assert stats.density == 1.0


def test_pbs_forced_blocks_always_kept():
    """The first key block and the whole diagonal segment survive even a tiny budget."""
    q, k, v = rand(128, 2, 64, seed=14), rand(128, 1, 64, seed=15), rand(128, 1, 64, seed=16)
    cfg = PBSConfig(budget=0.01, **SMALL)
    sel = pbs_select(q, k, v, cfg, 0.125)
    for m in range(128 // 16):
        kept = set(sel.block_idx[0, m, : sel.block_count[0, m]].tolist())
        diag = set(range(m * 16 // 32 * 2, m + 1))
        assert {0} | diag <= kept


def test_permutation_lowers_density_on_scattered_heavy_keys():
    """Heavy keys scattered inside segments: sorting them together needs fewer blocks for the same mass."""
    n, d, hq = 1024, 64, 4
    gen = torch.Generator().manual_seed(17)
    direction = torch.randn(d, generator=gen)
    q = torch.randn(n, hq, d, generator=gen) * 0.1 + direction
    k = torch.randn(n, 1, d, generator=gen) * 0.1
    heavy = torch.arange(3, n, 16)  # one heavy key every 16 tokens: in every block unless permuted
    k[heavy, 0] += direction * 0.6
    v = torch.randn(n, 1, d, generator=gen)
    cfg = PBSConfig(block_size=16, segment_size=128, threshold=0.8)
    _, permuted = pbs_prefill(q, k, v, cfg)
    _, plain = pbs_prefill(q, k, v, PBSConfig(block_size=16, segment_size=128, threshold=0.8, permute=False))
    assert permuted.density < plain.density * 0.85, (permuted.density, plain.density)


def test_pbs_bad_config_is_named():
    with pytest.raises(ValueError, match="segment_size"):
        PBSConfig(block_size=128, segment_size=192)
    with pytest.raises(ValueError, match="threshold"):
        PBSConfig(threshold=0)
