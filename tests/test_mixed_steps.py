"""Mixed steps: running streams keep decoding while prompts prefill, short prompts go beside long ones, nobody
starves, and cancelling a prompt mid-prefill frees its cache."""
from __future__ import annotations

import random

from pbs_engine import LLM, SamplingParams
from pbs_engine.engine.block_manager import BlockManager
from pbs_engine.engine.scheduler import Scheduler
from pbs_engine.engine.sequence import Sequence, SequenceStatus

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def seq(name: str, tokens: int, max_tokens: int = 4) -> Sequence:
    s = Sequence(name, None, list(range(tokens)), SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    s.max_tokens = max_tokens
    return s


def run_step(scheduler: Scheduler) -> dict[str, int]:
    """One scheduled step with a fake model: every sequence that completes its pending tokens gets a token."""
    batch = scheduler.schedule()
    assert batch is not None
    done = [batch.completes_prompt(i) for i in range(len(batch.seqs))]
    scheduler.after_step(batch)
    for s, finished_pending in zip(batch.seqs, done):
        if finished_pending:
            s.output_ids.append(7)
            if len(s.output_ids) >= s.max_tokens:
                scheduler.finish(s)
    return dict(zip((s.request_id for s in batch.seqs), batch.num_tokens))


def scheduler(budget: int = 1024, blocks: int = 4096, **kw) -> Scheduler:
    return Scheduler(BlockManager(blocks, 16), max_num_seqs=64, max_num_batched_tokens=budget,
                     chunked_prefill=True, **kw)


def test_running_sequences_decode_in_every_step_of_a_long_prefill():
    sched = scheduler()
    stream = seq("stream", 10, max_tokens=100)
    sched.add(stream)
    run_step(sched)
    sched.add(seq("long", 20_000))
    for _ in range(10):
        step = run_step(sched)
        assert step["stream"] == 1 and step["long"] > 0


def test_a_short_prompt_goes_beside_a_long_one_not_behind_it():
    sched = scheduler(budget=1024)
    sched.add(seq("long", 50_000))
    sched.add(seq("short", 100))
    first = run_step(sched)  # under contention the long prompt takes its capped share only: the step stays short
    assert first == {"long": 256, "short": 100}


def test_running_streams_cap_a_long_prompts_chunk():
    sched = scheduler(budget=1024)
    stream = seq("stream", 10, max_tokens=100)
    sched.add(stream)
    run_step(sched)
    sched.add(seq("long", 50_000))
    assert run_step(sched) == {"stream": 1, "long": 256}
    sched.finish(stream)
    assert run_step(sched) == {"long": 1024}  # alone again: the whole budget


def test_the_default_cap_is_at_most_8k_tokens():
    assert scheduler(budget=131072).long_prefill_token_threshold == 8192
    assert scheduler(budget=4096).long_prefill_token_threshold == 1024


def test_a_prompt_alone_takes_the_whole_budget():
    sched = scheduler(budget=1024)
    sched.add(seq("long", 50_000))
    assert run_step(sched) == {"long": 1024}


def test_no_prompt_starves_under_a_mixed_load():
    """40 prompts of 200-7,000 tokens through a cache that holds a few of them: all finish, and a prompt once
    started never stalls longer than the longest answer being decoded takes to finish (20 steps here)."""
    rng = random.Random(0)
    sched = scheduler(budget=2048, blocks=2000)
    seqs = [seq(f"r{i}", rng.randint(200, 7000), max_tokens=rng.randint(1, 20)) for i in range(40)]
    for s in seqs:
        sched.add(s)
    last, stall, steps = {}, 0, 0  # request -> last step it computed in; the longest stall of a started prompt
    while sched.has_unfinished():
        steps += 1
        assert steps < 2000, "the load never drains"
        for name in run_step(sched):
            if name in last:
                stall = max(stall, steps - last[name])
            last[name] = steps
    assert all(s.status == SequenceStatus.FINISHED and len(s.output_ids) == s.max_tokens for s in seqs)
    assert stall <= 21
    assert sched.blocks.num_free == 2000


def test_a_full_cache_makes_room_by_restarting_a_younger_partial_prefill():
    sched = scheduler(budget=256, blocks=40)  # 640 tokens of cache
    old, young = seq("old", 500), seq("young", 500)
    sched.add(old)
    sched.add(young)
    while old.status != SequenceStatus.FINISHED:
        run_step(sched)
    assert sched.num_preemptions > 0
    while sched.has_unfinished():
        run_step(sched)
    assert young.status == SequenceStatus.FINISHED and sched.blocks.num_free == 40


def test_mixed_steps_give_the_same_greedy_tokens_as_separate_runs(smollm2_path, real_text):
    llm = LLM(str(smollm2_path), device="cpu", attention="dense", max_num_batched_tokens=256,
              enable_prefix_caching=False)
    tok = llm.get_tokenizer()
    long_ids = tok.encode(real_text)[:1200]
    short = "The capital of France is"
    alone = [llm.generate({"prompt_token_ids": long_ids}, GREEDY)[0].token_ids,
             llm.generate(short, GREEDY)[0].token_ids]
    engine = llm.engine
    short_id = engine.add_request(tok.encode(short), GREEDY)
    engine.step()  # the short prompt's prefill; it decodes in every step from here
    long_id = engine.add_request(long_ids, GREEDY)
    finished, mixed_steps = {}, 0
    while engine.has_unfinished():
        batch_had_both = len(engine.scheduler.running) > 0 and len(engine.scheduler.waiting) > 0
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.token_ids
        mixed_steps += batch_had_both
    assert mixed_steps >= 2
    assert [finished[long_id], finished[short_id]] == alone


def test_a_stream_gets_a_token_every_step_while_three_long_prompts_prefill(smollm2_path, real_text):
    llm = LLM(str(smollm2_path), device="cpu", attention="pbs", max_num_batched_tokens=1024,
              enable_prefix_caching=False)
    engine, tok = llm.engine, llm.get_tokenizer()
    ids = tok.encode(real_text)
    stream = engine.add_request(tok.encode("Tell me a story."), SamplingParams(max_tokens=64, ignore_eos=True))
    engine.step()
    longs = [engine.add_request(ids[i * 100:i * 100 + 3000], SamplingParams(max_tokens=1)) for i in range(3)]
    gaps, since = [], 0
    while any(r in engine.seqs for r in longs):
        since += 1
        if any(o.request_id == stream for o in engine.step()):
            gaps.append(since)
            since = 0
    assert len(gaps) >= 8 and max(gaps) == 1  # a token in every step of the 9,000-token prefill
    engine.abort(stream)


def test_abort_during_a_chunked_prefill_frees_every_block(smollm2_path, real_text):
    llm = LLM(str(smollm2_path), device="cpu", attention="dense", max_num_batched_tokens=256,
              enable_prefix_caching=False)
    engine = llm.engine
    rid = engine.add_request(llm.get_tokenizer().encode(real_text)[:2000], GREEDY)
    engine.step()
    engine.step()
    seq = engine.seqs[rid]
    assert 0 < seq.num_computed_tokens < 2000 and seq.block_table
    engine.abort(rid)
    assert not engine.has_unfinished()
    assert llm.stats()["kv_free_blocks"] == llm.stats()["kv_total_blocks"]
