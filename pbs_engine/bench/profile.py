"""`pbs-engine bench profile`: where one warm prefill spends its time, wall clock against GPU kernel time
(torch.profiler), so host stalls show, with the kernels that take the most GPU time."""
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
    p.add_argument("--top", type=int, default=25, help="kernels listed")
    p.add_argument("--json", default=None)


def run(args: argparse.Namespace) -> int:
    from torch.profiler import ProfilerActivity, profile

    from pbs_engine import LLM, SamplingParams

    path, load_format, cfg = model_source(args.model)
    attention, pbs = methods([args.method])[args.method]
    llm = LLM(path, load_format=load_format, skip_tokenizer_init=True, max_model_len=args.tokens + 16,
              max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False, attention=attention)
    llm.set_prefill_attention(attention, pbs)
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    prompt = {"prompt_token_ids": random_ids(args.tokens, cfg["vocab_size"], args.tokens)}
    llm.generate(prompt, params)  # compiles every kernel shape this length needs
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
    print(f"device: {device_name()}, {versions()}; {args.model}, {args.tokens} tokens, {args.method}")
    summary = [{"wall_s": wall, "ttft_s": out.metrics.ttft, "gpu_kernels_s": gpu, "wall_over_gpu": wall / gpu}]
    print_table("one warm prefill (wall_over_gpu > 1: the GPU waited on the host)", summary)
    print_table(f"top {args.top} kernels by GPU time", rows[:args.top])
    write_json(args.json, rows, summary=summary[0])
    return 0
