"""`pbs-engine bench cpu`: CPU prefill (TTFT of one real-text prompt) in dense and PBS modes against one forward
pass of HF transformers (SDPA attention, float32) on the same tokens, same threads, same run. No GPU needed."""
from __future__ import annotations

import argparse
import os
import statistics

import torch

from pbs_engine.bench.common import print_table, wall_s, write_json

METHODS = ("dense", "pbs")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="any --model of the engine (default: the embedded SmolLM2-135M)")
    p.add_argument("--length", type=int, default=4096, help="prompt tokens (default: 4096)")
    p.add_argument("--repeats", type=int, default=5, help="runs per method, interleaved; the median counts")
    p.add_argument("--threads", type=int, default=2, help="torch threads for both engines (default: 2)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF transformers peer")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")


def _prompt_ids(llm, length: int) -> list[int]:
    """`length` tokens of Python standard-library source, tokenised by the model's tokenizer."""
    from pbs_engine.eval.text import stdlib_text

    ids = llm.get_tokenizer().encode(stdlib_text(8 * length), add_special_tokens=False)
    if len(ids) < length:
        raise ValueError(f"--length {length}: the standard-library text gives only {len(ids)} tokens")
    return ids[:length]


def run(args: argparse.Namespace) -> int:
    from pbs_engine import LLM, SamplingParams
    from pbs_engine.engine.model_source import resolve_model

    for name in ("length", "repeats", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} {getattr(args, name)}: must be >= 1")
    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    llm = LLM(str(path), device="cpu", dtype="float32", max_model_len=args.length + 16,
              enable_prefix_caching=False)  # every repeat computes the whole prompt
    ids = _prompt_ids(llm, args.length)
    params = SamplingParams(max_tokens=1, ignore_eos=True)

    def ours(method: str) -> float:
        llm.set_prefill_attention(method)
        out = llm.generate({"prompt_token_ids": ids}, params)[0]
        return out.metrics.first_token_time - out.metrics.arrival_time

    runs = {m: [] for m in METHODS}
    hf_runs: list[float] = []
    hf = None if args.no_hf else _hf_model(path)
    prompt = torch.tensor([ids])
    for m in METHODS:  # warm up each path once on a short prompt
        llm.set_prefill_attention(m)
        llm.generate({"prompt_token_ids": ids[:256]}, params)
    with torch.inference_mode():
        if hf is not None:
            hf(prompt[:, :256], logits_to_keep=1)
        for _ in range(args.repeats):
            for m in METHODS:
                runs[m].append(ours(m))
            if hf is not None:
                hf_runs.append(wall_s(lambda: hf(prompt, logits_to_keep=1)))
    med = statistics.median
    hf_s = med(hf_runs) if hf_runs else None
    rows = [{"method": m, "tokens": args.length, "ours_s": med(runs[m]), "hf_s": hf_s,
             "hf_over_ours": hf_s / med(runs[m]) if hf_s else None, "tok_per_s": args.length / med(runs[m]),
             "ours_min_s": min(runs[m]), "hf_min_s": min(hf_runs) if hf_runs else None,
             "load_average": os.getloadavg()[0]}
            for m in METHODS]
    print_table(f"CPU prefill TTFT, {path.name}, {args.length} tokens, {args.threads} threads, float32, median of "
                f"{args.repeats} interleaved runs (load average {os.getloadavg()[0]:.2f} of {os.cpu_count()} CPUs)"
                "; hf_over_ours > 1: pbs-engine is faster", rows,
                ["method", "tokens", "ours_s", "hf_s", "hf_over_ours", "tok_per_s", "ours_min_s", "hf_min_s"])
    write_json(args.json, rows)
    return 0


def _hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32).eval()
