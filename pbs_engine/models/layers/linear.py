"""Linear layers, merged ones (qkv, gate_up) knowing which rows each checkpoint projection fills."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """y = x W^T (+ b). `output_sizes` with more than one entry makes a merged projection (qkv, gate_up)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False):
        super().__init__()
        self.output_sizes = list(output_sizes)
        out = sum(output_sizes)
        self.weight = nn.Parameter(torch.empty(out, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out), requires_grad=False) if bias else None

    def shard_rows(self, shard: int) -> slice:
        """The rows of the weight (and bias) that checkpoint projection `shard` fills."""
        start = sum(self.output_sizes[:shard])
        return slice(start, start + self.output_sizes[shard])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)
