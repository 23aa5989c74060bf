"""FP8 weights end to end on the CPU (the dequantising reference path): the engine quantises every decoder
projection, says so, and predicts the real text about as well as the unquantised model."""
from __future__ import annotations

import math

import pytest
import torch

from pbs_engine import LLM, SamplingParams
from pbs_engine.kernels import FP8_DTYPE


@pytest.fixture(scope="module")
def pair(smollm2_path):
    kwargs = dict(device="cpu", attention="dense", enable_prefix_caching=False, max_model_len=1024)
    return LLM(str(smollm2_path), **kwargs), LLM(str(smollm2_path), quantization="fp8", **kwargs)


def test_fp8_quantises_the_decoder_projections_only(pair):
    _, fp8 = pair
    layer = fp8.model.model.layers[0]
    for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
        assert linear.weight.dtype == FP8_DTYPE and linear.weight_scale.shape == (linear.weight.shape[0],)
    assert fp8.model.lm_head.weight.dtype == torch.float32
    assert fp8.stats()["weight_dtype"] == "float8_e4m3fn" and pair[0].stats()["weight_dtype"] == "float32"


def test_fp8_predicts_real_text_as_well_as_the_full_precision_model(pair, real_text):
    """Teacher-forced NLL over 300 tokens of real text within 3% of the unquantised model's (W8A8 e4m3 with
    per-channel and per-token scales), and the same top-1 prediction at most positions."""
    ref, fp8 = pair
    ids = ref.get_tokenizer().encode(real_text)[:300]
    params = SamplingParams(max_tokens=1, prompt_logprobs=1)
    nll, top1 = {}, {}
    for name, llm in (("ref", ref), ("fp8", fp8)):
        out = llm.generate({"prompt_token_ids": ids}, params)[0]
        scored = [d[tok].logprob for d, tok in zip(out.prompt_logprobs[1:], ids[1:])]
        nll[name] = -sum(scored) / len(scored)
        top1[name] = [next(t for t, lp in d.items() if lp.rank == 1) for d in out.prompt_logprobs[1:]]
    assert math.isfinite(nll["fp8"]) and nll["fp8"] <= nll["ref"] * 1.03
    agree = sum(a == b for a, b in zip(top1["ref"], top1["fp8"])) / len(top1["ref"])
    assert agree >= 0.85


def test_unknown_quantization_is_refused(smollm2_path):
    with pytest.raises(ValueError, match="quantization='int3'"):
        LLM(str(smollm2_path), device="cpu", quantization="int3")


def test_fp8_kv_cache_holds_more_tokens_and_predicts_as_well(smollm2_path, real_text):
    """The e4m3 cache (a scale per token and head) fits ~3.8x the blocks of a float32 one in the same memory, and
    a prompt prefilled in 128-token chunks (each chunk reads the earlier ones back from the cache, dequantised)
    scores the real text within 3% of the float32 cache, with the same top-1 prediction at most positions."""
    kwargs = dict(device="cpu", attention="dense", enable_prefix_caching=False, max_model_len=1024,
                  max_num_batched_tokens=128, kv_cache_memory="64MiB")
    ref, fp8 = LLM(str(smollm2_path), **kwargs), LLM(str(smollm2_path), kv_cache_dtype="fp8", **kwargs)
    assert fp8.stats()["kv_cache_dtype"] == "float8_e4m3fn"
    assert fp8.stats()["kv_total_blocks"] >= 3.5 * ref.stats()["kv_total_blocks"]
    ids = ref.get_tokenizer().encode(real_text)[:600]
    params = SamplingParams(max_tokens=4, prompt_logprobs=1, temperature=0, ignore_eos=True)
    nll, top1 = {}, {}
    for name, llm in (("ref", ref), ("fp8", fp8)):
        out = llm.generate({"prompt_token_ids": ids}, params)[0]
        scored = [d[tok].logprob for d, tok in zip(out.prompt_logprobs[1:], ids[1:])]
        nll[name] = -sum(scored) / len(scored)
        top1[name] = [next(t for t, lp in d.items() if lp.rank == 1) for d in out.prompt_logprobs[1:]]
        assert len(out.outputs[0].token_ids) == 4  # decode reads the FP8 cache too
    assert nll["fp8"] <= nll["ref"] * 1.03
    assert sum(a == b for a, b in zip(top1["ref"], top1["fp8"])) / len(top1["ref"]) >= 0.9


def test_unknown_kv_cache_dtype_is_refused(smollm2_path):
    with pytest.raises(ValueError, match="kv_cache_dtype='int4'"):
        LLM(str(smollm2_path), device="cpu", kv_cache_dtype="int4")
