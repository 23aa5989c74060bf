"""Redraw the figures the docs pages show, from the measured data under docs/results/ (no GPU needed):
`PYTHONPATH=. python docs/figures.py`."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from pbs_engine.eval.plots import plot_all

DOCS = Path(__file__).resolve().parent
RESULTS = DOCS / "results"
FIGURES = DOCS / "figures"


def eval_density_by_layer() -> Path:
    """eval.md: block density per layer, Qwen2.5-Coder-0.5B at 32K, drawn by `pbs-engine eval`'s own plots."""
    out = FIGURES / "eval_density_by_layer.png"
    with tempfile.TemporaryDirectory() as tmp:
        plot_all(RESULTS / "h100" / "eval-qwen2.5-coder-0.5b.json", Path(tmp))
        shutil.copy(Path(tmp) / "density_by_layer.png", out)
    return out


def pbs_vs_density() -> Path:
    """kernels.md: PBS time (selection included) over our dense kernel's against block density, 128K tokens."""
    runs = json.loads((RESULTS / "h100" / "kernels.json").read_text())["runs"]
    rows = [r for r in next(r for r in runs if r["part"] == "pbs")["rows"]
            if r["tokens"] == 131072 and r["config"].startswith("budget") and not r["permute"] and not r["shared"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for reps, label in ((4, "default selection (4 pooled queries)"), (1, "one pooled query (query_reps=1)")):
        pts = sorted((r["density"], r["pbs_over_dense"]) for r in rows if r["query_reps"] == reps)
        ax.plot(*zip(*pts), marker="o", label=label)
    ax.plot([0, 0.22], [0, 0.22], ls=":", color="gray", label="time = density")
    ax.set(xlabel="block density", ylabel="PBS time / our dense time", xlim=(0, 0.22), ylim=(0, 0.27),
           title="PBS at 128K tokens, Qwen2.5-7B heads, H100")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = FIGURES / "pbs_vs_density.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


if __name__ == "__main__":
    FIGURES.mkdir(exist_ok=True)
    for path in (eval_density_by_layer(), pbs_vs_density()):
        print(f"wrote {path.relative_to(DOCS.parent)}")
