"""Each way a model directory can be wrong gives its own named error that says what is wrong."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pbs_engine.models.errors import (InvalidConfigError, MissingShardError, MissingTensorError, ModelNotFoundError,
                                      ShapeMismatchError, UnexpectedTensorError, UnsupportedArchitectureError)
from pbs_engine.models.loader import build_model
from tiny_models import make_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_tiny("qwen2_untied", path)
    return path


def copy_with(tiny_dir, dst, edit_tensors=None, edit_config=None):
    tensors = load_file(tiny_dir / "model.safetensors")
    config = json.loads((tiny_dir / "config.json").read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    save_file(tensors, dst / "model.safetensors")
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def load(path):
    return build_model(path, torch.device("cpu"), torch.float32, max_position=64)


def test_missing_directory(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load(tmp_path / "nope")


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="no model.safetensors"):
        load(tmp_path)


def test_missing_shard(tiny_dir, tmp_path):
    copy_with(tiny_dir, tmp_path)
    index = {"weight_map": {"model.embed_tokens.weight": "model.safetensors",
                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MissingShardError, match="model-00002-of-00002.safetensors"):
        load(tmp_path)


def test_sharded_checkpoint_loads(tiny_dir, tmp_path):
    tensors = load_file(tiny_dir / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / shard)
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    model = load(tmp_path)
    torch.testing.assert_close(model.lm_head.weight, tensors["lm_head.weight"])


def test_missing_tensor(tiny_dir, tmp_path):
    copy_with(tiny_dir, tmp_path, edit_tensors=lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(MissingTensorError, match=r"model\.layers\.1\.self_attn\.qkv_proj\.weight"):
        load(tmp_path)


def test_unexpected_tensor(tiny_dir, tmp_path):
    copy_with(tiny_dir, tmp_path, edit_tensors=lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(UnexpectedTensorError, match="model.extra.weight"):
        load(tmp_path)


def test_shape_mismatch(tiny_dir, tmp_path):
    def shrink(t):
        t["model.norm.weight"] = t["model.norm.weight"][:-1].clone()

    copy_with(tiny_dir, tmp_path, edit_tensors=shrink)
    with pytest.raises(ShapeMismatchError, match=r"model\.norm\.weight.*\(63,\).*\(64,\)"):
        load(tmp_path)


def test_shape_mismatch_in_merged_projection(tiny_dir, tmp_path):
    def shrink(t):
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:-1].clone()

    copy_with(tiny_dir, tmp_path, edit_tensors=shrink)
    with pytest.raises(ShapeMismatchError, match="up_proj"):
        load(tmp_path)


def test_unsupported_architecture(tiny_dir, tmp_path):
    copy_with(tiny_dir, tmp_path, edit_config=lambda c: c.update(architectures=["MambaForCausalLM"]))
    with pytest.raises(UnsupportedArchitectureError, match="MambaForCausalLM"):
        load(tmp_path)


def test_config_missing_field(tiny_dir, tmp_path):
    copy_with(tiny_dir, tmp_path, edit_config=lambda c: c.pop("hidden_size"))
    with pytest.raises(InvalidConfigError, match="hidden_size"):
        load(tmp_path)


def test_qwen_1m_config_loads():
    """Qwen2.5-7B-Instruct-1M's config (rope_theta 1e7, 1,010,000 positions, dual-chunk settings) is accepted."""
    from pbs_engine.models.config import ModelConfig

    raw = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584, "intermediate_size": 18944,
           "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
           "rope_theta": 10000000.0, "max_position_embeddings": 1010000, "rms_norm_eps": 1e-05,
           "sliding_window": 32768, "use_sliding_window": False, "tie_word_embeddings": False,
           "dual_chunk_attention_config": {"chunk_size": 262144, "local_size": 8192, "original_max_position_embeddings": 262144}}
    cfg = ModelConfig.from_dict(raw)
    assert (cfg.max_position_embeddings, cfg.rope_theta, cfg.head_dim, cfg.attention_bias) == (1010000, 1e7, 128, True)
