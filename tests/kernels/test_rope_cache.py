"""RoPE fused with the KV-cache write (Triton, CPU interpreter) against its reference: rotated q/k, v, and exactly
the mapped rows of the flat paged caches written."""
from __future__ import annotations

import pytest
import torch

from pbs_engine.kernels.rope import (apply_rope_ref, build_cos_sin_cache, rope_and_cache_ref, rope_and_cache_triton,
                                     rope_inv_freq)

D, SLOTS = 64, 48  # head dim; cache rows (3 blocks of 16)


def inputs(t: int, hq: int, hkv: int, dtype: torch.dtype, seed: int):
    """q, k, v as the strided views of one qkv projection (as the model splits them), positions, a cos/sin cache,
    slots (a random permutation's first t rows) and random flat caches."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(t, (hq + 2 * hkv) * D, generator=g).to(dtype)
    q, k, v = qkv.split([hq * D, hkv * D, hkv * D], dim=-1)
    q, k, v = q.view(t, hq, D), k.view(t, hkv, D), v.view(t, hkv, D)
    positions = torch.randint(0, 500, (t,), generator=g)
    cos_sin = build_cos_sin_cache(rope_inv_freq(D, 10000.0), 500).float()
    slots = torch.randperm(SLOTS, generator=g)[:t]
    caches = [torch.randn(SLOTS // 16, 16, hkv, D, generator=g).to(dtype) for _ in range(2)]
    return q, k, v, positions, cos_sin, slots, caches


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq, hkv", [(14, 2), (4, 1)])
@pytest.mark.parametrize("t", [1, 3, 17])
def test_rope_and_cache_matches_reference(t, hq, hkv, dtype):
    q, k, v, positions, cos_sin, slots, caches = inputs(t, hq, hkv, dtype, seed=t * 100 + hq)
    ours_caches, ref_caches = [c.clone() for c in caches], [c.clone() for c in caches]
    ours = rope_and_cache_triton(q, k, v, positions, cos_sin, slots, *(c.view(-1, hkv, D) for c in ours_caches))
    ref = rope_and_cache_ref(q, k, v, positions, cos_sin, slots, *(c.view(-1, hkv, D) for c in ref_caches))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    for out, expected in zip(ours, ref):
        assert out.dtype == dtype and out.is_contiguous()
        torch.testing.assert_close(out, expected, **tol)
    assert torch.equal(ours[2], v)
    for out, expected in zip(ours_caches, ref_caches):
        torch.testing.assert_close(out, expected, **tol)


def test_rope_and_cache_writes_only_the_mapped_rows():
    q, k, v, positions, cos_sin, slots, caches = inputs(5, 4, 1, torch.float32, seed=3)
    before = [c.clone() for c in caches]
    _, k_out, v_out = rope_and_cache_triton(q, k, v, positions, cos_sin, slots, *(c.view(-1, 1, D) for c in caches))
    flat_k, flat_v = (c.view(-1, 1, D) for c in caches)
    others = torch.ones(SLOTS, dtype=torch.bool)
    others[slots] = False
    for after, old in zip(caches, before):
        assert torch.equal(after.view(-1, 1, D)[others], old.view(-1, 1, D)[others])
    assert torch.equal(flat_k[slots], k_out) and torch.equal(flat_v[slots], v)
    torch.testing.assert_close(k_out, apply_rope_ref(q, k, positions, cos_sin)[1], atol=1e-5, rtol=1e-5)


def decode_step(fp8: bool = False):
    """An attention layer over a random cache of 12 blocks of 16, and one decode token each for three sequences."""
    from pbs_engine.models.layers.attention import Attention, AttentionMetadata
    from pbs_engine.models.layers.rotary import RotaryEmbedding

    g = torch.Generator().manual_seed(5)
    attn, rotary = Attention(0, 4, 1, D), RotaryEmbedding(D, 500, 10000.0, None)
    attn.k_cache, attn.v_cache = (torch.randn(12, 16, 1, D, generator=g) for _ in range(2))
    if fp8:
        attn.k_scale, attn.v_scale = torch.ones(12, 16, 1), torch.ones(12, 16, 1)
    tables = torch.randperm(12, generator=g)[:9].int().view(3, 3)
    lens = torch.tensor([5, 20, 48], dtype=torch.int32)
    pos = (lens - 1).long()
    slots = tables[torch.arange(3), pos // 16].long() * 16 + pos % 16
    meta = AttentionMetadata(is_prefill=False, slot_mapping=slots, block_tables=tables, context_lens=lens)
    q, k, v = (torch.randn(3, h, D, generator=g) for h in (4, 1, 1))
    return attn, rotary, pos, q, k, v, meta


def test_attention_with_the_fused_cache_write_matches_the_separate_write(monkeypatch):
    """Attention.rotate_and_store through the kernel (forced on CPU), then forward skipping its write, gives the
    outputs and caches of RoPE then forward's own index_put."""
    from pbs_engine.kernels import rope

    attn, rotary, pos, q, k, v, meta = decode_step()
    k_cache, v_cache = attn.k_cache.clone(), attn.v_cache.clone()
    qr, kr = rotary(pos, q, k)
    expected = attn(qr, kr, v.contiguous(), meta)
    expected_caches = attn.k_cache, attn.v_cache
    attn.k_cache, attn.v_cache = k_cache, v_cache
    monkeypatch.setattr(rope, "use_triton", lambda x: True)
    *qkv, stored = attn.rotate_and_store(rotary, pos, q, k, v, meta)
    assert stored
    torch.testing.assert_close(attn(*qkv, meta, stored=stored), expected, atol=1e-5, rtol=1e-5)
    for got, want in zip((attn.k_cache, attn.v_cache), expected_caches):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_an_fp8_cache_or_no_slots_leave_the_write_to_forward():
    attn, rotary, pos, q, k, v, meta = decode_step(fp8=True)
    assert not attn.rotate_and_store(rotary, pos, q, k, v, meta)[3]
    attn, rotary, pos, q, k, v, meta = decode_step()
    meta.slot_mapping = None
    before = attn.k_cache.clone()
    assert not attn.rotate_and_store(rotary, pos, q, k, v, meta)[3] and torch.equal(attn.k_cache, before)
