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


def test_cpu_mlp_in_row_chunks_gives_the_same_logits(monkeypatch, tmp_path):
    """On CPU the MLP runs CPU_MLP_ROWS tokens at a time; a prompt over several chunks still matches transformers."""
    from pbs_engine.models import llama

    monkeypatch.setattr(llama, "CPU_MLP_ROWS", 64)
    test_logits_match_transformers("llama_gqa_llama3", tmp_path)


def test_pbs_runs_in_every_layer_and_reports_its_stats(tmp_path):
    """Prefill with PBS: every attention layer runs the sparse path and reports its stats; the logits differ from
    dense attention's under a small budget."""
    from pbs_engine.kernels import PBSConfig

    make_tiny("llama_gqa_llama3", tmp_path)
    model = build_model(tmp_path, torch.device("cpu"), torch.float32, max_position=512)
    ids = torch.randint(0, 320, (300,), generator=torch.Generator().manual_seed(2))

    def run(method, pbs):
        meta, stats = prefill_meta(len(ids)), []
        meta.prefill_method, meta.pbs, meta.pbs_stats = method, pbs, stats
        with torch.no_grad():
            return model.compute_logits(model(ids, torch.arange(len(ids)), meta)), [layer for layer, _, _ in stats]

    dense, layers = run("dense", None)
    assert layers == []
    sparse, layers = run("pbs", PBSConfig(block_size=16, segment_size=32, budget=0.2))
    assert layers == [0, 1]
    assert not torch.allclose(sparse, dense)
