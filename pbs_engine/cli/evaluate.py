"""`pbs-engine eval`: PBS vs dense on real long text (LM fidelity, needle retrieval, attention error) in process,
or RULER through lm-evaluation-harness against `pbs-engine serve` (--suite ruler); with plots."""
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
    p.add_argument("--suite", choices=["fidelity", "ruler"], default="fidelity",
                   help="fidelity (default): LM, attention and needle fidelity in process; ruler: RULER's offline "
                        "tasks through lm-evaluation-harness against `pbs-engine serve` (docs/eval.md)")
    p.add_argument("--lengths", type=_ints, default=None,
                   help="sequence lengths in tokens (default: 8192; ruler: 4096)")
    p.add_argument("--tasks", default=None,
                   help="any of lm, attention, needle (default: all); ruler: lm-eval RULER tasks (default: "
                        "niah_single_1,niah_multikey_2,niah_multikey_3,vt,cwe,fwe)")
    p.add_argument("--methods", default="dense,pbs,pbs-budget10",
                   help="ruler: dense, pbs, pbs-budgetNN (NN%% of the key blocks), pbs-tX (threshold X) "
                        "(default: dense,pbs,pbs-budget10)")
    p.add_argument("--samples", type=int, default=None,
                   help="ruler: samples per task and length, the first N of the 500 lm-eval generates (its --limit; "
                        "default: all 500)")
    p.add_argument("--num-concurrent", type=int, default=1,
                   help="ruler: requests lm-eval keeps in flight (default: 1, each prompt prefilled on its own)")
    p.add_argument("--resume", action="store_true",
                   help="ruler: keep the cells a previous run into --out finished with the same flags; run the rest")
    p.add_argument("--thresholds", type=_floats, default=[0.8, 0.9], help="extra PBS thresholds to sweep")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=FIELD:VALUE,...",
                   help="an extra PBS method: the configured PBS with these PBSConfig fields changed, e.g. "
                        "t9=threshold:0.9,query_reps:1 (repeatable)")
    p.add_argument("--text-file", type=Path, default=None,
                   help="fidelity: a UTF-8 text file to evaluate on instead of the Python stdlib source (e.g. one "
                        "RULER prompt); its tokens must cover --lengths")
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
    if args.suite == "ruler" and not args.plot_only:
        run_ruler_suite(args, out)
    elif not args.plot_only:
        from pbs_engine.eval.run import run_eval

        lengths = args.lengths or [8192]
        tasks = (args.tasks or "lm,attention,needle").split(",")
        unknown = set(tasks) - {"lm", "attention", "needle"}
        if unknown:
            raise ValueError(f"--tasks: unknown {sorted(unknown)}; choose from lm, attention, needle")
        from pbs_engine.eval.methods import parse_variant

        for spec in args.variant:
            parse_variant(spec)  # a bad spec fails before the model loads
        # every method must compute every prompt itself: no K/V reused from another method's run
        if args.text_file is not None and not args.text_file.is_file():
            raise ValueError(f"--text-file {args.text_file}: no such file")
        llm = load_llm(args, enable_prefix_caching=False)
        run_eval(llm, lengths, tasks, args.thresholds, args.needle_lengths or lengths, args.depths,
                 args.needle_seeds, out, args.variant, text_file=args.text_file)
        print((out / "summary.md").read_text())
    try:
        for path in plot_all(out / "results.json", out):
            print(f"wrote {path}")
    except ImportError:
        print("matplotlib is not installed: figures skipped (pip install matplotlib, then --plot-only)")
    return 0


def run_ruler_suite(args: argparse.Namespace, out: Path) -> None:
    from pbs_engine.engine.model_source import resolve_model
    from pbs_engine.eval.ruler import method_flags, run_ruler, server_max_len, task_names
    from pbs_engine.eval.served import model_flags

    tasks = task_names(args.tasks)
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        method_flags(m)  # a bad name fails before anything loads
    if args.samples is not None and args.samples < 1:
        raise ValueError(f"--samples {args.samples} must be >= 1")
    if args.num_concurrent < 1:
        raise ValueError(f"--num-concurrent {args.num_concurrent} must be >= 1")
    lengths = args.lengths or [4096]
    model_dir = resolve_model(args.model)
    max_len = server_max_len(lengths, model_dir, args.max_model_len)
    flags = ["--model", str(model_dir), *model_flags(args, skip=("model", "attention", "enable_prefix_caching",
                                                                  "max_model_len"))]
    run_ruler(flags, model_dir, tasks, lengths, methods, args.samples, max_len, out, args.num_concurrent,
              resume=args.resume)
    print((out / "summary.md").read_text())
