"""Tensor parallelism over torch.distributed (gloo on the CPU): the ranks' slices give the one-rank model's
tokens and log-probs, bad sizes are refused by name, and a dead worker stops the engine instead of hanging it."""
from __future__ import annotations

import os
import signal
import time

import pytest

from pbs_engine import LLM, PBSConfig, SamplingParams
from pbs_engine.engine.workers import WorkerError
from tiny_models import make_tiny

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=3, prompt_logprobs=2)
PROMPTS = [{"prompt_token_ids": [(7 * i + 3) % 300 for i in range(n)]} for n in (3, 70, 300)]


def outputs(llm: LLM) -> list:
    return llm.generate(PROMPTS, GREEDY)


def assert_same(ours, ref) -> None:
    for a, b in zip(ours, ref):
        assert a.token_ids == b.token_ids
        for got, want in zip(a.logprobs + a.prompt_logprobs[1:], b.logprobs + b.prompt_logprobs[1:]):
            assert got.keys() == want.keys()
            assert all(abs(got[t].logprob - want[t].logprob) < 1e-4 for t in got)


@pytest.mark.parametrize("kind, size", [("qwen2_tied", 2), ("llama_gqa_llama3", 2), ("llama_tied", 4)],
                         ids=["qwen2-bias-tied", "kv-heads-replicated", "four-ranks"])
@pytest.mark.parametrize("attention", ["dense", "pbs"])
def test_ranks_give_the_single_device_model(tmp_path, kind, size, attention):
    make_tiny(kind, tmp_path)
    kw = dict(device="cpu", skip_tokenizer_init=True, attention=attention, max_num_batched_tokens=128,
              pbs=PBSConfig(block_size=16, segment_size=32, budget=0.5))
    ref = outputs(LLM(str(tmp_path), **kw))
    llm = LLM(str(tmp_path), tensor_parallel_size=size, **kw)
    try:
        ours = outputs(llm)
        assert_same(ours, ref)
        if attention == "pbs":  # the block statistics of every rank's heads add up to the one-rank figure
            assert [o.metrics.prefill_density for o in ours] == [o.metrics.prefill_density for o in ref]
    finally:
        llm.shutdown()


def test_real_smollm2_over_three_ranks_matches_one(smollm2, smollm2_path):
    """SmolLM2-135M has 9 query and 3 KV heads: three ranks of 3 and 1."""
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    prompt = "The three primary colours are"
    ref = smollm2.generate(prompt, params)[0]
    llm = LLM(str(smollm2_path), device="cpu", attention="dense", tensor_parallel_size=3)
    try:
        assert llm.generate(prompt, params)[0].token_ids == ref.token_ids
    finally:
        llm.shutdown()


def test_a_size_that_does_not_divide_the_heads_is_named(smollm2_path):
    with pytest.raises(ValueError, match="tensor_parallel_size=2 does not divide .*num_attention_heads=9"):
        LLM(str(smollm2_path), device="cpu", tensor_parallel_size=2)


def test_more_ranks_than_gpus_is_named(smollm2_path):
    with pytest.raises(ValueError, match="tensor_parallel_size|CUDA"):
        LLM(str(smollm2_path), device="cuda", tensor_parallel_size=2)


def test_a_dead_worker_stops_the_engine_with_its_error(tmp_path):
    make_tiny("qwen2_tied", tmp_path)
    llm = LLM(str(tmp_path), device="cpu", skip_tokenizer_init=True, tensor_parallel_size=2)
    try:
        llm.generate(PROMPTS[0], GREEDY)
        os.kill(llm.engine.workers.procs[0].pid, signal.SIGKILL)
        start = time.time()
        with pytest.raises(WorkerError, match="worker 1"):
            llm.generate(PROMPTS[1], GREEDY)
        assert time.time() - start < 30
    finally:
        llm.shutdown()


def test_generate_command_runs_over_three_ranks(smollm2_path):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "pbs_engine.cli.main", "generate", "--model", str(smollm2_path),
                          "--device", "cpu", "--tensor-parallel-size", "3", "--max-tokens", "8", "--raw",
                          "--temperature", "0", "Paris is the capital of"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()
