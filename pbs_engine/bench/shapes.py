"""Exact configs of the models we benchmark with random weights (speed only, never quality)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

QWEN25_7B_1M = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
    "rope_theta": 10000000.0, "max_position_embeddings": 1010000, "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151645,
    "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 28,
}
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "rope_theta": 500000.0, "max_position_embeddings": 131072, "rms_norm_eps": 1e-05,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": 128009,
}
QWEN25_CODER_05B = {  # Qwen2.5-Coder-0.5B-Instruct: 14 query / 2 KV heads, 32K context (as converted from the GGUF)
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
    "rope_theta": 1000000.0, "max_position_embeddings": 32768, "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False, "attention_bias": True, "torch_dtype": "bfloat16", "bos_token_id": 151643,
    "eos_token_id": 151645,
}
SHAPES = {"qwen2.5-7b-1m": QWEN25_7B_1M, "llama-3.1-8b": LLAMA31_8B, "qwen2.5-coder-0.5b": QWEN25_CODER_05B}


def shape_config(name: str, min_positions: int = 0) -> dict:
    """config.json of shape `name`; random weights measure speed only, so a benchmark longer than the shape's
    context (Llama-3.1-8B's 128K, at 1M tokens) raises max_position_embeddings to `min_positions`."""
    config = dict(SHAPES[name])
    if min_positions > config["max_position_embeddings"]:
        print(f"random:{name}: max_position_embeddings {config['max_position_embeddings']} raised to {min_positions} "
              "for this benchmark (random weights: speed only)")
        config["max_position_embeddings"] = min_positions
    return config


def shape_dir(name: str, min_positions: int = 0) -> Path:
    """A directory holding only config.json for shape `name` (load it with load_format='dummy')."""
    path = Path(tempfile.mkdtemp(prefix=f"pbs-shape-{name}-"))
    (path / "config.json").write_text(json.dumps(shape_config(name, min_positions)))
    return path
