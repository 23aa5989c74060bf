"""Model hyper-parameters read from a Hugging Face style config.json."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pbs_engine.models.errors import InvalidConfigError, UnsupportedArchitectureError
from pbs_engine.models.model_files import read_json_object

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    torch_dtype: str | None = None
    quantization: str | None = None  # "fp8": the checkpoint holds e4m3 projections with scales (quantization_config)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "ModelConfig":
        if not isinstance(raw, dict):
            raise InvalidConfigError(f"{source}: must hold a JSON object, not a {type(raw).__name__}")
        archs = raw.get("architectures") or []
        if not isinstance(archs, list):
            raise InvalidConfigError(f"{source}: field 'architectures' must be a list of names, got {archs!r}")
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise UnsupportedArchitectureError(
                f"{source}: architectures {archs!r} not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        heads, hidden = _int(raw, "num_attention_heads", source), _int(raw, "hidden_size", source)
        kv_heads = _int(raw, "num_key_value_heads", source, default=heads)
        if heads % kv_heads:
            raise InvalidConfigError(
                f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        if raw.get("head_dim") is None and hidden % heads:
            raise InvalidConfigError(f"{source}: hidden_size {hidden} is not a multiple of num_attention_heads "
                                     f"{heads}, and there is no head_dim")
        rope_scaling = _object(raw, "rope_scaling", source)
        rope_theta = raw.get("rope_theta")
        rope_parameters = _object(raw, "rope_parameters", source)
        if rope_theta is None and rope_parameters is not None:
            rope_theta = rope_parameters.get("rope_theta")
            if rope_parameters.get("rope_type", "default") != "default":
                rope_scaling = rope_parameters
        if rope_scaling is not None:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if kind not in ("llama3", "default", None):
                raise InvalidConfigError(f"{source}: rope_scaling type {kind!r} not supported (llama3 or none)")
            rope_scaling = _llama3_scaling(rope_scaling, source) if kind == "llama3" else None
        if raw.get("dual_chunk_attention_config"):
            logger.info("%s: dual_chunk_attention_config is ignored; long context runs through PBS attention", source)
        torch_dtype = raw.get("torch_dtype") or raw.get("dtype")
        if torch_dtype is not None and not isinstance(torch_dtype, str):
            raise InvalidConfigError(f"{source}: field 'torch_dtype' must be a dtype name, got {torch_dtype!r}")
        return cls(
            architecture=arch,
            vocab_size=_int(raw, "vocab_size", source),
            hidden_size=hidden,
            intermediate_size=_int(raw, "intermediate_size", source),
            num_hidden_layers=_int(raw, "num_hidden_layers", source),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=_int(raw, "head_dim", source, default=hidden // heads),
            rms_norm_eps=_number(raw.get("rms_norm_eps"), "rms_norm_eps", source, default=1e-6),
            rope_theta=_number(rope_theta, "rope_theta", source, default=10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=_int(raw, "max_position_embeddings", source, default=4096),
            tie_word_embeddings=_bool(raw, "tie_word_embeddings", source),
            attention_bias=arch == "Qwen2ForCausalLM" or _bool(raw, "attention_bias", source),
            torch_dtype=torch_dtype,
            quantization=_checkpoint_quantization(raw.get("quantization_config"), source),
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise InvalidConfigError(f"{path}: config.json not found in the model directory")
        return cls.from_dict(read_json_object(path, InvalidConfigError), str(path))


_REQUIRED = object()
FP8_SCHEMES = "vLLM's fp8 (per-tensor or per-channel weight scales) or compressed-tensors FP8 (num_bits 8, type float, strategy tensor or channel)"


def _checkpoint_quantization(q, source: str) -> str | None:
    """'fp8' for a checkpoint whose quantization_config declares e4m3 weights with per-tensor or per-channel scales
    (vLLM / HF `quant_method: fp8`, or `compressed-tensors` FP8); None without one; anything else is refused."""
    if q is None:
        return None
    if not isinstance(q, dict):
        raise InvalidConfigError(f"{source}: field 'quantization_config' must be an object, got {q!r}")
    method = q.get("quant_method")
    if method == "fp8":
        if q.get("weight_block_size"):
            raise InvalidConfigError(f"{source}: quantization_config.weight_block_size {q['weight_block_size']}: "
                                     f"block-wise FP8 scales are not supported; supported: {FP8_SCHEMES}")
        if q.get("fmt", "e4m3") != "e4m3":
            raise InvalidConfigError(f"{source}: quantization_config.fmt {q.get('fmt')!r}: only e4m3 is supported")
        return "fp8"
    if method == "compressed-tensors":
        groups = q.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise InvalidConfigError(f"{source}: quantization_config.config_groups must name the quantised weights")
        for name, group in groups.items():
            weights = group.get("weights") if isinstance(group, dict) else None
            if not (isinstance(weights, dict) and weights.get("num_bits") == 8 and weights.get("type") == "float"
                    and weights.get("strategy") in ("tensor", "channel")):
                raise InvalidConfigError(f"{source}: quantization_config.config_groups.{name}.weights {weights!r}: "
                                         f"not supported; supported: {FP8_SCHEMES}")
        return "fp8"
    raise InvalidConfigError(f"{source}: quantization_config.quant_method {method!r} not supported; supported: "
                             f"{FP8_SCHEMES}")


def _int(raw: dict, name: str, source: str, default=_REQUIRED) -> int:
    """A positive integer field; null or absent gives `default` where there is one."""
    value = raw.get(name)
    if value is None and default is not _REQUIRED:
        return default
    if name not in raw:
        raise InvalidConfigError(f"{source}: missing field {name!r}")
    if type(value) is float and value.is_integer():  # some exporters write 4096.0
        value = int(value)
    if type(value) is not int or value < 1:
        raise InvalidConfigError(f"{source}: field {name!r} must be a positive integer, got {value!r}")
    return value


def _number(value, name: str, source: str, default=_REQUIRED) -> float:
    """The positive number of field `name`; null or absent gives `default` where there is one."""
    if value is None:
        if default is _REQUIRED:
            raise InvalidConfigError(f"{source}: missing field {name!r}")
        return default
    if type(value) not in (int, float) or not value > 0:
        raise InvalidConfigError(f"{source}: field {name!r} must be a positive number, got {value!r}")
    return float(value)


def _bool(raw: dict, name: str, source: str) -> bool:
    """A true/false field; null or absent is false."""
    value = raw.get(name)
    if value is not None and not isinstance(value, bool):
        raise InvalidConfigError(f"{source}: field {name!r} must be true or false, got {value!r}")
    return bool(value)


def _object(raw: dict, name: str, source: str) -> dict | None:
    """An object field, or None where it is null or absent."""
    value = raw.get(name)
    if value is not None and not isinstance(value, dict):
        raise InvalidConfigError(f"{source}: field {name!r} must be an object or null, got {value!r}")
    return value


def _llama3_scaling(scaling: dict, source: str) -> dict:
    """Llama 3's rope_scaling, its four parameters checked (the low frequency bound below the high one)."""
    for name in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        _number(scaling.get(name), f"rope_scaling.{name}", source)
    if scaling["low_freq_factor"] >= scaling["high_freq_factor"]:
        raise InvalidConfigError(f"{source}: rope_scaling low_freq_factor {scaling['low_freq_factor']} must be "
                                 f"below high_freq_factor {scaling['high_freq_factor']}")
    return scaling
