"""Rotary position embedding (NEOX half-rotation layout) with Llama-3.1's frequency scaling."""
from __future__ import annotations

import torch
from torch import nn

from pbs_engine.kernels import apply_rope, build_cos_sin_cache, rope_inv_freq


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, theta: float, rope_scaling: dict | None):
        super().__init__()
        with torch.device("cpu"):  # frequencies in float64 on the host, whatever the model's default dtype
            inv_freq = rope_inv_freq(head_dim, theta, rope_scaling).double()
            cache = build_cos_sin_cache(inv_freq, max_position).float()
        self.register_buffer("cos_sin_cache", cache.to(self._device()), persistent=False)

    @staticmethod
    def _device() -> torch.device:
        return torch.empty(0).device

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q (T, Hq, D), k (T, Hkv, D), positions (T,) -> rotated q, k."""
        return apply_rope(q, k, positions, self.cos_sin_cache)
