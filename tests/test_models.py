"""Our Llama / Qwen2 definitions give transformers' logits on the same weights."""
from __future__ import annotations

import pytest
import torch

from pbs_engine.models.layers.attention import AttentionMetadata
from pbs_engine.models.loader import build_model
from tiny_models import VARIANTS, make_tiny


def prefill_meta(n: int) -> AttentionMetadata:
    cu = torch.tensor([0, n], dtype=torch.int32)
    return AttentionMetadata(is_prefill=True, slot_mapping=None, cu_seqlens_q=cu, cu_seqlens_k=cu,
                             seq_lens_q=[n], seq_lens_k=[n])


@pytest.mark.parametrize("kind", sorted(VARIANTS))
def test_logits_match_transformers(kind, tmp_path):
    ref = make_tiny(kind, tmp_path)
    ours = build_model(tmp_path, torch.device("cpu"), torch.float32, max_position=512)
    ids = torch.randint(0, ref.config.vocab_size, (200,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
        got = ours.compute_logits(ours(ids, torch.arange(len(ids)), prefill_meta(len(ids))))
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-4)
