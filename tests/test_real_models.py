"""The real models (SmolLM2-135M-Instruct, Qwen2.5-Coder-0.5B-Instruct) run through our code as transformers does."""
from __future__ import annotations

import pytest
import torch

from pbs_engine import LLM, SamplingParams

NUM_TOKENS = 640


def transformers_nll(model_dir, ids: list[int]) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item()


def our_nll(llm: LLM, ids: list[int]) -> float:
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    lps = [pos[tok].logprob for pos, tok in zip(out.prompt_logprobs[1:], ids[1:])]
    return -sum(lps) / len(lps)


@pytest.mark.parametrize("which", ["smollm2_path", "qwen_path"])
def test_prompt_nll_matches_transformers(which, request, real_text):
    model_dir = request.getfixturevalue(which)
    llm = LLM(str(model_dir), device="cpu", attention="dense")
    ids = llm.get_tokenizer().encode(real_text)[:NUM_TOKENS]
    assert len(ids) == NUM_TOKENS
    ours, theirs = our_nll(llm, ids), transformers_nll(model_dir, ids)
    assert abs(ours - theirs) / theirs < 0.002, (ours, theirs)


def test_default_model_answers_paris():
    llm = LLM(device="cpu")
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=32, temperature=0))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"
