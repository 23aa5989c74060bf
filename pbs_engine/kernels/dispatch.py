"""Kernel dispatch: Triton for CUDA tensors, PyTorch otherwise (the reference, or for attention a fast torch path
tested against it); tests call the `*_triton` launchers directly under TRITON_INTERPRET=1."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pbs_engine.kernels.skinny import BF16_SKINNY, SKINNY_ROWS, skinny_linear

HALF = (torch.bfloat16, torch.float16)

# oneDNN's matmul, behind torch.ops.mkldnn (the op torch.compile's CPU backend calls for a linear): on the CI's
# 2-core AMD EPYC it ran the SmolLM2 projections 1.2-1.6x faster than the MKL sgemm behind F.linear at 32-4096 rows,
# and the 49,152-row LM head 2.4x faster at one row (decode)
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ b) for x (..., in) and weight (out, in): float32 on the CPU through oneDNN, otherwise F.linear."""
    if (_ONEDNN and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not (x.requires_grad or weight.requires_grad)):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    if x.is_cuda and BF16_SKINNY and x.dim() == 2 and x.shape[0] <= SKINNY_ROWS and weight.dtype in HALF:
        return skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)
