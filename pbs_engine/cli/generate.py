"""`pbs-engine generate`: answer prompts from the command line, a file or stdin."""
from __future__ import annotations

import argparse
import sys

from pbs_engine.cli.common import add_model_args, add_sampling_args, llm_kwargs, sampling_params


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text for one or more prompts",
                       description="Generate text. Prompts come from arguments, --file, or stdin (one per line). "
                                   "Instruct models get their chat template unless --raw is given.")
    p.add_argument("prompts", nargs="*", help="prompt texts (default: read lines from stdin)")
    p.add_argument("--file", "-f", help="read prompts from this file, one per line")
    p.add_argument("--raw", action="store_true", help="plain completion: no chat template")
    p.add_argument("--system", default=None, help="system message for the chat template")
    add_sampling_args(p, max_tokens=256, temperature=0.0)
    p.add_argument("--verbose", "-v", action="store_true")
    add_model_args(p)
    p.set_defaults(func=run)


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts:
        return list(args.prompts)
    if args.file:
        with open(args.file, encoding="utf-8") as f:
            lines = f.read().splitlines()
    else:
        lines = sys.stdin.read().splitlines()
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError("no prompt given: pass it as an argument, with --file, or on stdin")
    return prompts


def run(args: argparse.Namespace) -> int:
    from pbs_engine import LLM

    prompts = read_prompts(args)
    params = sampling_params(args)
    llm = LLM(**llm_kwargs(args))
    if args.raw or not llm.get_tokenizer().chat_template:
        outputs = llm.generate(prompts, params)
    else:
        system = [{"role": "system", "content": args.system}] if args.system else []
        outputs = llm.chat([system + [{"role": "user", "content": p}] for p in prompts], params)
    for out in outputs:
        print(out.text.strip() if len(outputs) == 1 else out.text.strip() + "\n")
        if args.verbose:
            m = out.metrics
            print(f"[{m.num_prompt_tokens} prompt tokens, {m.num_generated_tokens} generated, "
                  f"TTFT {m.ttft:.3f}s, finish={out.finish_reason}]", file=sys.stderr)
    return 0
