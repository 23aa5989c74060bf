"""`pbs-engine convert`: a llama or qwen2 GGUF file into an HF-style directory (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json, generation_config.json), dequantised with the `gguf` package."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from pbs_engine.models.errors import ModelLoadError, ModelNotFoundError, UnsupportedArchitectureError
from pbs_engine.models.gguf_tokenizer import CONTROL, tokenizer_json

logger = logging.getLogger(__name__)

ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2")}
LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Llama-3.1's rope scaling, which llama.cpp bakes into a `rope_freqs` tensor instead of metadata
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


class GGUFConversionError(ModelLoadError):
    """The GGUF file cannot be converted: not GGUF, unsupported architecture, tensor type or tokenizer."""


def _open(path: Path):
    import gguf

    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file {str(path)!r} does not exist")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct errors/... on foreign files
        raise GGUFConversionError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        base = LAYER_TENSORS.get(parts[2])
        return None if base is None else f"model.layers.{parts[1]}.{base}.{parts[3]}"
    base = GLOBAL_TENSORS.get(parts[0])
    return None if base is None else f"{base}.{parts[1]}"


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of the rotary halves in Q/K rows (its convert script's `permute`)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_scaling(reader, arch: str, head_dim: int, theta: float) -> dict | None:
    tensor = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if tensor is None:
        return None
    factors = np.asarray(tensor.data, dtype=np.float64)
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    s = LLAMA31_ROPE
    wavelen = 2 * math.pi / inv_freq
    low_wl, high_wl = s["original_max_position_embeddings"] / s["low_freq_factor"], \
        s["original_max_position_embeddings"] / s["high_freq_factor"]
    smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / \
        (s["high_freq_factor"] - s["low_freq_factor"])
    expected = np.where(wavelen < high_wl, 1.0, np.where(wavelen > low_wl, s["factor"],
                                                          1.0 / ((1 - smooth) / s["factor"] + smooth)))
    if factors.shape != expected.shape or not np.allclose(factors, expected, rtol=1e-3):
        raise GGUFConversionError(f"{arch}: rope_freqs tensor does not match Llama-3.1's rope scaling; "
                                  "convert this model from its safetensors instead")
    return dict(s)


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write an HF-style model directory for the GGUF file; returns `out_dir`."""
    import gguf

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = _open(gguf_path)
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{gguf_path}: GGUF architecture {arch!r} not supported (supported: {', '.join(ARCHITECTURES)})")
    hf_arch, model_type = ARCHITECTURES[arch]

    def meta(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    n_head, hidden = int(meta("attention.head_count")), int(meta("embedding_length"))
    n_kv = int(meta("attention.head_count_kv", n_head))
    head_dim = int(meta("attention.key_length", hidden // n_head))
    theta = float(meta("rope.freq_base", 10000.0))
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    names = {t.name for t in reader.tensors}

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            if t.name != "rope_freqs.weight":
                logger.warning("%s: skipping tensor %s", gguf_path, t.name)
            continue
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise GGUFConversionError(f"{gguf_path}: tensor {t.name} has unsupported type {t.tensor_type.name}") from e
        w = np.array(w, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
        if arch == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            w = _unpermute(w, n_head if "attn_q" in t.name else n_kv)
        tensors[name] = torch.from_numpy(w).to(dtype)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    del tensors

    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    token = lambda key: None if _field(reader, key) is None else tokens[int(_field(reader, key))]  # noqa: E731
    bos, eos = token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id")
    eos_ids = [int(_field(reader, k)) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
               if _field(reader, k) is not None]
    eos_ids += [i for i, (t, k) in enumerate(zip(tokens, types))
                if k == CONTROL and t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")]
    eos_ids = sorted(set(eos_ids), key=lambda i: (tokens[i] != eos, i))  # the GGUF's own EOS first
    config = {
        "architectures": [hf_arch], "model_type": model_type, "vocab_size": len(tokens), "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")), "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": n_head, "num_key_value_heads": n_kv, "head_dim": head_dim,
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-6)), "rope_theta": theta,
        "rope_scaling": _rope_scaling(reader, arch, head_dim, theta),
        "max_position_embeddings": int(meta("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names, "hidden_act": "silu",
        "attention_bias": arch == "qwen2", "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"), "eos_token_id": eos_ids[0] if eos_ids else None,
    }
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json",
                {"bos_token_id": config["bos_token_id"], "eos_token_id": eos_ids})
    _write_tokenizer(reader, gguf_path, out_dir, tokens, types, bos, eos, config["max_position_embeddings"])
    return out_dir


def _write_tokenizer(reader, gguf_path, out_dir, tokens, types, bos, eos, max_len) -> None:
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFConversionError(f"{gguf_path}: tokenizer model {model!r} not supported (byte-level BPE 'gpt2' only)")
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    merges = list(_field(reader, "tokenizer.ggml.merges", []))
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    _write_json(out_dir / "tokenizer.json", tokenizer_json(tokens, merges, types, pre, bos, add_bos))
    pad_id, unk_id = _field(reader, "tokenizer.ggml.padding_token_id"), _field(reader, "tokenizer.ggml.unknown_token_id")
    _write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": _field(reader, "tokenizer.chat_template"),
        "bos_token": bos, "eos_token": eos, "pad_token": None if pad_id is None else tokens[int(pad_id)],
        "unk_token": None if unk_id is None else tokens[int(unk_id)], "add_bos_token": add_bos,
        "model_max_length": max_len, "clean_up_tokenization_spaces": False})


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False))
