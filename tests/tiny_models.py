"""Tiny randomly initialised HF checkpoints of both architectures, written with transformers, for CPU tests."""
from __future__ import annotations

from pathlib import Path

import torch

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=512, rms_norm_eps=1e-5)

VARIANTS = {
    # GQA 4:1, untied head, Llama-3.1 rope scaling
    "llama_gqa_llama3": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=False, rope_theta=500000.0,
                                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 64})),
    # MHA, tied embeddings
    "llama_tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True, rope_theta=10000.0)),
    # Qwen2: q/k/v bias, GQA 2:1, tied
    "qwen2_tied": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0)),
    # Qwen2, untied, head_dim 32 with 2 heads
    "qwen2_untied": ("qwen2", dict(num_key_value_heads=1, num_attention_heads=2, tie_word_embeddings=False)),
}


def make_tiny(kind: str, out_dir: Path, seed: int = 0, **overrides):
    """Write a random tiny checkpoint of VARIANTS[kind] to out_dir; returns the transformers model (fp32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch, extra = VARIANTS[kind]
    cfg = AutoConfig.for_model(arch, **{**TINY, **extra, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # HF zero-inits biases; random ones test that we load and apply them
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out_dir, safe_serialization=True)
    return model
