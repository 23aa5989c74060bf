"""SiLU-and-mul for the gated MLP."""
from __future__ import annotations

import torch
from torch import nn

from pbs_engine.kernels import silu_and_mul


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)
