"""Linear layers: merged ones (qkv, gate_up) know which rows each checkpoint projection fills; under tensor
parallelism a column-parallel layer holds a slice of each projection's rows, a row-parallel one a slice of the
input columns and all-reduces its output."""
from __future__ import annotations

import torch
from torch import nn

from pbs_engine.kernels import (FP8_DTYPE, fp8_linear, fp8_weight_only, linear, quantize_per_token, quantize_weight,
                                skinny_linear)
from pbs_engine.models.layers.parallel import SINGLE, TensorParallel


class Linear(nn.Module):
    """y = x W^T (+ b). `output_sizes` with more than one entry makes a merged projection (qkv, gate_up).
    `sources[i]`: the rows of checkpoint projection i this rank holds (column parallel; default all of them);
    `in_source`: the input columns it holds (row parallel: the partial outputs are summed over `tp`)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False,
                 sources: list[slice] | None = None, in_source: slice | None = None, tp: TensorParallel = SINGLE):
        super().__init__()
        self.sources = sources or [slice(0, n) for n in output_sizes]
        self.full_sizes, self.in_features = list(output_sizes), in_features  # as the checkpoint stores them
        self.output_sizes = [s.stop - s.start for s in self.sources]
        self.in_source = in_source
        self.tp = tp
        in_local = in_features if in_source is None else in_source.stop - in_source.start
        self.weight = nn.Parameter(torch.empty(sum(self.output_sizes), in_local), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(sum(self.output_sizes)), requires_grad=False) if bias else None
        self.weight_scale: torch.Tensor | None = None  # FP8: (out,) float32, weight = e4m3 weight x scale per row

    @torch.no_grad()
    def quantize_fp8(self) -> None:
        """Weights to e4m3 with one scale per output channel (W8A8: inputs are quantised per token)."""
        self.out_dtype = self.weight.dtype
        w_fp8, scale = quantize_weight(self.weight.data)
        self.weight = nn.Parameter(w_fp8, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)

    def prepare_fp8_checkpoint(self) -> None:
        """Empty e4m3 weight and float32 per-channel scales for an FP8 checkpoint to be loaded into as it is."""
        self.out_dtype = self.weight.dtype
        shape, device = self.weight.shape, self.weight.device
        self.weight = nn.Parameter(torch.empty(shape, dtype=FP8_DTYPE, device=device), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(shape[0], dtype=torch.float32, device=device),
                                         requires_grad=False)

    def shard_rows(self, shard: int) -> slice:
        """The rows of the weight (and bias) that checkpoint projection `shard` fills."""
        start = sum(self.output_sizes[:shard])
        return slice(start, start + self.output_sizes[shard])

    def checkpoint_shape(self, shard: int, leaf: str) -> tuple[int, ...]:
        return (self.full_sizes[shard], self.in_features) if leaf == "weight" else (self.full_sizes[shard],)

    def source_index(self, shard: int, leaf: str) -> tuple[slice, ...]:
        """The part of checkpoint tensor `leaf` ("weight" or "bias") of projection `shard` this rank loads."""
        rows = self.sources[shard]
        if leaf == "weight" and self.in_source is not None:
            return rows, self.in_source
        return (rows,)

    def _matmul(self, x, bias):
        if self.weight_scale is None:
            return linear(x, self.weight, bias)
        if not isinstance(x, tuple) and fp8_weight_only(x.reshape(-1, x.shape[-1])):  # decode rows: W8A16
            shape = x.shape
            y = skinny_linear(x.reshape(-1, shape[-1]), self.weight, bias, w_scale=self.weight_scale,
                              out_dtype=self.out_dtype)
            return y.view(*shape[:-1], -1)
        x_fp8, x_scale = x if isinstance(x, tuple) else quantize_per_token(x)  # a fused producer quantised already
        shape = x_fp8.shape
        y = fp8_linear(x_fp8.reshape(-1, shape[-1]), x_scale.reshape(-1, 1), self.weight, self.weight_scale, bias,
                       out_dtype=self.out_dtype)
        return y.view(*shape[:-1], -1)

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x, or with FP8 weights an (e4m3 rows, per-token scales) pair from a quantising producer."""
        if self.in_source is None:
            return self._matmul(x, self.bias)
        y = self.tp.all_reduce(self._matmul(x, None))  # row parallel: the bias is added once, after the sum
        return y if self.bias is None else y + self.bias
