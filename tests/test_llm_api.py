"""The `LLM` API on the real SmolLM2: prompts, sampling controls, stops, logprobs, metrics, errors."""
from __future__ import annotations

import pytest

from pbs_engine import SamplingParams

PROMPTS = ["The history of Rome begins", "def quicksort(items):", "Water boils at"]


def test_string_and_token_id_prompts_agree(smollm2):
    ids = smollm2.get_tokenizer().encode(PROMPTS[0])
    a, b = smollm2.generate([PROMPTS[0], {"prompt_token_ids": ids}], SamplingParams(max_tokens=12, temperature=0))
    assert a.token_ids == b.token_ids and a.text == b.text


def test_batched_greedy_equals_one_at_a_time(smollm2):
    params = SamplingParams(max_tokens=10, temperature=0)
    together = [o.token_ids for o in smollm2.generate(PROMPTS, params)]
    alone = [smollm2.generate(p, params)[0].token_ids for p in PROMPTS]
    assert together == alone


def test_seeded_sampling_is_reproducible(smollm2):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, seed=1234)
    first = smollm2.generate(PROMPTS, params)
    again = smollm2.generate(PROMPTS[::-1], params)[::-1]  # batch position must not matter
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    other = smollm2.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, seed=99))
    assert [o.token_ids for o in other] != [o.token_ids for o in first]


def test_top_k_one_is_greedy(smollm2):
    greedy = smollm2.generate(PROMPTS[1], SamplingParams(max_tokens=12, temperature=0))[0]
    top1 = smollm2.generate(PROMPTS[1], SamplingParams(max_tokens=12, temperature=1.5, top_k=1, seed=3))[0]
    assert greedy.token_ids == top1.token_ids


