"""FP8 checkpoints loaded as they are (compressed-tensors / vLLM layout: e4m3 projection weights with a
`weight_scale` per output channel or per tensor, declared by config.json's quantization_config), on the CPU with the
real SmolLM2: the same model as quantising the full-precision checkpoint at load, and clear errors for what is not
supported."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pbs_engine import LLM, SamplingParams
from pbs_engine.kernels import FP8_DTYPE, quantize_weight
from pbs_engine.kernels.fp8 import FP8_MAX
from pbs_engine.models.config import ModelConfig
from pbs_engine.models.errors import InvalidConfigError, MissingTensorError, UnsupportedDtypeError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
COMPRESSED = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
              "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": {
                  "num_bits": 8, "type": "float", "strategy": "token", "dynamic": True},
                  "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True}}}}


def write_fp8_checkpoint(src, dst, strategy="channel", config=None, skip=()):
    """src's projections as e4m3 with per-channel ((N, 1)) or per-tensor (scalar) float32 scales."""
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    out = {}
    for name, t in tensors.items():
        if name.rpartition(".")[0].rpartition(".")[2] in PROJECTIONS and name.endswith(".weight"):
            w = t.float()
            if strategy == "channel":
                w8, scale = quantize_weight(w)
                scale = scale[:, None]
            else:
                scale = (w.abs().amax() / FP8_MAX).float()
                w8 = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
            out[name] = w8
            if name not in skip:
                out[name.replace(".weight", ".weight_scale")] = scale.contiguous()
            out[name.replace(".weight", ".input_scale")] = torch.tensor(1.0)  # static scales are ignored
        else:
            out[name] = t
    save_file(out, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = config or COMPRESSED
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


KW = dict(device="cpu", attention="dense", enable_prefix_caching=False, max_model_len=1024)


def prompt_logprobs(llm, ids):
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=1))[0]
    return [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])], out.token_ids


def test_a_per_channel_checkpoint_is_the_model_quantised_at_load(smollm2_path, tmp_path, real_text):
    fp8_dir = write_fp8_checkpoint(smollm2_path, tmp_path / "fp8")
    loaded, quantised = LLM(str(fp8_dir), **KW), LLM(str(smollm2_path), quantization="fp8", **KW)
    layer = loaded.model.model.layers[0]
    assert layer.self_attn.qkv_proj.weight.dtype == FP8_DTYPE and layer.mlp.gate_up_proj.weight_scale.dtype == \
        torch.float32
    assert loaded.stats()["weight_dtype"] == "float8_e4m3fn"  # FP8 without --quantization: the checkpoint says so
    ids = loaded.get_tokenizer().encode(real_text)[:200]
    a, b = prompt_logprobs(loaded, ids), prompt_logprobs(quantised, ids)
    assert a[1] == b[1]
    torch.testing.assert_close(torch.tensor(a[0]), torch.tensor(b[0]), rtol=0, atol=1e-5)


def test_a_per_tensor_checkpoint_predicts_like_the_full_precision_model(smollm2_path, tmp_path, real_text):
    fp8_dir = write_fp8_checkpoint(smollm2_path, tmp_path / "fp8t", strategy="tensor",
                                   config={"quant_method": "fp8", "activation_scheme": "dynamic"})
    loaded, ref = LLM(str(fp8_dir), **KW), LLM(str(smollm2_path), **KW)
    scale = loaded.model.model.layers[0].self_attn.qkv_proj.weight_scale
    assert scale.shape == (loaded.model.model.layers[0].self_attn.qkv_proj.weight.shape[0],)
    ids = loaded.get_tokenizer().encode(real_text)[:200]
    nll = [-sum(lp) / len(lp) for lp, _ in (prompt_logprobs(llm, ids) for llm in (loaded, ref))]
    assert nll[0] < nll[1] * 1.10  # one scale per tensor is coarser than per channel, still close


def test_unsupported_fp8_schemes_are_refused_naming_the_field():
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    with pytest.raises(InvalidConfigError, match="weight_block_size"):
        ModelConfig.from_dict({**base, "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}})
    int4 = json.loads(json.dumps(COMPRESSED))
    int4["config_groups"]["group_0"]["weights"].update(num_bits=4, type="int")
    with pytest.raises(InvalidConfigError, match="config_groups.group_0.weights"):
        ModelConfig.from_dict({**base, "quantization_config": int4})
    with pytest.raises(InvalidConfigError, match="quant_method 'awq'"):
        ModelConfig.from_dict({**base, "quantization_config": {"quant_method": "awq"}})
    assert ModelConfig.from_dict({**base, "quantization_config": COMPRESSED}).quantization == "fp8"
    assert ModelConfig.from_dict(base).quantization is None


def test_a_missing_scale_or_an_unquantised_projection_is_a_clear_load_error(smollm2_path, tmp_path):
    missing = write_fp8_checkpoint(smollm2_path, tmp_path / "noscale", skip=("model.layers.0.mlp.down_proj.weight",))
    with pytest.raises(MissingTensorError, match="down_proj.weight_scale"):
        LLM(str(missing), **KW)
    mixed = write_fp8_checkpoint(smollm2_path, tmp_path / "mixed")
    tensors = load_file(str(mixed / "model.safetensors"))
    tensors["model.layers.0.self_attn.o_proj.weight"] = tensors["model.layers.0.self_attn.o_proj.weight"].float()
    save_file(tensors, str(mixed / "model.safetensors"))
    with pytest.raises(UnsupportedDtypeError, match="o_proj.weight.*F8_E4M3"):
        LLM(str(mixed), **KW)
