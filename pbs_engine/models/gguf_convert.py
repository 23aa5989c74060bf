"""`pbs-engine convert`: a llama or qwen2 GGUF file into an HF-style directory (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json, generation_config.json), dequantised tensor by tensor with the `gguf` package."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pbs_engine.models.errors import ModelLoadError, ModelNotFoundError, UnsupportedArchitectureError
from pbs_engine.models.gguf_tokenizer import PRE_TOKENIZERS, GGUFVocab
from pbs_engine.progress import progress

CONVERTER_VERSION = 2  # part of the cache key of converted models: bump when the output changes
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
# Llama 3's rope scaling, which llama.cpp stores only as per-frequency factors in a `rope_freqs` tensor
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


class GGUFConversionError(ModelLoadError):
    """The GGUF file cannot be converted: not GGUF, missing metadata, or an unsupported tensor type or tokenizer."""


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write an HF-style model directory for a llama/qwen2 GGUF file, weights in `dtype`; returns `out_dir`."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"dtype {dtype}: choose one of {', '.join(map(str, SAFETENSORS_DTYPES))}")
    reader = _open(gguf_path)
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{gguf_path}: GGUF architecture {arch!r} not supported (supported: {', '.join(ARCHITECTURES)})")

    def need(key: str) -> Any:
        value = _field(reader, key)
        if value is None:
            raise GGUFConversionError(f"{gguf_path}: metadata {key!r} is missing")
        return value

    vocab = _vocab(reader, gguf_path, need)
    config = _config(reader, gguf_path, arch, need, dtype, vocab)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_weights(reader, gguf_path, out_dir / "model.safetensors", dtype, arch,
                   config["num_attention_heads"], config["num_key_value_heads"])
    _write_json(out_dir / "tokenizer.json", vocab.tokenizer_json(), indent=None)
    _write_json(out_dir / "tokenizer_config.json", vocab.tokenizer_config(config["max_position_embeddings"]))
    _write_json(out_dir / "generation_config.json",
                {"bos_token_id": vocab.bos_id, "eos_token_id": vocab.stop_ids(), "pad_token_id": vocab.pad_id})
    _write_json(out_dir / "config.json", config)  # last: its presence marks a complete directory
    return out_dir


def _open(path: Path):
    import gguf

    class Reader(gguf.GGUFReader):
        """Slices a plain-ndarray view of the file's memmap: np.memmap's per-slice overhead otherwise makes parsing
        a 150k-token vocabulary take 20 s instead of 8 s. Reads past the end of the file say the file is truncated
        (the package's reader would slice short and fail later, with a reshape error)."""

        def _get(self, offset, dtype, count=1, override_order=None):
            if type(self.data) is np.memmap:
                self.data = self.data.view(np.ndarray)
            end = offset + np.dtype(dtype).itemsize * int(count)
            if end > self.data.size:
                raise GGUFConversionError(f"{path}: truncated: the file is {self.data.size} bytes and ends inside "
                                          f"its header, which needs at least {end}")
            return super()._get(offset, dtype, count, override_order)

        def _build_tensors(self, start_offs, fields):
            end = 0  # a file without tensors may stop short of the aligned start of its (empty) data
            for field in fields:
                _, _, _, dims, raw_dtype, offset = field.parts
                block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(raw_dtype[0])]
                end = max(end, start_offs + int(offset[0]) + int(np.prod(dims)) * type_size // block_size)
            if end > self.data.size:
                raise GGUFConversionError(
                    f"{path}: truncated: the file is {self.data.size} bytes, its tensors need {end}")
            super()._build_tensors(start_offs, fields)

    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file {str(path)!r} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFConversionError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')" if magic
                                  else f"{path}: not a GGUF file (it is empty)")
    try:
        return Reader(str(path))
    except GGUFConversionError:
        raise
    except Exception as e:  # the reader raises ValueError, KeyError, ... on foreign or damaged files
        raise GGUFConversionError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def _field(reader, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _vocab(reader, path: Path, need: Callable[[str], Any]) -> GGUFVocab:
    model, pre = need("tokenizer.ggml.model"), _field(reader, "tokenizer.ggml.pre") or "default"
    if model != "gpt2":
        raise GGUFConversionError(
            f"{path}: tokenizer.ggml.model {model!r} not supported (byte-level BPE 'gpt2' only)")
    if pre not in PRE_TOKENIZERS:
        raise GGUFConversionError(
            f"{path}: tokenizer.ggml.pre {pre!r} not supported (supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    tokens = list(need("tokenizer.ggml.tokens"))

    def tok(key: str) -> int | None:
        return _optional_int(_field(reader, f"tokenizer.ggml.{key}"))

    return GGUFVocab(
        tokens=tokens, token_types=list(_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)),
        merges=list(need("tokenizer.ggml.merges")), pre=pre,
        bos_id=tok("bos_token_id"), eos_id=tok("eos_token_id"), eot_id=tok("eot_token_id"),
        pad_id=tok("padding_token_id"), unk_id=tok("unknown_token_id"),
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token")),
        add_eos=bool(_field(reader, "tokenizer.ggml.add_eos_token")),
        chat_template=_field(reader, "tokenizer.chat_template"))


def _config(reader, path: Path, arch: str, need: Callable[[str], Any], dtype: torch.dtype, vocab: GGUFVocab) -> dict:
    """The HF config.json of the model, from the `{arch}.*` metadata and the tensors present."""
    n_head, hidden = int(need(f"{arch}.attention.head_count")), int(need(f"{arch}.embedding_length"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length") or hidden // n_head)
    rope_dim = int(_field(reader, f"{arch}.rope.dimension_count") or head_dim)
    if rope_dim != head_dim:
        raise GGUFConversionError(f"{path}: {arch}.rope.dimension_count {rope_dim} != head dim {head_dim} "
                                  "(partial rotary embeddings are not supported)")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise GGUFConversionError(f"{path}: tensor 'token_embd.weight' is missing")
    theta = float(_field(reader, f"{arch}.rope.freq_base") or 10000.0)
    return {
        "architectures": [ARCHITECTURES[arch]], "model_type": arch,
        "vocab_size": int(tensors["token_embd.weight"].shape[1]), "hidden_size": hidden,
        "intermediate_size": int(need(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(need(f"{arch}.block_count")),
        "num_attention_heads": n_head, "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv")
                                                                   or n_head),
        "head_dim": head_dim, "hidden_act": "silu",
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon") or 1e-6),
        "rope_theta": theta, "rope_scaling": _rope_scaling(reader, path, arch, tensors, head_dim, theta),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length") or 4096),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors, "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": vocab.bos_id, "eos_token_id": vocab.eos_id, "pad_token_id": vocab.pad_id,
    }


def _rope_scaling(reader, path: Path, arch: str, tensors: dict, head_dim: int, theta: float) -> dict | None:
    """HF rope_scaling: llama3 (recognised from the `rope_freqs` factors), or linear/yarn from `rope.scaling.*`."""
    if "rope_freqs.weight" in tensors:
        factors = np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float64)
        scaling = {"rope_type": "llama3", "factor": float(factors.max()), **LLAMA3_ROPE}
        if factors.shape != (head_dim // 2,) or not np.allclose(factors, _llama3_factors(scaling, head_dim, theta),
                                                                rtol=1e-3):
            raise GGUFConversionError(f"{path}: tensor rope_freqs.weight does not follow Llama 3's rope scaling")
        return scaling
    kind = _field(reader, f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    factor = float(_field(reader, f"{arch}.rope.scaling.factor") or 1.0)
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        original = int(_field(reader, f"{arch}.rope.scaling.original_context_length") or 0)
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original}
    raise GGUFConversionError(f"{path}: {arch}.rope.scaling.type {kind!r} not supported (linear, yarn)")


def _llama3_factors(s: dict, head_dim: int, theta: float) -> np.ndarray:
    """The per-frequency divisors llama.cpp's convert script derives from a Llama 3 rope_scaling."""
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    old = s["original_max_position_embeddings"]
    smooth = (old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    return np.where(wavelen < old / s["high_freq_factor"], 1.0,
                    np.where(wavelen > old / s["low_freq_factor"], s["factor"],
                             1.0 / ((1 - smooth) / s["factor"] + smooth)))


def _hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in GLOBAL_TENSORS:
        return f"{GLOBAL_TENSORS[parts[0]]}.{parts[1]}"
    return None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of Q/K rows (rotary halves interleaved per head) for HF's rotate_half layout."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_weights(reader, path: Path, out: Path, dtype: torch.dtype, arch: str, n_head: int, n_kv: int) -> None:
    """Dequantise each tensor and stream it into one safetensors file (one tensor in memory at a time)."""
    import gguf

    def load(t) -> torch.Tensor:
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise GGUFConversionError(f"{path}: tensor {t.name} has unsupported type {t.tensor_type.name}") from e
        w = w.reshape([int(d) for d in reversed(t.shape)])
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if arch == "llama" and kind in ("attn_q", "attn_k"):  # weight and bias
            w = _unpermute(w, n_head if kind == "attn_q" else n_kv)
        return torch.from_numpy(np.require(w, np.float32, "W")).to(dtype)

    plan = []
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None and t.name != "rope_freqs.weight":
            raise GGUFConversionError(f"{path}: tensor {t.name!r} has no counterpart in {ARCHITECTURES[arch]}")
        if name is not None:
            plan.append((name, [int(d) for d in reversed(t.shape)], lambda t=t: load(t)))
    _write_safetensors(out, plan, dtype, f"converting {path.name}")


def _write_safetensors(out: Path, plan: list[tuple[str, list[int], Callable[[], torch.Tensor]]],
                       dtype: torch.dtype, desc: str) -> None:
    """The safetensors format by hand (header of names/shapes/offsets, then raw bytes), so tensors can stream;
    a progress bar named `desc` counts the tensors written."""
    itemsize, header, offset = torch.finfo(dtype).bits // 8, {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in plan:
        size = math.prod(shape) * itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    try:
        with open(out, "wb") as f, progress(len(plan), desc, unit="tensor") as bar:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for _, _, load in plan:
                f.write(load().reshape(-1).view(torch.uint8).numpy())
                bar.update()
    except BaseException:
        out.unlink(missing_ok=True)
        raise


def _write_json(path: Path, data: dict, indent: int | None = 2) -> None:
    path.write_text(json.dumps(data, indent=indent, ensure_ascii=False))
