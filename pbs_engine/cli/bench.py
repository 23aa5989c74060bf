"""`pbs-engine bench kernels|prefill|decode|cpu`: benchmarks that print ratios against peers from the same run (GPU
ones, and the CPU prefill)."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: GPU kernels, prefill TTFT, decode throughput; CPU prefill")
    kinds = p.add_subparsers(dest="bench", metavar="KIND", required=True)
    from pbs_engine.bench import cpu, kernels, runtime

    k = kinds.add_parser("kernels", help="attention kernels vs torch SDPA (cuDNN, flash), FlexAttention")
    kernels.add_args(k)
    k.set_defaults(func=_needs_gpu(kernels.run))
    for name, fn, is_prefill in (("prefill", runtime.run_prefill, True), ("decode", runtime.run_decode, False)):
        q = kinds.add_parser(name, help=f"engine {name} vs HF transformers")
        runtime.add_args(q, prefill=is_prefill)
        q.set_defaults(func=_needs_gpu(fn))
    c = kinds.add_parser("cpu", help="CPU prefill TTFT, dense and PBS, vs HF transformers (no GPU needed)")
    cpu.add_args(c)
    c.set_defaults(func=cpu.run)


def _needs_gpu(fn):
    def run(args: argparse.Namespace) -> int:
        import torch

        if not torch.cuda.is_available():
            raise ValueError("benchmarks need a CUDA GPU; none is visible")
        return fn(args)

    return run
