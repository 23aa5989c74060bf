"""Linear layers whose parameters know how to load their checkpoint tensors, merged ones shard by shard."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pbs_engine.models.errors import ShapeMismatchError


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, name: str) -> None:
    if param.shape != loaded.shape:
        raise ShapeMismatchError(f"tensor {name!r}: checkpoint shape {tuple(loaded.shape)}, model expects {tuple(param.shape)}")
    param.data.copy_(loaded)


class Linear(nn.Module):
    """y = x W^T (+ b). `output_sizes` with more than one entry makes a merged projection (qkv, gate_up)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False):
        super().__init__()
        self.output_sizes = list(output_sizes)
        out = sum(output_sizes)
        self.weight = nn.Parameter(torch.empty(out, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out), requires_grad=False) if bias else None

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard: int, name: str) -> None:
        """Copy checkpoint tensor `name` into rows of shard `shard` of `param` (weight or bias)."""
        start = sum(self.output_sizes[:shard])
        rows = self.output_sizes[shard]
        expected = (rows, *param.shape[1:])
        if tuple(loaded.shape) != expected:
            raise ShapeMismatchError(f"tensor {name!r}: checkpoint shape {tuple(loaded.shape)}, model expects {expected}")
        param.data[start:start + rows].copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)
