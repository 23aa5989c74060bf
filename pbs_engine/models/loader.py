"""Build a model from a Hugging Face style directory and stream its safetensors weights straight to the device."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from pbs_engine.models.config import ModelConfig
from pbs_engine.models.errors import (
    CorruptCheckpointError,
    MissingShardError,
    MissingTensorError,
    ModelNotFoundError,
    ShapeMismatchError,
    UnexpectedTensorError,
    UnsupportedDtypeError,
)
from pbs_engine.models.layers.linear import Linear
from pbs_engine.models.llama import LlamaForCausalLM
from pbs_engine.models.model_files import TensorInfo, read_json_object, read_safetensors_header
from pbs_engine.models.qwen2 import Qwen2ForCausalLM

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
MODEL_CLASSES = {"LlamaForCausalLM": LlamaForCausalLM, "Qwen2ForCausalLM": Qwen2ForCausalLM}


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: one file, or the shards an index names."""
    if not model_dir.is_dir():
        raise ModelNotFoundError(f"model directory {str(model_dir)!r} does not exist")
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index, CorruptCheckpointError).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CorruptCheckpointError(f"{index}: 'weight_map' must be an object of tensor name -> shard file name")
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


def load_weights(model: LlamaForCausalLM, checkpoint: dict[Path, dict[str, TensorInfo]],
                 device: torch.device) -> None:
    """Check every checkpoint tensor against the parameter it fills (place, dtype, shape) and that none is missing,
    then copy them in one at a time, converting dtype on the way."""
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    plan: dict[Path, list[tuple[str, torch.Tensor]]] = {}
    loaded: set[str] = set()
    for path, tensors in checkpoint.items():
        plan[path] = []
        for name, info in tensors.items():
            if name.endswith(model.ignored_suffixes) or (name == "lm_head.weight" and model.config.tie_word_embeddings):
                continue
            key, target = _destination(model, params, modules, name, path)
            if info.dtype not in FLOAT_DTYPES:
                raise UnsupportedDtypeError(
                    f"{path}: tensor {name!r} has dtype {info.dtype}; weights must be {', '.join(FLOAT_DTYPES)}")
            if info.shape != tuple(target.shape):
                raise ShapeMismatchError(
                    f"{path}: tensor {name!r} has shape {info.shape}, the model expects {tuple(target.shape)}")
            plan[path].append((name, target))
            loaded.add(key)
    missing = sorted(_expected_keys(model, params, modules) - loaded)
    if missing:
        files = list(checkpoint)
        where = files[0] if len(files) == 1 else files[0].parent
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise MissingTensorError(f"{where}: lacks tensors the model needs: {shown}")
    for path, targets in plan.items():
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for name, target in targets:
                    target.copy_(f.get_tensor(name))
        except SafetensorError as e:
            raise CorruptCheckpointError(f"{path}: {e}") from e


def _expected_keys(model, params, modules) -> set[str]:
    """Every (parameter, shard) the checkpoint must fill, named as `_destination` reports them."""
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


def _destination(model, params, modules, name: str, path: Path) -> tuple[str, torch.Tensor]:
    """Where checkpoint tensor `name` goes: the key it fills ("param#shard" for a merged projection) and the
    parameter data, or the rows of it, that it is copied into."""
    prefix, _, leaf = name.rpartition(".")
    module_path, _, proj = prefix.rpartition(".")
    if proj in model.packed_modules:
        merged, shard = model.packed_modules[proj]
        target = f"{module_path}.{merged}.{leaf}"
        module = modules.get(f"{module_path}.{merged}")
        if isinstance(module, Linear) and target in params:
            return f"{target}#{shard}", params[target].data[module.shard_rows(shard)]
    elif name in params:
        return name, params[name].data
    raise UnexpectedTensorError(f"{path}: tensor {name!r} has no place in {type(model).__name__}")


def build_model(model_dir: str | Path, device: torch.device, dtype: torch.dtype, max_position: int,
                load_format: str = "auto") -> LlamaForCausalLM:
    """Instantiate the architecture config.json names directly on `device` in `dtype`, then load its weights
    ("auto"), or fill them with random values ("dummy": config.json alone suffices; for speed runs, never quality)."""
    model_dir = Path(model_dir)
    checkpoint = {f: read_safetensors_header(f) for f in checkpoint_files(model_dir)} if load_format == "auto" else {}
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
        load_weights(model, checkpoint, device)
    return model.eval()


@torch.no_grad()
def randomise(model: LlamaForCausalLM, std: float = 0.02) -> None:
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, std, generator=gen)
