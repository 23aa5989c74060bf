"""`pbs-engine bench profile`: where one warm prefill (or, with --decode-steps, a run of decode steps) spends its
time, wall clock against GPU kernel time (torch.profiler), so host stalls show, with the kernels that take the most
GPU time."""
from __future__ import annotations

import argparse
import time

import torch

from pbs_engine.bench.common import device_name, model_source, print_table, random_ids, versions, write_json
from pbs_engine.bench.runtime import METHODS, methods


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="random:qwen2.5-7b-1m", help="random:<shape> or any --model of the engine")
    p.add_argument("--tokens", type=int, default=131072, help="prompt length")
    p.add_argument("--method", default="pbs-budget10", choices=list(METHODS))
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="prefill chunk (default: the engine's)")
    p.add_argument("--decode-steps", type=int, default=0,
                   help="profile this many decode steps after the prompt instead of the prefill (CUDA graphs as "
                        "served); per-token wall and GPU time exclude the prefill, measured on its own")
    p.add_argument("--quantization", choices=["fp8"], default=None, help="FP8 weights (as `serve --quantization`)")
    p.add_argument("--async-scheduling", action="store_true", help="decode with async scheduling")
    p.add_argument("--top", type=int, default=25, help="kernels listed")
    p.add_argument("--json", default=None)


def run(args: argparse.Namespace) -> int:
    from torch.profiler import ProfilerActivity, profile

    from pbs_engine import LLM, SamplingParams

    if args.decode_steps < 0:
        raise ValueError(f"--decode-steps {args.decode_steps} must be >= 0")
    path, load_format, cfg = model_source(args.model)
    attention, pbs = methods([args.method])[args.method]
    steps = args.decode_steps
    llm = LLM(path, load_format=load_format, skip_tokenizer_init=True, max_model_len=args.tokens + steps + 16,
              max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False, attention=attention,
              quantization=args.quantization, async_scheduling=args.async_scheduling)
    llm.set_prefill_attention(attention, pbs)
    params = SamplingParams(max_tokens=1 + steps, ignore_eos=True)
    prompt = {"prompt_token_ids": random_ids(args.tokens, cfg["vocab_size"], args.tokens)}
    llm.generate(prompt, params)  # compiles every kernel shape this length needs (and captures the decode graphs)
    prefill_wall = 0.0
    if steps:  # the prefill alone, to take out of the decode run's wall time
        torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate(prompt, SamplingParams(max_tokens=1, ignore_eos=True))
        torch.cuda.synchronize()
        prefill_wall = time.perf_counter() - start
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        out = llm.generate(prompt, params)[0]
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    from pbs_engine.kernels.pbs_prefill import ATTENTION_RANGE, SELECTION_RANGE

    # kernels only: the PBS ranges' GPU-side annotations span their kernels and would count them twice
    events = [e for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"
              and e.key not in (SELECTION_RANGE, ATTENTION_RANGE)]
    gpu = sum(e.device_time_total for e in events) / 1e6
    rows = [{"kernel": e.key[:70], "calls": e.count, "gpu_s": e.device_time_total / 1e6,
             "share": e.device_time_total / 1e6 / gpu} for e in sorted(events, key=lambda e: -e.device_time_total)]
    what = f"{steps} decode steps after {args.tokens} tokens" if steps else f"{args.tokens} tokens, {args.method}"
    print(f"device: {device_name()}, {versions()}; {args.model}{', fp8 weights' if args.quantization else ''}, "
          f"{what}")
    summary = [{"wall_s": wall, "ttft_s": out.metrics.ttft, "gpu_kernels_s": gpu, "wall_over_gpu": wall / gpu}]
    if steps:  # the prefill's kernels are in `gpu` too: its wall time stands in for them (it is ~1.0 wall/GPU)
        per_token = (wall - prefill_wall) / steps
        summary[0].update(prefill_wall_s=prefill_wall, decode_ms_per_token=per_token * 1e3,
                          decode_tok_per_s=1 / per_token,
                          decode_gpu_ms_per_token=max(0.0, gpu - prefill_wall) / steps * 1e3)
    print_table("one warm prefill (wall_over_gpu > 1: the GPU waited on the host)" if not steps else
                f"{steps} decode steps, batch 1 (decode_gpu_ms_per_token: kernel time less the prefill's wall time)",
                summary)
    print_table(f"top {args.top} kernels by GPU time", rows[:args.top])
    write_json(args.json, rows, summary=summary[0])
    return 0
