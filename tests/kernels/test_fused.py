"""RMSNorm, SiLU-and-mul and RoPE kernels (Triton, CPU interpreter) against their references, and the references
against Hugging Face's definitions."""
from __future__ import annotations

import pytest
import torch

from pbs_engine.kernels.fused import rms_norm_ref, rms_norm_triton, silu_and_mul_ref, silu_and_mul_triton
from pbs_engine.kernels.rope import apply_rope_ref, apply_rope_triton, build_cos_sin_cache, rope_inv_freq

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("hidden", [64, 200])
def test_rms_norm_matches_reference(hidden):
    x, w = rand(5, hidden, seed=1), rand(hidden, seed=2)
    torch.testing.assert_close(rms_norm_triton(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), atol=1e-5, rtol=1e-5)


def test_rms_norm_with_residual_returns_the_sum_and_its_norm():
    x, res, w = rand(3, 7, 96, seed=3), rand(3, 7, 96, seed=4), rand(96, seed=5)
    out, new_res = rms_norm_triton(x, w, 1e-5, res)
    ref_out, ref_res = rms_norm_ref(x, w, 1e-5, res)
    assert torch.equal(new_res, x + res) and torch.equal(ref_res, x + res)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)


def test_silu_and_mul_matches_reference():
    x = rand(4, 3, 2 * 300, seed=6)
    torch.testing.assert_close(silu_and_mul_triton(x), silu_and_mul_ref(x), atol=1e-5, rtol=1e-5)
    gate, up = x.chunk(2, -1)
    torch.testing.assert_close(silu_and_mul_ref(x), gate * torch.sigmoid(gate) * up)


@pytest.mark.parametrize("d, hq, hkv", [(64, 7, 1), (128, 4, 2)])
def test_rope_matches_reference(d, hq, hkv):
    cache = build_cos_sin_cache(rope_inv_freq(d, 10000.0, LLAMA3), 300).float()
    positions = torch.tensor([0, 5, 299, 17, 17])
    q, k = rand(5, hq, d, seed=7), rand(5, hkv, d, seed=8)
    for out, ref in zip(apply_rope_triton(q, k, positions, cache), apply_rope_ref(q, k, positions, cache)):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_rope_reference_is_hf_neox_rotation():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    d, positions = 64, torch.tensor([3, 40, 41])
    inv_freq = rope_inv_freq(d, 10000.0)
    angles = torch.outer(positions.double(), inv_freq)
    emb = torch.cat([angles, angles], -1).float()
    q, k = rand(1, 2, 3, d, seed=9), rand(1, 1, 3, d, seed=10)  # HF layout (batch, heads, tokens, D)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, emb.cos()[None], emb.sin()[None])
    ours_q, ours_k = apply_rope_ref(q[0].transpose(0, 1), k[0].transpose(0, 1), positions,
                                    build_cos_sin_cache(inv_freq, 64).float())
    torch.testing.assert_close(ours_q, hf_q[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_k, hf_k[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_llama3_inverse_frequencies_match_hf():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, head_dim=128, rope_theta=500000.0,
                      rope_scaling=LLAMA3, max_position_embeddings=131072)
    hf, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    torch.testing.assert_close(rope_inv_freq(128, 500000.0, LLAMA3).float(), hf, rtol=1e-6, atol=0)
