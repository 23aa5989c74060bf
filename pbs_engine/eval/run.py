"""Run the evaluations that `pbs-engine eval` names and write results.json, summary.md and the figures."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from pbs_engine.eval.fidelity import attention_fidelity, lm_fidelity
from pbs_engine.eval.methods import methods as method_table
from pbs_engine.eval.needle import needle_accuracy
from pbs_engine.eval.text import stdlib_text


def run_eval(llm, lengths: list[int], tasks: list[str], thresholds: list[float], needle_lengths: list[int],
             depths: list[float], needle_seeds: int, out_dir: Path, variants: list[str] | None = None,
             text_file: Path | None = None) -> dict:
    limit = llm.config.max_model_len
    too_long = [n for n in lengths + needle_lengths if n > limit]
    if too_long:
        raise ValueError(f"--lengths/--needle-lengths {max(too_long)}: beyond the model's context ({limit} tokens, "
                         f"--max-model-len); give lengths up to {limit}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model = llm.model
    tok = llm.get_tokenizer()
    base = llm.config.pbs
    table = method_table(base, thresholds, variants)
    text = text_file.read_text() if text_file else stdlib_text(min_chars=5 * max(lengths + needle_lengths))
    ids = tok.encode(text, add_special_tokens=False)
    if len(ids) < max(lengths):
        raise ValueError(f"only {len(ids)} tokens of text{f' in {text_file}' if text_file else ''} for --lengths "
                         f"up to {max(lengths)}")
    results: dict = {"model": str(llm.model_dir), "device": _device_name(llm), "config": asdict(base),
                     "text": str(text_file) if text_file else "stdlib"}
    if "lm" in tasks:
        results["lm"] = [row for n in lengths for row in lm_fidelity(model, ids[:n], table, last=min(1024, n // 2))]
    if "attention" in tasks:
        results["attention"] = attention_fidelity(model, ids[:max(lengths)], table)
    if "needle" in tasks:
        needle_methods = {k: v for k, v in table.items() if k != "pbs-budget10"}
        results["needle"] = needle_accuracy(llm, ids, needle_methods, needle_lengths, depths, needle_seeds)
    path = out_dir / "results.json"
    path.write_text(json.dumps(results, indent=1))
    (out_dir / "summary.md").write_text(summary(results))
    return results


def summary(results: dict) -> str:
    lines = [f"model: {results['model']}  device: {results['device']}", ""]
    if results.get("lm"):
        scored = sorted({r.get("scored", min(1024, r["tokens"] // 2)) for r in results["lm"]})
        last = f"last {scored[0]}" if len(scored) == 1 else "last min(1024, tokens / 2)"
        lines += [f"| tokens | method | NLL {last} | vs dense | top-1 agree | KL(dense‖m) | top-1 agree, all "
                  "positions | density | prefill s |", "|---|---|---|---|---|---|---|---|---|"]
        dense = {r["tokens"]: r["nll"] for r in results["lm"] if r["method"] == "dense"}
        for r in results["lm"]:
            rel = (r["nll"] / dense[r["tokens"]] - 1) * 100
            lines.append(f"| {r['tokens']} | {r['method']} | {r['nll']:.4f} | {rel:+.2f}% | "
                         f"{r['top1_agreement'] * 100:.2f}% | {r['kl_from_dense']:.4f} | "
                         f"{r['top1_agreement_all'] * 100:.2f}% | {r['density']:.3f} | "
                         f"{r['prefill_s']:.3f} |")
        lines.append("")
    if results.get("needle"):
        acc: dict = {}
        for r in results["needle"]:
            acc.setdefault((r["method"], r["tokens"]), []).append(r["correct"])
        lines += ["| method | tokens | needle accuracy |", "|---|---|---|"]
        lines += [f"| {m} | {n} | {sum(v)}/{len(v)} |" for (m, n), v in sorted(acc.items())]
        lines.append("")
    if results.get("attention"):
        per: dict = {}
        for r in results["attention"]:
            per.setdefault(r["method"], []).append(r)
        lines += ["| method | density | mean rel. error of attention output | max over layers | attention recall "
                  "(mean) | worst layer's 1st percentile | worst head |", "|---|---|---|---|---|---|---|"]
        for m, rs in per.items():
            def mean(key):
                return sum(r[key] for r in rs) / len(rs)
            recall = (f"{mean('recall_mean'):.4f} | {min(r['recall_p01'] for r in rs):.4f} | "
                      f"{min(r['recall_worst_head'] for r in rs):.4f}") if "recall_mean" in rs[0] else "- | - | -"
            lines.append(f"| {m} | {mean('density'):.3f} | {mean('rel_error'):.4f} | "
                         f"{max(r['rel_error'] for r in rs):.4f} | {recall} |")
    return "\n".join(lines) + "\n"


def _device_name(llm) -> str:
    dev = llm.device
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
