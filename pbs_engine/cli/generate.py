"""`pbs-engine generate`: answer prompts from the command line, a file or stdin, streaming the answers."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import TYPE_CHECKING

from pbs_engine.cli.common import add_model_args, add_sampling_args, load_llm, sampling_params

if TYPE_CHECKING:
    from pbs_engine import RequestOutput


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text for one or more prompts",
                       description="Generate text. Prompts come from arguments, --file, or stdin (one per line). "
                                   "Instruct models get their chat template unless --raw is given. Answers stream "
                                   "as they are generated, in prompt order.")
    p.add_argument("prompts", nargs="*", help="prompt texts (default: read lines from stdin)")
    p.add_argument("--file", "-f", help="read prompts from this file, one per line")
    p.add_argument("--raw", action="store_true", help="plain completion: no chat template")
    p.add_argument("--system", default=None, help="system message for the chat template")
    p.add_argument("-n", type=int, default=1, metavar="N",
                   help="completions per prompt (default: 1); with --seed S, completion j samples with seed S+j")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per completion (prompt, index, text, token counts, finish_reason, "
                        "metrics) instead of streamed text")
    add_sampling_args(p, max_tokens=256, temperature=0.0)
    p.add_argument("--verbose", "-v", action="store_true", help="token counts and timings of each answer on stderr")
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


def record(prompt: str, index: int, out: RequestOutput) -> dict:
    """The --json object of one finished completion."""
    m = out.metrics
    return {"prompt": prompt, "index": index, "text": out.text, "prompt_tokens": len(out.prompt_token_ids),
            "completion_tokens": len(out.token_ids), "finish_reason": out.finish_reason,
            "stop_reason": out.outputs[0].stop_reason,
            "metrics": {"ttft_s": m.ttft, "time_per_output_token_s": m.time_per_output_token,
                        "total_s": m.finished_time - m.arrival_time, "cached_prompt_tokens": m.num_cached_tokens}}


def run(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise ValueError(f"-n {args.n} must be >= 1")
    prompts = read_prompts(args)
    params = sampling_params(args)
    samples = [params if params.seed is None else replace(params, seed=params.seed + j) for j in range(args.n)]
    llm = load_llm(args)
    tok = llm.get_tokenizer()
    inputs = [{"prompt": p, "prompt_token_ids": tok.encode_prompt(p, args.system, args.raw)} for p in prompts]
    total = len(prompts) * args.n

    positions: dict[str, int] = {}  # request id -> completion number; first outputs come in submission order
    latest: dict[int, RequestOutput] = {}  # completion number -> its newest RequestOutput, until printed
    current, shown = 0, 0  # the completion printed now, and how much of its (stripped) text is out
    for out in llm.stream([x for x in inputs for _ in samples], samples * len(prompts)):
        latest[positions.setdefault(out.request_id, len(positions))] = out
        while current in latest:
            out = latest[current]
            if not args.json:
                text = out.text.strip()  # grows by appending, so what is shown stays a prefix of it
                print(text[shown:], end="", flush=True)
                shown = len(text)
            if not out.finished:
                break
            prompt, index = divmod(current, args.n)
            if args.json:
                print(json.dumps(record(prompts[prompt], index, out), ensure_ascii=False), flush=True)
            else:
                print("\n" if total > 1 else "", flush=True)
            if args.verbose:
                m = out.metrics
                print(f"[{m.num_prompt_tokens} prompt tokens, {m.num_generated_tokens} generated, "
                      f"TTFT {m.ttft:.3f}s, finish={out.finish_reason}]", file=sys.stderr)
            del latest[current]
            current, shown = current + 1, 0
    return 0
