"""Continuous batching, preemption, abort and chunked prefill keep outputs exact and the cache clean."""
from __future__ import annotations

import pytest

from pbs_engine import LLM, SamplingParams

WORDS = ("the river ran past old mills and quiet farms while evening light settled over the valley and "
         "children counted boats drifting slowly toward the distant harbour ").split()


def prompts_of_mixed_lengths(n: int = 12) -> list[str]:
    return [" ".join(WORDS[: 3 + (17 * i) % len(WORDS)] * (1 + i % 3)) for i in range(n)]


GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def one_at_a_time(smollm2):
    return [smollm2.generate(p, GREEDY)[0].token_ids for p in prompts_of_mixed_lengths()]


def test_batched_outputs_equal_one_at_a_time(smollm2, one_at_a_time):
    together = smollm2.generate(prompts_of_mixed_lengths(), GREEDY)
    assert [o.token_ids for o in together] == one_at_a_time


def test_small_cache_preempts_and_still_matches(smollm2_path, one_at_a_time):
    llm = LLM(str(smollm2_path), device="cpu", attention="dense", num_kv_blocks=24, kv_block_size=8,
              max_model_len=128)
    outs = llm.generate(prompts_of_mixed_lengths(), GREEDY)
    assert [o.token_ids for o in outs] == one_at_a_time
    stats = llm.stats()
    assert stats["num_preemptions"] > 0
    assert stats["kv_free_blocks"] == stats["kv_total_blocks"]


def test_abort_frees_blocks_at_once(smollm2):
    engine = smollm2.engine
    ids = [engine.add_request(engine.tokenizer.encode(p), GREEDY) for p in prompts_of_mixed_lengths(4)]
    engine.step()
    engine.step()
    assert smollm2.stats()["kv_free_blocks"] < smollm2.stats()["kv_total_blocks"]
    for rid in ids:
        assert engine.abort(rid).finish_reason == "abort"
    stats = smollm2.stats()
    assert stats["kv_free_blocks"] == stats["kv_total_blocks"] and not engine.has_unfinished()


def test_chunked_prefill_equals_unchunked(smollm2_path, real_text):
    params = SamplingParams(max_tokens=8, temperature=0, prompt_logprobs=0, ignore_eos=True)
    whole = LLM(str(smollm2_path), device="cpu", attention="dense", max_num_batched_tokens=4096)
    chunked = LLM(str(smollm2_path), device="cpu", attention="dense", max_num_batched_tokens=100)
    ids = whole.get_tokenizer().encode(real_text)[:700]
    a = whole.generate({"prompt_token_ids": ids}, params)[0]
    b = chunked.generate({"prompt_token_ids": ids}, params)[0]
    assert a.token_ids == b.token_ids
    for pa, pb, tok in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], ids[1:]):
        assert pa[tok].logprob == pytest.approx(pb[tok].logprob, abs=1e-3)


def test_prompt_longer_than_max_model_len_is_rejected(smollm2_path):
    llm = LLM(str(smollm2_path), device="cpu", max_model_len=32)
    with pytest.raises(ValueError, match="max_model_len=32"):
        llm.generate("word " * 40, SamplingParams(max_tokens=4))


def test_prefix_cache_reuses_shared_prompt_blocks(smollm2_path, real_text):
    """Questions about one document: later requests take the document's cached blocks and answer exactly as
    without the cache; afterwards every block is free again (cached blocks are reclaimable)."""
    cached = LLM(str(smollm2_path), device="cpu", attention="dense", kv_block_size=16)
    plain = LLM(str(smollm2_path), device="cpu", attention="dense", kv_block_size=16, enable_prefix_caching=False)
    tok = cached.get_tokenizer()
    doc = tok.encode(real_text)[:600]
    questions = [doc + tok.encode(f" Question {i}: what does this code do?") for i in range(3)]
    first = cached.generate({"prompt_token_ids": questions[0]}, GREEDY)[0]
    rest = cached.generate([{"prompt_token_ids": q} for q in questions[1:]], GREEDY)
    assert first.metrics.num_cached_tokens == 0
    assert all(o.metrics.num_cached_tokens == 600 // 16 * 16 for o in rest)
    expected = [plain.generate({"prompt_token_ids": q}, GREEDY)[0].token_ids for q in questions]
    assert [o.token_ids for o in (first, *rest)] == expected
    again = cached.generate({"prompt_token_ids": questions[0]}, GREEDY)[0]  # whole prompt cached but its last block
    assert again.token_ids == expected[0] and again.metrics.num_cached_tokens > 600 // 16 * 16
    stats = cached.stats()
    assert stats["kv_free_blocks"] == stats["kv_total_blocks"] and stats["prefix_cache_hit_rate"] > 0.5


def test_prefix_cache_evicts_under_pressure(smollm2_path):
    """A cache too small to keep old prefixes: blocks are reclaimed, outputs stay exact."""
    llm = LLM(str(smollm2_path), device="cpu", attention="dense", num_kv_blocks=12, kv_block_size=8,
              max_model_len=96)
    plain = LLM(str(smollm2_path), device="cpu", attention="dense", num_kv_blocks=12, kv_block_size=8,
                max_model_len=96, enable_prefix_caching=False)
    prompts = prompts_of_mixed_lengths(6)
    for p in prompts + prompts[:2]:
        assert llm.generate(p, GREEDY)[0].token_ids == plain.generate(p, GREEDY)[0].token_ids
    stats = llm.stats()
    assert stats["kv_free_blocks"] == stats["kv_total_blocks"]