def test_max_tokens_finishes_with_length(smollm2):
    out = smollm2.generate(PROMPTS[0], SamplingParams(max_tokens=7, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"


def test_stop_string_truncates_and_reports(smollm2):
    full = smollm2.generate(PROMPTS[1], SamplingParams(max_tokens=24, temperature=0))[0].text
    stop = full.strip().split()[2]
    out = smollm2.generate(PROMPTS[1], SamplingParams(max_tokens=24, temperature=0, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop
    assert out.text == full[:full.index(stop)]


def test_stop_token_id_ends_generation(smollm2):
    greedy = smollm2.generate(PROMPTS[2], SamplingParams(max_tokens=10, temperature=0))[0]
    stop_id = greedy.token_ids[3]
    out = smollm2.generate(PROMPTS[2], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_id]))[0]
    assert out.token_ids == greedy.token_ids[:greedy.token_ids.index(stop_id) + 1]
    assert out.outputs[0].stop_reason == stop_id


def test_logprobs_hold_sampled_token_and_top_k(smollm2):
    out = smollm2.generate(PROMPTS[0], SamplingParams(max_tokens=5, temperature=0, logprobs=3))[0]
    assert len(out.logprobs) == 5
    for tok, pos in zip(out.token_ids, out.logprobs):
        assert pos[tok].rank == 1  # greedy picks the most likely token
        assert len(pos) == 3 and all(lp.logprob <= 0 for lp in pos.values())
    assert out.outputs[0].cumulative_logprob == pytest.approx(sum(p[t].logprob for t, p in zip(out.token_ids, out.logprobs)))


def test_prompt_logprobs_have_vllm_shape(smollm2):
    out = smollm2.generate(PROMPTS[0], SamplingParams(max_tokens=1, prompt_logprobs=2))[0]
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids)
    for tok, pos in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
        assert tok in pos and len(pos) >= 2


def test_metrics_are_filled(smollm2):
    out = smollm2.generate(PROMPTS[0], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    m = out.metrics
    assert m.num_prompt_tokens == len(out.prompt_token_ids) and m.num_generated_tokens == 4
    assert 0 <= m.queue_time <= m.ttft and m.time_per_output_token > 0


def test_cache_is_free_after_requests(smollm2):
    smollm2.generate(PROMPTS, SamplingParams(max_tokens=5))
    stats = smollm2.stats()
    assert stats["kv_free_blocks"] == stats["kv_total_blocks"] and stats["num_running"] == stats["num_waiting"] == 0


def test_chat_accepts_several_conversations(smollm2):
    convs = [[{"role": "user", "content": "Say hi."}], [{"role": "user", "content": "Name a colour."}]]
    outs = smollm2.chat(convs, SamplingParams(max_tokens=8, temperature=0))
    assert len(outs) == 2 and all(o.text for o in outs)


@pytest.mark.parametrize("prompt, params, problem", [
    ({"prompt_token_ids": []}, SamplingParams(), "empty"),
    ({"prompt_token_ids": [1, 10**9]}, SamplingParams(), "outside the vocabulary"),
    ("hello", SamplingParams(max_tokens=10**6), "max_model_len"),
])
def test_bad_requests_are_named_and_engine_keeps_working(smollm2, prompt, params, problem):
    with pytest.raises(ValueError, match=problem):
        smollm2.generate(prompt, params)
    assert smollm2.generate("Hello", SamplingParams(max_tokens=2))[0].token_ids


@pytest.mark.parametrize("field, value", [("temperature", -1), ("top_p", 0), ("top_k", -5), ("max_tokens", 0),
                                          ("min_p", 2), ("logprobs", 50), ("stop", [""])])
def test_bad_sampling_params_are_named(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_bad_prompt_type_is_named(smollm2):
    with pytest.raises(TypeError, match=r"prompts\[0\]"):
        smollm2.generate([123])


def test_streamed_text_never_shows_part_of_a_stop_string(smollm2):
    full = smollm2.generate(PROMPTS[1], SamplingParams(max_tokens=24, temperature=0))[0].text
    stop = full.strip().split()[3]
    engine = smollm2.engine
    rid = engine.add_request(engine.tokenizer.encode(PROMPTS[1]), SamplingParams(max_tokens=24, temperature=0,
                                                                                  stop=[stop]))
    seen = []
    while engine.has_unfinished():
        seen += [o.text for o in engine.step() if o.request_id == rid]
    # each streamed text extends the previous one: nothing later cut away (a partial stop string) was ever shown
    assert all(a == b[:len(a)] for a, b in zip(seen, seen[1:]))
    assert seen[-1] == full[:full.index(stop)]


def test_each_request_reports_the_density_its_prefill_achieved(smollm2_path, real_text):
    from pbs_engine import LLM, PBSConfig

    llm = LLM(str(smollm2_path), device="cpu", attention="pbs", pbs=PBSConfig.budget_of(0.3),
              enable_prefix_caching=False)
    long_prompt = {"prompt_token_ids": llm.get_tokenizer().encode(real_text)[:1500]}
    out = llm.generate(long_prompt, SamplingParams(max_tokens=1))[0]
    m = out.metrics  # forced blocks (first, diagonal segment, last query block) weigh much at 12 blocks
    assert m.pbs_visible_blocks > 0 and 0.3 <= m.prefill_density < 0.9
    llm.set_prefill_attention("dense")
    assert llm.generate(long_prompt, SamplingParams(max_tokens=1))[0].metrics.prefill_density == 1.0


def test_stream_yields_growing_outputs_then_the_finished_one(smollm2):
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    seen = [(o.text, len(o.token_ids), o.finished) for o in smollm2.stream(PROMPTS[0], params)]
    assert [n for _, n, _ in seen] == list(range(1, 9)) and [f for *_, f in seen] == [False] * 7 + [True]
    assert all(b.startswith(a) for (a, *_), (b, *_) in zip(seen, seen[1:]))
    assert seen[-1][0] == smollm2.generate(PROMPTS[0], params)[0].text


def test_stream_outputs_first_appear_in_prompt_order(smollm2):
    first_seen = []
    for out in smollm2.stream(PROMPTS, SamplingParams(max_tokens=3, temperature=0)):
        if out.prompt not in first_seen:
            first_seen.append(out.prompt)
    assert first_seen == PROMPTS


def test_closing_a_stream_aborts_its_requests(smollm2):
    stream = smollm2.stream(PROMPTS, SamplingParams(max_tokens=50, temperature=0))
    next(stream)
    stream.close()
    assert not smollm2.engine.has_unfinished()


def test_a_bad_prompt_fails_the_stream_call_before_anything_is_queued(smollm2):
    with pytest.raises(ValueError, match="empty"):
        smollm2.stream(["Hello", {"prompt_token_ids": []}], SamplingParams())
    assert not smollm2.engine.has_unfinished()


def test_stream_keeps_prompt_order_when_a_short_prompt_overtakes_a_long_one(smollm2_path, real_text):
    from pbs_engine import LLM

    llm = LLM(str(smollm2_path), device="cpu", attention="dense", max_num_batched_tokens=256)
    long_prompt = {"prompt_token_ids": llm.get_tokenizer().encode(real_text)[:1000]}
    outs = list(llm.stream([long_prompt, "Hi"], SamplingParams(max_tokens=3, temperature=0)))
    firsts = list(dict.fromkeys(o.request_id for o in outs))
    assert len(firsts) == 2 and outs[0].request_id == firsts[0] and outs[0].prompt is None  # the long one first
    assert sum(o.finished for o in outs) == 2
