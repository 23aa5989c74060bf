"""The prefill fast path's host side: PBS falls back to dense below `min_length`, the step's tensors are packed
right, and the runner sizes the prefill chunk from memory."""
from __future__ import annotations

import torch

from pbs_engine import LLM, PBSConfig, SamplingParams
from pbs_engine.kernels.selection import block_geometry, dense_stats

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def test_pbs_below_min_length_runs_dense_and_says_so(smollm2_path, real_text):
    llm = LLM(str(smollm2_path), device="cpu", attention="dense", enable_prefix_caching=False)
    prompt = {"prompt_token_ids": llm.get_tokenizer().encode(real_text)[:1200]}
    dense = llm.generate(prompt, GREEDY)[0]
    llm.set_prefill_attention("pbs", PBSConfig.budget_of(0.3, PBSConfig(min_length=1201)))
    fallback = llm.generate(prompt, GREEDY)[0]
    assert fallback.outputs[0].token_ids == dense.outputs[0].token_ids
    assert fallback.metrics.prefill_density == 1.0  # counted as fully dense
    llm.set_prefill_attention("pbs", PBSConfig.budget_of(0.3, PBSConfig(min_length=1200)))
    assert llm.generate(prompt, GREEDY)[0].metrics.prefill_density < 0.9  # at min_length PBS runs


def test_min_length_defaults_per_device():
    assert PBSConfig().dense_below(torch.device("cpu")) == 0
    assert PBSConfig().dense_below(torch.device("cuda")) >= 8192
    assert PBSConfig(min_length=5).dense_below(torch.device("cuda")) == 5


def test_dense_stats_count_every_visible_pair():
    cfg = PBSConfig()
    stats = dense_stats(cfg, 300, 1000, 3, torch.device("cpu"))
    visible = int(block_geometry(cfg, 300, 1000).visible.sum())
    assert stats.kept.tolist() == [visible] * 3 and stats.density == 1.0


def test_step_tensors_are_packed_in_one_transfer(smollm2_path):
    """Two prefill rows after a decode row: ids, positions, cache slots and per-row lengths as the model needs."""
    llm = LLM(str(smollm2_path), device="cpu", attention="dense", enable_prefix_caching=False, kv_block_size=16)
    engine, runner = llm.engine, llm.engine.runner
    engine.add_request(list(range(100, 140)), SamplingParams(max_tokens=4, ignore_eos=True))
    engine.step()  # the first prompt is prefilled and decodes from now on
    engine.add_request(list(range(200, 250)), GREEDY)
    engine.add_request(list(range(300, 333)), GREEDY)
    batch = engine.scheduler.schedule()
    inp = runner.prepare(batch)
    runner._plan_logits(batch, inp)
    ids, positions, meta, logit_rows = runner._tensors(inp)
    assert batch.num_decodes == 1 and meta.num_decode_tokens == 1
    assert ids.tolist() == [batch.seqs[0].output_ids[-1]] + list(range(200, 250)) + list(range(300, 333))
    assert positions.tolist() == [40] + list(range(50)) + list(range(33))
    for seq, start, n, first in zip(batch.seqs, (40, 0, 0), (1, 50, 33), (0, 1, 51)):
        slots = meta.slot_mapping[first:first + n].tolist()
        assert slots == [seq.block_table[p // 16] * 16 + p % 16 for p in range(start, start + n)]
    assert meta.cu_seqlens_q.tolist() == [0, 50, 83] and meta.cu_seqlens_k.tolist() == [0, 50, 83]
    assert meta.row_cu_seqlens.tolist() == [[[0, 50], [0, 50]], [[0, 33], [0, 33]]]
    assert meta.context_lens.tolist() == [41]
    assert meta.block_tables.shape[0] == 3 and meta.block_tables.dtype == torch.int32
    assert [r.tolist() for r in logit_rows] == [[0, 50, 83]]  # each row's last token: the rows sampled from


def test_the_prefill_chunk_is_the_largest_that_fits(smollm2_path):
    llm = LLM(str(smollm2_path), device="cpu", max_model_len=8192)
    runner = llm.engine.runner
    need = {c: runner.prefill_memory(c, 8192) for c in (8192,)}
    assert need[8192] > runner.prefill_memory(4096, 8192) > 0
    assert runner._prefill_chunk(room=1e12, kv_needed=0) == 8192  # capped at max_model_len
    assert runner._prefill_chunk(room=3 * need[8192], kv_needed=0) == 8192
    assert runner._prefill_chunk(room=3 * need[8192] - 1, kv_needed=0) == 8192  # the smallest choice: 8K
    runner.config.max_model_len = 1 << 20
    big = runner.prefill_memory(131072, 1 << 20)
    assert runner._prefill_chunk(room=3 * big, kv_needed=0) == 131072
    half = runner.prefill_memory(65536, 1 << 20)
    assert runner._prefill_chunk(room=3 * big, kv_needed=3 * big - half) == 65536  # the KV cache must still fit
