"""`pbs-engine bench prefill|decode`: engine TTFT and decode speed against HF transformers, same GPU, same run."""
from __future__ import annotations

import argparse
import gc

import torch

from pbs_engine.bench.common import model_source, numbers, print_table, random_ids, wall_s, write_json
from pbs_engine.bench.shapes import SHAPES
from pbs_engine.kernels import PBSConfig


def add_args(p: argparse.ArgumentParser, prefill: bool) -> None:
    p.add_argument("--model", default="random:qwen2.5-7b-1m",
                   help=f"random:<shape> ({', '.join(SHAPES)}) for random weights, or any --model of the engine")
    if prefill:
        p.add_argument("--lengths", default="8192,32768,131072", help="prompt lengths in tokens")
        p.add_argument("--methods", default="dense,pbs,pbs-budget10", help="dense, pbs (threshold), pbs-budget10")
        p.add_argument("--hf-max-len", type=int, default=131072, help="longest prompt also run through HF")
        p.add_argument("--repeats", type=int, default=2, help="runs per cell; the fastest counts")
        p.add_argument("--text", choices=("random", "stdlib"), default="random",
                       help="prompts: random token ids, or Python stdlib source (real models)")
        p.add_argument("--paper-checkout", default=None, metavar="DIR",
                       help="a checkout of github:xinghaow99/pbs-attn: its PBS inside HF transformers as a peer")
        p.add_argument("--paper-thresholds", default="0.7,0.9", help="thresholds the paper's PBS runs at")
        p.add_argument("--no-profile", action="store_true",
                       help="skip the profiled run per cell (GPU time, wall/GPU, the selection's share)")
    else:
        p.add_argument("--batch-sizes", default="1,8,64")
        p.add_argument("--context", type=int, default=1024, help="prompt tokens per sequence")
        p.add_argument("--tokens", type=int, default=256, help="generated tokens per sequence")
        p.add_argument("--hf-max-batch", type=int, default=1, help="largest batch also run through HF")
        p.add_argument("--async-scheduling", action="store_true",
                       help="our engine with async scheduling (each decode step launched before the last is read)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF transformers peer")
    p.add_argument("--quantization", choices=["fp8"], default=None,
                   help="our engine with FP8 weights (the HF peer stays bf16)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto", help="our engine's KV cache dtype")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="prefill chunk size (default: the engine's, sized from memory)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")


def _hf_model(path: str, load_format: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    if load_format == "dummy":
        cfg = AutoConfig.from_pretrained(path)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa",
                                                     device_map="cuda")
    return model.eval()


def _release(*objs) -> None:
    del objs
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def hf_prefill(path: str, load_format: str, lengths: list[int], vocab: int, ids_for=None) -> dict[int, dict]:
    model = _hf_model(path, load_format)
    rows = {}
    with torch.no_grad():
        model(torch.tensor([random_ids(512, vocab, 0)], device="cuda"), logits_to_keep=1)
        for n in lengths:
            ids = torch.tensor([(ids_for or (lambda n: random_ids(n, vocab, n)))(n)], device="cuda")
            torch.cuda.reset_peak_memory_stats()
            try:
                t = wall_s(lambda: model(ids, logits_to_keep=1))
                rows[n] = {"ttft_s": t, "peak_gb": torch.cuda.max_memory_allocated() / 1e9}
            except torch.OutOfMemoryError:
                rows[n] = {"ttft_s": None, "peak_gb": None, "note": "OOM"}
            torch.cuda.empty_cache()
    _release(model)
    return rows


METHODS = {"dense": ("dense", None), "pbs": ("pbs", PBSConfig()), "pbs-budget10": ("pbs", PBSConfig.budget_of(0.10)),
           # PBS at every length (min_length 0): where the default falls back to dense, what PBS would have cost
           "pbs-always": ("pbs", PBSConfig(min_length=0)),
           "pbs-budget10-always": ("pbs", PBSConfig.budget_of(0.10, PBSConfig(min_length=0)))}


def methods(names: list[str]) -> dict[str, tuple[str, PBSConfig | None]]:
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    return {m: METHODS[m] for m in names}


