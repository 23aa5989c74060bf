"""Figures from an eval's results.json (matplotlib, PNG): density by layer, NLL and needle accuracy vs threshold,
the speed-quality frontier; for RULER, accuracy and prefill density vs length per method."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


def plot_all(results_path: Path, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(Path(results_path).read_text())
    written = []

    def save(fig, name):
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    if res.get("suite") == "ruler":
        save(_ruler_figure(res, plt), "ruler_accuracy.png")
        return written
    lm = res.get("lm", [])
    if lm:
        longest = max(r["tokens"] for r in lm)
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in lm:
            if r["tokens"] == longest and r["density_by_layer"]:
                ax.plot(r["density_by_layer"], marker="o", ms=3, label=r["method"])
        ax.set(xlabel="layer", ylabel="causal block density", title=f"PBS block density by layer, {longest} tokens")
        ax.legend(fontsize=7)
        save(fig, "density_by_layer.png")

        fig, ax = plt.subplots(figsize=(7, 4))
        for n in sorted({r["tokens"] for r in lm}):
            dense = next(r["nll"] for r in lm if r["tokens"] == n and r["method"] == "dense")
            pts = sorted((_threshold(r["method"], res), r["nll"]) for r in lm
                         if r["tokens"] == n and _threshold(r["method"], res) is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"PBS, {n} tokens")
                ax.axhline(dense, ls="--", lw=0.8, color=ax.lines[-1].get_color(), label=f"dense, {n} tokens")
        ax.set(xlabel="threshold", ylabel="NLL, last 1K tokens", title="NLL vs PBS threshold")
        ax.legend(fontsize=7)
        save(fig, "nll_vs_threshold.png")

        fig, ax = plt.subplots(figsize=(7, 4))
        for r in lm:
            if r["tokens"] == longest:
                ax.scatter(r["prefill_s"], r["nll"])
                ax.annotate(r["method"], (r["prefill_s"], r["nll"]), fontsize=7)
        ax.set(xlabel="prefill time (s)", ylabel="NLL, last 1K tokens", title=f"speed vs quality, {longest} tokens")
        save(fig, "speed_quality.png")

    needle = res.get("needle", [])
    if needle:
        acc = defaultdict(list)
        for r in needle:
            acc[r["method"]].append(r["correct"])
        pts = sorted((_threshold(m, res), sum(v) / len(v)) for m, v in acc.items() if _threshold(m, res) is not None)
        fig, ax = plt.subplots(figsize=(7, 4))
        if pts:
            ax.plot(*zip(*pts), marker="o", label="PBS")
        if "dense" in acc:
            ax.axhline(sum(acc["dense"]) / len(acc["dense"]), ls="--", color="k", label="dense")
        ax.set(xlabel="threshold", ylabel="needle accuracy", ylim=(0, 1.05), title="Needle accuracy vs threshold")
        ax.legend(fontsize=7)
        save(fig, "needle_vs_threshold.png")
    return written


def _ruler_figure(res: dict, plt):
    from pbs_engine.eval.ruler import cell_means

    means, lengths = cell_means(res), res["lengths"]
    fig, (acc, dens) = plt.subplots(1, 2, figsize=(10, 4))
    for method in res["methods"]:
        acc.plot(lengths, [100 * means[method, n][0] for n in lengths], marker="o", label=method)
        points = [(n, means[method, n][1]) for n in lengths if means[method, n][1] is not None]
        if points:
            dens.plot(*zip(*points), marker="o", label=method)
    for ax in (acc, dens):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths])
        ax.legend(fontsize=7)
    acc.set(xlabel="context length (tokens)", ylabel="accuracy %, mean over tasks", ylim=(0, 105),
            title=f"RULER, {len(res['tasks'])} tasks")
    dens.set(xlabel="context length (tokens)", ylabel="mean prefill density", ylim=(0, 1.05),
             title="share of causal attention blocks computed")
    return fig


def _threshold(method: str, res: dict) -> float | None:
    if method == "pbs":
        return res["config"]["threshold"]
    if method.startswith("pbs-t"):
        return float(method[5:])
    return None
