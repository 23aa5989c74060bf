"""`pbs-engine bench ...`: benchmarks that print tables of ours, the peer and the ratio, measured in the same run."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    sub.add_parser("bench", help="benchmarks: GPU kernels, prefill TTFT, decode throughput; CPU prefill; CLI start-up",
                   build=_add_kinds)


def _add_kinds(p: argparse.ArgumentParser) -> None:
    """The kinds' options: built only when `bench` is used, as their modules import torch."""
    kinds = p.add_subparsers(dest="bench", metavar="KIND", required=True)
    from pbs_engine.bench import check, cpu, kernels, profile, runtime, serve, startup

    k = kinds.add_parser("kernels", help="attention kernels vs torch SDPA (cuDNN, flash), FlexAttention")
    kernels.add_args(k)
    k.set_defaults(func=_needs_gpu(kernels.run))
    for name, fn, is_prefill in (("prefill", runtime.run_prefill, True), ("decode", runtime.run_decode, False)):
        q = kinds.add_parser(name, help=f"engine {name} vs HF transformers")
        runtime.add_args(q, prefill=is_prefill)
        q.set_defaults(func=_needs_gpu(fn))
    c = kinds.add_parser("check", help="every Triton kernel against its reference at realistic sizes")
    c.set_defaults(func=_needs_gpu(check.run_check))
    t = kinds.add_parser("tiles", help="launch-shape sweeps of the dense, sparse and decode kernels")
    check.add_tile_args(t)
    t.set_defaults(func=_needs_gpu(check.run_tiles))
    f = kinds.add_parser("profile", help="one warm prefill: wall time against GPU kernel time, top kernels")
    profile.add_args(f)
    f.set_defaults(func=_needs_gpu(profile.run))
    s = kinds.add_parser("serve", help="streams' inter-token gaps and short prompts' TTFT while a long prompt "
                                       "arrives (any device)")
    serve.add_args(s)
    s.set_defaults(func=serve.run)
    startup.register(kinds)
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
