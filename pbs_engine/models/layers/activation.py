"""SiLU-and-mul for the gated MLP; with `quantize_output` (an FP8 down projection) the product comes out as e4m3
with one scale per token, quantised inside the same kernel."""
from __future__ import annotations

import torch
from torch import nn

from pbs_engine.kernels import fp8_weight_only, silu_and_mul, silu_and_mul_quant


class SiluAndMul(nn.Module):
    def __init__(self):
        super().__init__()
        self.quantize_output = False  # set by quantize_fp8

    def forward(self, x: torch.Tensor):
        if self.quantize_output and not fp8_weight_only(x):  # decode rows on CUDA: bf16 for the W8A16 layer
            return silu_and_mul_quant(x)
        return silu_and_mul(x)