def paper_prefill(path: str, load_format: str, lengths: list[int], vocab: int, checkout: str,
                  thresholds: list[float], ids_for) -> dict[int, dict[float, float]]:
    """TTFT of the paper's own PBS (github:xinghaow99/pbs-attn, imported from `checkout`, patched into HF
    transformers' attention as its README shows), per length and threshold."""
    import sys
    from pathlib import Path

    if not (Path(checkout) / "pbs_attn" / "patch" / "huggingface.py").is_file():
        raise ValueError(f"--paper-checkout {checkout}: no pbs_attn/patch/huggingface.py there; give a checkout of "
                         "github:xinghaow99/pbs-attn")
    sys.path.insert(0, checkout)
    from pbs_attn.patch.huggingface import apply_patch_with_prefill, get_permuted_block_sparse_attn_fwd

    model = _hf_model(path, load_format)
    rows: dict[int, dict[float, float]] = {}
    with torch.no_grad():
        for t in thresholds:
            apply_patch_with_prefill(model, get_permuted_block_sparse_attn_fwd(threshold=t))
            model(torch.tensor([random_ids(2048, vocab, 0)], device="cuda"), logits_to_keep=1)
            for n in lengths:
                ids = torch.tensor([ids_for(n)], device="cuda")
                try:
                    model(ids, logits_to_keep=1)  # compiles the shapes of this length
                    rows.setdefault(n, {})[t] = wall_s(lambda: model(ids, logits_to_keep=1))
                except torch.OutOfMemoryError:
                    rows.setdefault(n, {})[t] = None
                torch.cuda.empty_cache()
    _release(model)
    return rows


def prompt_source(text: str, path: str, load_format: str, vocab: int, longest: int):
    """n -> the prompt's token ids: random ids ("random"), or the first n tokens of Python's stdlib source under
    the model's tokenizer ("stdlib", real models: the text attention patterns and density come from)."""
    if text == "random":
        return lambda n: random_ids(n, vocab, n)
    if load_format == "dummy":
        raise ValueError("--text stdlib needs a real model (random weights have no tokenizer)")
    from pbs_engine.engine.tokenizer import Tokenizer
    from pbs_engine.eval.text import stdlib_text

    ids = Tokenizer(path).encode(stdlib_text(min_chars=5 * longest), add_special_tokens=False)
    if len(ids) < longest:
        raise ValueError(f"the stdlib source gave {len(ids)} tokens, fewer than --lengths' {longest}")
    return lambda n: ids[:n]


def run_prefill(args: argparse.Namespace) -> int:
    from pbs_engine import LLM, SamplingParams
    from pbs_engine.bench.common import gpu_profile
    from pbs_engine.kernels.pbs_prefill import ATTENTION_RANGE, SELECTION_RANGE

    lengths = numbers(args.lengths, "--lengths")
    path, load_format, cfg = model_source(args.model, min_positions=max(lengths) + 16)
    table = methods(args.methods.split(","))
    peer_lengths = [n for n in lengths if n <= args.hf_max_len]
    ids_for = prompt_source(args.text, path, load_format, cfg["vocab_size"], max(lengths))
    hf = {} if args.no_hf else hf_prefill(path, load_format, peer_lengths, cfg["vocab_size"], ids_for)
    thresholds = numbers(args.paper_thresholds, "--paper-thresholds", float)
    paper = paper_prefill(path, load_format, peer_lengths, cfg["vocab_size"], args.paper_checkout,
                          thresholds, ids_for) if args.paper_checkout else {}
    llm = LLM(path, load_format=load_format, skip_tokenizer_init=True, max_model_len=max(lengths) + 16,
              max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=8, quantization=args.quantization,
              kv_cache_dtype=args.kv_cache_dtype,
              enable_prefix_caching=False)  # every repeat computes the whole prompt
    chunk = llm.config.max_num_batched_tokens
    weights_gb = torch.cuda.memory_allocated() / 1e9
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    llm.generate({"prompt_token_ids": random_ids(2048, cfg["vocab_size"], 1)}, params)  # compile kernels
    rows = []
    for n in lengths:
        ids = ids_for(n)
        for name, (attention, pbs) in table.items():
            llm.set_prefill_attention(attention, pbs)
            torch.cuda.reset_peak_memory_stats()
            ttft, out = float("inf"), None
            for _ in range(args.repeats):  # the first run of a new shape pays Triton's JIT compilation
                out = llm.generate({"prompt_token_ids": ids}, params)[0]
                ttft = min(ttft, out.metrics.first_token_time - out.metrics.first_scheduled_time)
            peer = hf.get(n, {}).get("ttft_s")
            row = {"tokens": n, "method": name, "ttft_s": ttft, "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
                   "density": out.metrics.prefill_density, "hf_ttft_s": peer,
                   "ratio_vs_hf": ttft / peer if peer else None, "hf_peak_gb": hf.get(n, {}).get("peak_gb")}
            if pbs is not None and pbs.budget is None and paper.get(n, {}).get(pbs.threshold):
                row["paper_ttft_s"] = paper[n][pbs.threshold]
                row["ratio_vs_paper"] = ttft / paper[n][pbs.threshold]
            if not args.no_profile:
                prof = gpu_profile(lambda: llm.generate({"prompt_token_ids": ids}, params),
                                   (SELECTION_RANGE, ATTENTION_RANGE))
                row["gpu_s"] = prof["gpu_s"]
                row["wall_over_gpu"] = ttft / prof["gpu_s"]
                if attention == "pbs":
                    row["selection_share"] = prof[SELECTION_RANGE] / prof["gpu_s"]
                    row["sparse_attn_share"] = prof[ATTENTION_RANGE] / prof["gpu_s"]
            rows.append(row)
    print_table(f"prefill TTFT, {args.model}{', fp8 weights' if args.quantization else ''}, "
                f"{torch.cuda.get_device_name()}, chunk {chunk} tokens, "
                f"weights+cache {weights_gb:.1f} GB", rows,
                ["tokens", "method", "ttft_s", "gpu_s", "wall_over_gpu", "density", "selection_share",
                 "sparse_attn_share", "hf_ttft_s", "ratio_vs_hf", "paper_ttft_s", "ratio_vs_paper", "peak_gb",
                 "hf_peak_gb"])
    if paper:
        print_table("the paper's PBS (github:xinghaow99/pbs-attn) in HF transformers, TTFT s",
                    [{"tokens": n, **{f"threshold {t}": v for t, v in by_t.items()}} for n, by_t in paper.items()])
    write_json(args.json, rows, chunk=chunk, paper={str(n): v for n, v in paper.items()})
    return 0


