"""RMSNorm with an optional fused residual add; with `quantize_output` (FP8 linear layers after it) the normalised
rows come out as e4m3 with one scale per token, quantised inside the same kernel (except decode rows on CUDA, which
the FP8 layers read in bf16: kernels.fp8_weight_only)."""
from __future__ import annotations

import torch
from torch import nn

from pbs_engine.kernels import fp8_weight_only, rms_norm, rms_norm_quant


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.quantize_output = False  # set by quantize_fp8: the next layer takes (e4m3 rows, per-token scales)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Returns norm(x), or (norm(x + residual), x + residual) when a residual is given; norm(x) is an
        (e4m3, scale) pair when quantize_output is set."""
        if not self.quantize_output or fp8_weight_only(x):  # decode rows on CUDA feed W8A16 layers in bf16
            return rms_norm(x, self.weight, self.eps, residual)
        out = rms_norm_quant(x, self.weight, self.eps, residual)
        return (out[0], out[1]) if residual is None else ((out[0], out[1]), out[2])
