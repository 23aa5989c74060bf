"""Kernel dispatch: Triton for CUDA tensors, PyTorch otherwise (the reference, or for attention a fast torch path
tested against it); tests call the `*_triton` launchers directly under TRITON_INTERPRET=1."""
from __future__ import annotations

import torch


def use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda
