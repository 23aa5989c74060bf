"""Qwen2 / Qwen2.5: Llama's architecture with a bias on the q/k/v projections (set by ModelConfig)."""
from __future__ import annotations

from pbs_engine.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass
