"""Each way a model directory can be wrong gives its own named error that says what is wrong; through the CLI, one
line naming the file (or field) at fault and exit code 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import corrupt_models
import fixtures
from corrupt_models import CASES
from pbs_engine.cli.main import main
from pbs_engine.models import loader
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


# --- corrupt copies of the real SmolLM2 directory, through the CLI ---------------------------------------------------

WEIGHTS_INTEGRITY = [c for c in CASES if c.startswith(("weights", "index")) and c not in corrupt_models.AGAINST_MODEL]


@pytest.fixture
def corrupt_model(request, smollm2_path, tmp_path) -> tuple[Path, str]:
    """(the directory of corrupt case request.param, the file or field its error must name)."""
    return corrupt_models.build(request.param, smollm2_path, tmp_path / "model"), CASES[request.param][1]


def generate(model: Path, capsys) -> tuple[int, str]:
    """Exit code and stderr of the command, less its progress lines ("loading model ...")."""
    code = main(["generate", "--model", str(model), "--device", "cpu", "--max-tokens", "1", "hi"])
    return code, without_progress(capsys.readouterr().err)


def without_progress(err: str) -> str:
    return "".join(line for line in err.splitlines(keepends=True) if not line.startswith("pbs-engine: loading "))


@pytest.mark.parametrize("corrupt_model", list(CASES), indirect=True)
def test_corrupt_model_fails_with_one_line_naming_the_file(corrupt_model, capsys):
    model, named = corrupt_model
    code, err = generate(model, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("pbs-engine: error: ")
    assert named in err


@pytest.mark.parametrize("corrupt_model", WEIGHTS_INTEGRITY, indirect=True)
def test_corrupt_weights_fail_before_the_model_is_built(corrupt_model, capsys, monkeypatch):
    def built(*args):
        raise AssertionError("the model was built")

    monkeypatch.setattr(loader, "MODEL_CLASSES", dict.fromkeys(loader.MODEL_CLASSES, built))
    assert generate(corrupt_model[0], capsys)[0] == 2


@pytest.mark.parametrize("corrupt_model", sorted(corrupt_models.AGAINST_MODEL), indirect=True)
def test_tensor_mismatches_fail_before_any_weight_is_read(corrupt_model, capsys, monkeypatch):
    def read(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(loader, "safe_open", read)
    assert generate(corrupt_model[0], capsys)[0] == 2


def test_truncated_weights_exit_2_with_one_line_from_the_command(smollm2_path, tmp_path):
    model = corrupt_models.build("weights truncated to half", smollm2_path, tmp_path / "model")
    run = subprocess.run([sys.executable, "-m", "pbs_engine.cli.main", "generate", "--model", str(model),
                          "--device", "cpu", "--max-tokens", "1", "hi"], capture_output=True, text=True, check=False,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    weights, real = model / "model.safetensors", smollm2_path / "model.safetensors"
    assert run.returncode == 2
    assert without_progress(run.stderr).splitlines() == [(f"pbs-engine: error: {weights}: truncated: its header needs "
                                        f"{real.stat().st_size} bytes, the file has {weights.stat().st_size}")]


@pytest.mark.parametrize("keep, message", [(0, "not a GGUF file"), (3, "not a GGUF file"),
                                           (100_000, "truncated: the file is 100000 bytes and ends inside its header")])
def test_broken_gguf_header_is_named(keep, message, tmp_path, capsys, monkeypatch):
    path = corrupt_models.cut(fixtures.smollm2_gguf(), tmp_path / "model.gguf", keep)
    monkeypatch.setenv("PBS_ENGINE_CACHE", str(tmp_path / "cache"))
    code, err = generate(path, capsys)
    assert code == 2 and err.count("\n") == 1 and f"{path}: {message}" in err


def test_truncated_gguf_names_its_size_and_the_size_it_needs(tmp_path, capsys, monkeypatch):
    real = fixtures.smollm2_gguf()
    path = corrupt_models.cut(real, tmp_path / "model.gguf", real.stat().st_size // 2)
    monkeypatch.setenv("PBS_ENGINE_CACHE", str(tmp_path / "cache"))
    code, err = generate(path, capsys)
    assert code == 2
    assert f"{path}: truncated: the file is {real.stat().st_size // 2} bytes, its tensors need {real.stat().st_size}" \
        in err
