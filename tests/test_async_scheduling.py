"""Async scheduling: each decode step is launched before the previous one's samples are read back, its input tokens
taken from them on the device. Outputs must equal the synchronous engine's, token for token, whatever finishes,
stops, is aborted or arrives in between; steps that need tokens on the host run synchronously."""
from __future__ import annotations

import pytest

from pbs_engine import LLM, SamplingParams
from pbs_engine.engine.sequence import PLACEHOLDER

PROMPTS = ["Hello, my name is", "The capital of France is", "def fib(n):", "List three colors:"]


def params() -> list[SamplingParams]:
    return [SamplingParams(max_tokens=5, temperature=0), SamplingParams(max_tokens=12, temperature=0),
            SamplingParams(max_tokens=20, temperature=0.8, seed=3),  # seeded: its own generator, same draws
            SamplingParams(max_tokens=15, temperature=0, stop=["\n"])]


@pytest.fixture(scope="module")
def llms(smollm2_path):
    return {a: LLM(str(smollm2_path), device="cpu", async_scheduling=a, max_model_len=1024) for a in (False, True)}


def outputs(results):
    return [(r.outputs[0].token_ids, r.outputs[0].finish_reason, r.outputs[0].text) for r in results]


def count_launches(llm, monkeypatch) -> list:
    calls = []
    launch = llm.engine.runner.launch

    def counted(batch, prev=None):
        calls.append((len(batch.seqs), prev is not None))
        return launch(batch, prev)

    monkeypatch.setattr(llm.engine.runner, "launch", counted)
    return calls


def test_outputs_equal_the_synchronous_engines(llms, monkeypatch):
    calls = count_launches(llms[True], monkeypatch)
    sync, asyn = (outputs(llms[a].generate(PROMPTS, params())) for a in (False, True))
    assert asyn == sync
    assert {r[1] for r in sync} == {"length", "stop"}
    assert len(calls) > 10 and any(chained for _, chained in calls)  # decode steps did pipeline, back to back
    assert not llms[True].engine.has_unfinished() and llms[True].engine._inflight is None


def test_abort_and_a_new_request_between_steps(llms):
    results = {}
    for a, llm in llms.items():
        eng = llm.engine
        ids = [eng.add_request(eng.tokenizer.encode(p), SamplingParams(max_tokens=16, temperature=0))
               for p in PROMPTS[:3]]
        done: dict = {}
        for i in range(40):
            for out in eng.step():
                done[out.request_id] = out
            if i == 4:
                aborted = eng.abort(ids[1])
                assert PLACEHOLDER not in aborted.outputs[0].token_ids and aborted.finished
            if i == 6:
                ids.append(eng.add_request(eng.tokenizer.encode(PROMPTS[3]), SamplingParams(max_tokens=9,
                                                                                           temperature=0)))
            if not eng.has_unfinished():
                break
        assert not eng.has_unfinished()
        results[a] = {k: (v.outputs[0].token_ids, v.outputs[0].finish_reason) for k, v in done.items()
                      if k != ids[1]}
    assert results[True] == results[False] and len(results[True]) == 3
    assert all(PLACEHOLDER not in toks for toks, _ in results[True].values())


def test_penalties_and_logprobs_run_synchronously(llms, monkeypatch):
    calls = count_launches(llms[True], monkeypatch)
    ps = [SamplingParams(max_tokens=8, temperature=0, repetition_penalty=1.3),
          SamplingParams(max_tokens=8, temperature=0, logprobs=2)]
    sync, asyn = (llms[a].generate(PROMPTS[:2], ps) for a in (False, True))
    assert outputs(asyn) == outputs(sync) and calls == []
    assert [lp.keys() for lp in asyn[1].outputs[0].logprobs] == [lp.keys() for lp in sync[1].outputs[0].logprobs]


def test_nothing_stays_in_flight_when_the_last_request_stops_early(llms):
    """A stop string ends the only request while its next step is already launched: that step is settled at once."""
    eng = llms[True].engine
    out = llms[True].generate(["1, 2, 3, 4,"], SamplingParams(max_tokens=30, temperature=0, stop=[" 6"]))[0]
    assert out.outputs[0].finish_reason == "stop" and eng._inflight is None and not eng.has_unfinished()
    assert eng.stats()["kv_free_blocks"] == eng.stats()["kv_total_blocks"]


def test_streamed_outputs_never_carry_a_placeholder(llms):
    eng = llms[True].engine
    eng.add_request(eng.tokenizer.encode(PROMPTS[0]), SamplingParams(max_tokens=10, temperature=0))
    seen = []
    while eng.has_unfinished():
        seen += [out.outputs[0].token_ids for out in eng.step()]
    assert seen and all(PLACEHOLDER not in toks for toks in seen)
    assert [len(t) for t in seen] == sorted(len(t) for t in seen) and len(seen[-1]) == 10


def test_the_cli_flag_reaches_the_engine():
    import argparse

    from pbs_engine.cli.common import add_model_args, llm_kwargs

    p = argparse.ArgumentParser()
    add_model_args(p)
    assert llm_kwargs(p.parse_args(["--async-scheduling"]))["async_scheduling"] is True
    assert llm_kwargs(p.parse_args([]))["async_scheduling"] is False
