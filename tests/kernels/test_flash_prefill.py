"""Dense varlen FlashAttention (Triton, CPU interpreter) against its PyTorch reference."""
from __future__ import annotations

import pytest
import torch

from pbs_engine.kernels.flash_prefill import SDPA_CHUNK, flash_prefill_ref, flash_prefill_sdpa, flash_prefill_triton

SHAPES = [(7, 1, 64), (8, 2, 128), (4, 4, 32)]  # (query heads, KV heads, head_dim): GQA 7:1, 4:1, MHA


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def cu(lens):
    return torch.tensor([0, *lens]).cumsum(0).int()


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])  # Hopper's descriptor kernel too
@pytest.mark.parametrize("hq, hkv, d", SHAPES)
def test_varlen_chunks_after_a_cached_prefix_match_reference(hq, hkv, d, tma):
    lens_q, lens_k = [37, 5, 50], [37, 21, 70]  # q_len < kv_len: the queries are each sequence's last positions
    q, k, v = rand(sum(lens_q), hq, d, seed=1), rand(sum(lens_k), hkv, d, seed=2), rand(sum(lens_k), hkv, d, seed=3)
    out = flash_prefill_triton(q, k, v, cu(lens_q), cu(lens_k), tma=tma)
    torch.testing.assert_close(out, flash_prefill_ref(q, k, v, cu(lens_q), cu(lens_k)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hq, hkv, d", SHAPES)
def test_cpu_sdpa_path_matches_reference(hq, hkv, d):
    """The CPU serving path (torch SDPA, GQA without repeats) on a varlen batch: a fresh prompt, a short chunk after
    a prefix, and a chunk longer than SDPA_CHUNK after one (its bottom-right causal mask built chunk by chunk)."""
    lens_q, lens_k = [37, 5, SDPA_CHUNK + 44], [37, 21, SDPA_CHUNK + 144]
    q, k, v = rand(sum(lens_q), hq, d, seed=1), rand(sum(lens_k), hkv, d, seed=2), rand(sum(lens_k), hkv, d, seed=3)
    for causal in (True, False):
        out = flash_prefill_sdpa(q, k, v, cu(lens_q), cu(lens_k), causal=causal)
        ref = flash_prefill_ref(q, k, v, cu(lens_q), cu(lens_k), causal=causal)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_non_causal_matches_reference():
    q, k, v = rand(40, 4, 64, seed=4), rand(53, 2, 64, seed=5), rand(53, 2, 64, seed=6)
    out = flash_prefill_triton(q, k, v, cu([40]), cu([53]), causal=False, sm_scale=0.3)
    ref = flash_prefill_ref(q, k, v, cu([40]), cu([53]), causal=False, sm_scale=0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_reference_is_plain_causal_softmax():
    q, k, v = rand(9, 2, 32, seed=7), rand(9, 2, 32, seed=8), rand(9, 2, 32, seed=9)
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                           is_causal=True).transpose(0, 1)
    torch.testing.assert_close(flash_prefill_ref(q, k, v, cu([9]), cu([9])), ref, atol=1e-5, rtol=1e-5)


def test_reference_runs_in_bfloat16():
    q, k, v = (rand(20, 4, 64, seed=s).bfloat16() for s in (10, 11, 12))
    out = flash_prefill_ref(q, k, v, cu([20]), cu([20]))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), flash_prefill_ref(q.float(), k.float(), v.float(), cu([20]), cu([20])),
                               atol=2e-2, rtol=2e-2)


def test_tma_kernel_reads_q_k_v_sliced_from_a_fused_projection():
    """q/k/v as strided views of one qkv buffer (as the model produces them) through the descriptor kernel."""
    n, hq, hkv, d = 45, 4, 2, 32
    qkv = rand(n, (hq + 2 * hkv) * d, seed=13)
    q, k, v = (qkv[:, a * d:b * d].view(n, b - a, d) for a, b in ((0, hq), (hq, hq + hkv), (hq + hkv, hq + 2 * hkv)))
    out = flash_prefill_triton(q, k, v, cu([n]), cu([n]), tma=True)
    torch.testing.assert_close(out, flash_prefill_ref(q, k, v, cu([n]), cu([n])), atol=1e-5, rtol=1e-5)


def test_explicit_launch_shape_gives_the_same_result():
    """Benchmarks sweep tiles through the launcher's `tiles`; every shape computes the same attention."""
    q, k, v = rand(40, 4, 32, seed=14), rand(60, 2, 32, seed=15), rand(60, 2, 32, seed=16)
    out = flash_prefill_triton(q, k, v, cu([40]), cu([60]), tiles=(32, 16, 4, 1))
    torch.testing.assert_close(out, flash_prefill_ref(q, k, v, cu([40]), cu([60])), atol=1e-5, rtol=1e-5)