def copy_bandwidth(nbytes: int = 1 << 32, reps: int = 10) -> float:
    """Device-to-device copy rate in bytes/s, read and write counted (the ceiling of a weight-streaming step)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * nbytes * reps / wall_s(lambda: [dst.copy_(src) for _ in range(reps)])


def hf_decode(path: str, load_format: str, batch_sizes: list[int], context: int, tokens: int, vocab: int):
    model = _hf_model(path, load_format)
    rows = {}
    with torch.no_grad():
        for b in batch_sizes:
            ids = torch.tensor([random_ids(context, vocab, i) for i in range(b)], device="cuda")
            gen = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
            prefill = wall_s(lambda: model.generate(ids, max_new_tokens=1, min_new_tokens=1, **gen))
            total = wall_s(lambda: model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **gen))
            rows[b] = b * (tokens - 1) / (total - prefill)
    _release(model)
    return rows


def run_decode(args: argparse.Namespace) -> int:
    from pbs_engine import LLM, SamplingParams

    path, load_format, cfg = model_source(args.model)
    sizes = numbers(args.batch_sizes, "--batch-sizes")
    hf = {} if args.no_hf else hf_decode(path, load_format, [b for b in sizes if b <= args.hf_max_batch],
                                         args.context, args.tokens, cfg["vocab_size"])
    llm = LLM(path, load_format=load_format, skip_tokenizer_init=True, max_model_len=args.context + args.tokens + 16,
              max_num_seqs=max(sizes), attention="dense", enable_prefix_caching=False, quantization=args.quantization,
              kv_cache_dtype=args.kv_cache_dtype, async_scheduling=args.async_scheduling)
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True, temperature=0)
    llm.generate([{"prompt_token_ids": random_ids(args.context, cfg["vocab_size"], 0)}] * 2, params)  # warm up
    rows = []
    for b in sizes:
        prompts = [{"prompt_token_ids": random_ids(args.context, cfg["vocab_size"], i)} for i in range(b)]
        outs = llm.generate(prompts, params)
        start = max(o.metrics.first_token_time for o in outs)
        end = max(o.metrics.finished_time for o in outs)
        tps = b * (args.tokens - 1) / (end - start)
        rows.append({"batch": b, "context": args.context, "tokens_per_s": tps, "hf_tokens_per_s": hf.get(b),
                     "ratio_vs_hf": tps / hf[b] if hf.get(b) else None})
    # batch 1 reads every weight once per token: its ceiling is the copy bandwidth over the weights' bytes
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.model.parameters())
    copy_bps = copy_bandwidth()
    limit = copy_bps / weight_bytes
    for row in rows:
        if row["batch"] == 1:
            row["bandwidth_limit_tokens_per_s"] = limit
            row["of_limit"] = row["tokens_per_s"] / limit
    print_table(f"decode throughput, {args.model}{', fp8 weights' if args.quantization else ''}"
                f"{', async scheduling' if args.async_scheduling else ''}, "
                f"{torch.cuda.get_device_name()}; copy {copy_bps / 1e12:.2f} TB/s, "
                f"weights {weight_bytes / 1e9:.2f} GB", rows,
                ["batch", "context", "tokens_per_s", "bandwidth_limit_tokens_per_s", "of_limit", "hf_tokens_per_s",
                 "ratio_vs_hf"])
    write_json(args.json, rows)
    return 0
