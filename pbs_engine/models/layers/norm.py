"""RMSNorm with an optional fused residual add."""
from __future__ import annotations

import torch
from torch import nn

from pbs_engine.kernels import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Returns norm(x), or (norm(x + residual), x + residual) when a residual is given."""
        return rms_norm(x, self.weight, self.eps, residual)
