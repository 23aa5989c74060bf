"""`pbs-engine eval`: PBS vs dense on real long text (LM fidelity, needle retrieval, attention error) with plots."""
from __future__ import annotations

import argparse
from pathlib import Path

from pbs_engine.cli.common import add_model_args, load_llm


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def register(sub) -> None:
    p = sub.add_parser("eval", help="quality of PBS against dense attention on real long text")
    p.add_argument("--lengths", type=_ints, default=[8192], help="LM-fidelity sequence lengths (tokens)")
    p.add_argument("--tasks", default="lm,attention,needle", help="any of lm, attention, needle")
    p.add_argument("--thresholds", type=_floats, default=[0.8, 0.9], help="extra PBS thresholds to sweep")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=FIELD:VALUE,...",
                   help="an extra PBS method: the configured PBS with these PBSConfig fields changed, e.g. "
                        "t9=threshold:0.9,query_reps:1 (repeatable)")
    p.add_argument("--needle-lengths", type=_ints, default=None, help="needle context lengths (default: --lengths)")
    p.add_argument("--needle-seeds", type=int, default=2, help="needle prompts per (length, depth, keys)")
    p.add_argument("--depths", type=_floats, default=[0.1, 0.5, 0.9], help="needle depths (0 = start)")
    p.add_argument("--out", default="eval-out", help="directory for results.json, summary.md and PNG figures")
    p.add_argument("--plot-only", action="store_true", help="only redraw figures from OUT/results.json")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pbs_engine.eval.plots import plot_all

    out = Path(args.out)
    if not args.plot_only:
        from pbs_engine.eval.run import run_eval

        tasks = args.tasks.split(",")
        unknown = set(tasks) - {"lm", "attention", "needle"}
        if unknown:
            raise ValueError(f"--tasks: unknown {sorted(unknown)}; choose from lm, attention, needle")
        from pbs_engine.eval.methods import parse_variant

        for spec in args.variant:
            parse_variant(spec)  # a bad spec fails before the model loads
        # every method must compute every prompt itself: no K/V reused from another method's run
        llm = load_llm(args, enable_prefix_caching=False)
        run_eval(llm, args.lengths, tasks, args.thresholds, args.needle_lengths or args.lengths, args.depths,
                 args.needle_seeds, out, args.variant)
        print((out / "summary.md").read_text())
    try:
        for path in plot_all(out / "results.json", out):
            print(f"wrote {path}")
    except ImportError:
        print("matplotlib is not installed: figures skipped (pip install matplotlib, then --plot-only)")
    return 0
