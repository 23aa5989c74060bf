"""Build a model from a Hugging Face style directory and stream its safetensors weights straight to the device."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from pbs_engine.models.config import ModelConfig
from pbs_engine.models.errors import (InvalidConfigError, MissingShardError, MissingTensorError, ModelNotFoundError,
                                      UnexpectedTensorError)
from pbs_engine.models.layers.linear import Linear, default_weight_loader
from pbs_engine.models.llama import LlamaForCausalLM
from pbs_engine.models.qwen2 import Qwen2ForCausalLM

MODEL_CLASSES = {"LlamaForCausalLM": LlamaForCausalLM, "Qwen2ForCausalLM": Qwen2ForCausalLM}


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: one file, or the shards an index names."""
    if not model_dir.is_dir():
        raise ModelNotFoundError(f"model directory {str(model_dir)!r} does not exist")
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise InvalidConfigError(f"{index}: unreadable index ({e})") from e
        shards = [model_dir / name for name in sorted(set(weight_map.values()))]
        for shard in shards:
            if not shard.is_file():
                raise MissingShardError(f"{index} names shard {shard.name!r}, which is missing from {model_dir}")
        return shards
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(model_dir.glob("*.safetensors"))
    if others:
        return others
    raise ModelNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")


def load_weights(model: LlamaForCausalLM, files: list[Path], device: torch.device) -> None:
    """Copy every checkpoint tensor into its parameter, one tensor at a time, converting dtype on the way."""
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    loaded: set[str] = set()
    expected = _expected_keys(model, params, modules)
    for path in files:
        with safe_open(str(path), framework="pt", device=str(device) if device.type != "cpu" else "cpu") as f:
            for name in f.keys():
                if name.endswith(model.ignored_suffixes):
                    continue
                if name == "lm_head.weight" and model.config.tie_word_embeddings:
                    continue
                tensor = f.get_tensor(name)
                loaded.update(_load_one(model, params, modules, name, tensor, str(path)))
    missing = sorted(expected - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise MissingTensorError(f"checkpoint in {files[0].parent} lacks tensors the model needs: {shown}")


def _expected_keys(model, params, modules) -> set[str]:
    """Every (parameter, shard) the checkpoint must fill, named as `_load_one` reports them."""
    keys = set()
    for name in params:
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        module = modules.get(name.rpartition(".")[0])
        if isinstance(module, Linear) and len(module.output_sizes) > 1:
            keys.update(f"{name}#{i}" for i in range(len(module.output_sizes)))
        else:
            keys.add(name)
    return keys


def _load_one(model, params, modules, name: str, tensor: torch.Tensor, path: str) -> list[str]:
    """Load one checkpoint tensor; returns the keys it filled ("param#shard" for a merged projection)."""
    prefix, _, leaf = name.rpartition(".")
    module_path, _, proj = prefix.rpartition(".")
    if proj in model.packed_modules:
        merged, shard = model.packed_modules[proj]
        target = f"{module_path}.{merged}.{leaf}"
        module = modules.get(f"{module_path}.{merged}")
        if isinstance(module, Linear) and target in params:
            module.load_shard(params[target], tensor, shard, name)
            return [f"{target}#{shard}"]
    elif name in params:
        default_weight_loader(params[name], tensor, name)
        return [name]
    raise UnexpectedTensorError(f"{path}: tensor {name!r} has no place in {type(model).__name__}")


def build_model(model_dir: str | Path, device: torch.device, dtype: torch.dtype, max_position: int,
                load_format: str = "auto") -> LlamaForCausalLM:
    """Instantiate the architecture config.json names directly on `device` in `dtype`, then load its weights
    ("auto"), or fill them with random values ("dummy": config.json alone suffices; for speed runs, never quality)."""
    model_dir = Path(model_dir)
    files = checkpoint_files(model_dir) if load_format == "auto" else []
    cfg = ModelConfig.from_dir(model_dir)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = MODEL_CLASSES[cfg.architecture](cfg, max_position)
    finally:
        torch.set_default_dtype(previous)
    if load_format == "dummy":
        randomise(model)
    else:
        load_weights(model, files, device)
    return model.eval()


@torch.no_grad()
def randomise(model: LlamaForCausalLM, std: float = 0.02) -> None:
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, std, generator=gen)
