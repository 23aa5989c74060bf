"""`pbs-engine bench kernels|prefill|decode`: GPU benchmarks that print ratios against peers from the same run."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    sub.add_parser("bench", help="benchmarks: GPU kernels, prefill TTFT, decode throughput; CLI start-up",
                   build=_add_kinds)


def _add_kinds(p: argparse.ArgumentParser) -> None:
    """The kinds' options: built only when `bench` is used, as their modules import torch."""
    kinds = p.add_subparsers(dest="bench", metavar="KIND", required=True)
    from pbs_engine.bench import kernels, runtime, startup

    k = kinds.add_parser("kernels", help="attention kernels vs torch SDPA (cuDNN, flash), FlexAttention")
    kernels.add_args(k)
    k.set_defaults(func=_needs_gpu(kernels.run))
    for name, fn, is_prefill in (("prefill", runtime.run_prefill, True), ("decode", runtime.run_decode, False)):
        q = kinds.add_parser(name, help=f"engine {name} vs HF transformers")
        runtime.add_args(q, prefill=is_prefill)
        q.set_defaults(func=_needs_gpu(fn))
    startup.register(kinds)


def _needs_gpu(fn):
    def run(args: argparse.Namespace) -> int:
        import torch

        if not torch.cuda.is_available():
            raise ValueError("benchmarks need a CUDA GPU; none is visible")
        return fn(args)

    return run
