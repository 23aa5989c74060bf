"""Build a model from a Hugging Face style directory and stream its safetensors weights straight to the device."""
from __future__ import annotations

import zlib
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from pbs_engine.kernels import FP8_DTYPE
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
from pbs_engine.models.layers.embedding import LMHead, VocabEmbedding
from pbs_engine.models.layers.linear import Linear
from pbs_engine.models.layers.parallel import SINGLE, TensorParallel
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
    then copy them in one at a time, converting dtype on the way; under tensor parallelism only this rank's slice
    of each tensor is read from the file."""
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    plan: dict[Path, list[tuple[str, torch.Tensor, tuple]]] = {}
    loaded: set[str] = set()
    for path, tensors in checkpoint.items():
        plan[path] = []
        for name, info in tensors.items():
            if name.endswith(model.ignored_suffixes) or (name == "lm_head.weight" and model.config.tie_word_embeddings):
                continue
            key, target, index, shape = _destination(model, params, modules, name, path)
            if target.dtype == FP8_DTYPE:  # an FP8 checkpoint's projection, loaded as it is
                if info.dtype != "F8_E4M3":
                    raise UnsupportedDtypeError(f"{path}: tensor {name!r} has dtype {info.dtype} in an FP8 checkpoint "
                                                "(quantization_config); its projections must be F8_E4M3")
            elif info.dtype not in FLOAT_DTYPES:
                raise UnsupportedDtypeError(
                    f"{path}: tensor {name!r} has dtype {info.dtype}; weights must be {', '.join(FLOAT_DTYPES)}")
            scale = name.endswith(".weight_scale")
            if scale and info.shape in ((), (1,), (1, 1)):  # one scale for the whole tensor
                index = ()
            elif scale and info.shape == (*shape, 1):  # one per output channel, as a column
                index = (*index, slice(None)) if index else ()
            elif info.shape != shape:
                raise ShapeMismatchError(f"{path}: tensor {name!r} has shape {info.shape}, the model expects {shape}"
                                         + (" (or one scale per tensor)" if scale else ""))
            plan[path].append((name, target, index))
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
                for name, target, index in targets:
                    part = f.get_slice(name)[index] if index else f.get_tensor(name)
                    if name.endswith(".weight_scale"):  # (rows,), (rows, 1) or one for all rows
                        part = part.reshape(-1).expand(target.shape[0]) if part.numel() == 1 else part.reshape(-1)
                    target[:part.shape[0]].copy_(part)  # a padded vocabulary slice keeps zero rows at its end
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


def _destination(model, params, modules, name: str, path: Path) -> tuple[str, torch.Tensor, tuple, tuple]:
    """Where checkpoint tensor `name` goes: the key it fills ("param#shard" for a merged projection), the parameter
    data (or rows of it) it is copied into, the slice of the checkpoint tensor this rank reads (empty: all of it)
    and the shape the checkpoint tensor must have."""
    prefix, _, leaf = name.rpartition(".")
    module_path, _, proj = prefix.rpartition(".")
    module = modules.get(prefix)
    if proj in model.packed_modules:
        merged, shard = model.packed_modules[proj]
        target = f"{module_path}.{merged}.{leaf}"
        module = modules.get(f"{module_path}.{merged}")
        if isinstance(module, Linear) and target in params:
            return (f"{target}#{shard}", params[target].data[module.shard_rows(shard)],
                    module.source_index(shard, leaf), module.checkpoint_shape(shard, leaf))
    elif name in params:
        if isinstance(module, Linear):
            return name, params[name].data, module.source_index(0, leaf), module.checkpoint_shape(0, leaf)
        if isinstance(module, (VocabEmbedding, LMHead)):
            return name, params[name].data, module.source_index(), module.full_shape
        return name, params[name].data, (), tuple(params[name].shape)
    raise UnexpectedTensorError(f"{path}: tensor {name!r} has no place in {type(model).__name__}")


def build_model(model_dir: str | Path, device: torch.device, dtype: torch.dtype, max_position: int,
                load_format: str = "auto", tp: TensorParallel = SINGLE, config: ModelConfig | None = None,
                quantization: str | None = None) -> LlamaForCausalLM:
    """Instantiate the architecture config.json names directly on `device` in `dtype`, then load its weights
    ("auto"), or fill them with random values ("dummy": config.json alone suffices; for speed runs, never quality);
    quantization "fp8": the decoder's projections in e4m3 (LlamaForCausalLM.quantize_fp8); an FP8 checkpoint
    (config.json's quantization_config, ModelConfig.quantization) is loaded as it is, its e4m3 weights and
    per-tensor or per-channel scales into the same layout."""
    model_dir = Path(model_dir)
    checkpoint = {f: read_safetensors_header(f) for f in checkpoint_files(model_dir)} if load_format == "auto" else {}
    cfg = config or ModelConfig.from_dir(model_dir)  # the engine passes the one it read
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = MODEL_CLASSES[cfg.architecture](cfg, max_position, tp)
    finally:
        torch.set_default_dtype(previous)
    fp8_checkpoint = cfg.quantization == "fp8" and load_format != "dummy"
    if load_format == "dummy":
        randomise(model)
    else:
        if fp8_checkpoint:  # e4m3 projections and their scales, loaded as they are
            model.quantize_fp8(from_checkpoint=True)
        load_weights(model, checkpoint, device)
    if (quantization == "fp8" or cfg.quantization == "fp8") and not fp8_checkpoint:
        model.quantize_fp8()
    return model.eval()


@torch.no_grad()
def randomise(model: LlamaForCausalLM, std: float = 0.02) -> None:
    """Random weights drawn whole, as a checkpoint would hold them, then sliced: every tensor-parallel size gives
    the same model."""
    device = next(model.parameters()).device
    for index, (name, module) in enumerate(model.named_modules()):
        if isinstance(module, Linear):
            for shard in range(len(module.full_sizes)):
                for leaf in ("weight", "bias") if module.bias is not None else ("weight",):
                    full = _normal(module.checkpoint_shape(shard, leaf), std, (index, shard, leaf), device)
                    getattr(module, leaf).data[module.shard_rows(shard)].copy_(full[module.source_index(shard, leaf)])
        elif isinstance(module, (VocabEmbedding, LMHead)) and not (
                isinstance(module, LMHead) and model.config.tie_word_embeddings):
            part = _normal(module.full_shape, std, (index,), device)[module.source_index()]
            module.weight.data[:part.shape[0]].copy_(part)
        elif name.endswith("norm"):
            module.weight.data.fill_(1.0)


def _normal(shape: tuple[int, ...], std: float, key: tuple, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(zlib.crc32(repr(key).encode()))  # the same in every process
    return torch.empty(shape, device=device).normal_(0.0, std, generator=gen)
