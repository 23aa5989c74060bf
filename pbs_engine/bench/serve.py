"""`pbs-engine bench serve`: what a long prompt does to everyone else. Running streams' inter-token gaps (p50/p99)
with and without a long prompt arriving, the TTFT of short prompts submitted with it, and the long prompt's own TTFT
against running alone; all in one run on one device (random weights in an exact shape, or any model)."""
from __future__ import annotations

import argparse
import time

from pbs_engine.bench.common import device_name, model_source, numbers, print_table, random_ids, write_json


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="random:qwen2.5-7b-1m", help="random:<shape> or any --model of the engine")
    p.add_argument("--streams", type=int, default=16, help="running streams (default: 16)")
    p.add_argument("--stream-len", type=int, default=1024, help="their prompt tokens")
    p.add_argument("--long", type=int, default=131072, help="the long prompt's tokens")
    p.add_argument("--shorts", type=int, default=8, help="short prompts submitted with the long one")
    p.add_argument("--short-len", type=int, default=1024)
    p.add_argument("--method", default="pbs-budget10", help="dense, pbs or pbs-budget10 (prefill attention)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--long-prefill-token-threshold", type=int, default=None)
    p.add_argument("--max-num-partial-prefills", type=int, default=4)
    p.add_argument("--baseline-steps", type=int, default=32, help="decode steps timed without the long prompt")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


class Clock:
    """Steps the engine, stamping every output: per request, the times its tokens arrived."""

    def __init__(self, engine):
        self.engine, self.times = engine, {}
        self.step_s: list[float] = []

    def step(self) -> None:
        start = time.perf_counter()
        outs = self.engine.step()
        now = time.perf_counter()
        self.step_s.append(now - start)
        for out in outs:
            self.times.setdefault(out.request_id, []).append(now)

    def gaps(self, ids: list[str], since: float, until: float) -> list[float]:
        gaps = []
        for rid in ids:
            t = [x for x in self.times.get(rid, []) if since <= x <= until]
            gaps += [b - a for a, b in zip(t, t[1:])]
        return gaps


def run(args: argparse.Namespace) -> int:
    from pbs_engine import LLM, SamplingParams
    from pbs_engine.bench.runtime import methods

    numbers(str(args.streams), "--streams")
    path, load_format, cfg = model_source(args.model)
    attention, pbs = methods([args.method])[args.method]
    budget = args.stream_len + args.long + args.shorts * args.short_len
    llm = LLM(path, load_format=load_format, skip_tokenizer_init=True, device=args.device, attention=attention,
              max_model_len=args.long + 64, max_num_batched_tokens=args.max_num_batched_tokens,
              max_num_partial_prefills=args.max_num_partial_prefills,
              long_prefill_token_threshold=args.long_prefill_token_threshold, enable_prefix_caching=False,
              max_num_seqs=max(8, args.streams + args.shorts + 1))
    llm.set_prefill_attention(attention, pbs)
    engine, vocab = llm.engine, cfg["vocab_size"]
    # the streams decode throughout (they are aborted at the end): as many tokens as max_model_len lets them
    stream_params = SamplingParams(max_tokens=args.long + 64 - args.stream_len, ignore_eos=True, temperature=0)
    first = SamplingParams(max_tokens=1, ignore_eos=True)

    def submit(n: int, seed: int, params) -> str:
        return engine.add_request(random_ids(n, vocab, seed), params)

    def until_first_token(ids: list[str], clock: Clock) -> None:
        while not all(rid in clock.times for rid in ids):
            clock.step()

    def long_alone() -> float:
        rid, clock = submit(args.long, 1, first), Clock(engine)
        start = time.perf_counter()
        until_first_token([rid], clock)
        return clock.times[rid][0] - start

    def contended(seed: int):
        """Streams decoding, then the long prompt and the shorts arrive; returns what was measured."""
        clock = Clock(engine)
        streams = [submit(args.stream_len, seed + i, stream_params) for i in range(args.streams)]
        until_first_token(streams, clock)
        base_start = time.perf_counter()
        for _ in range(args.baseline_steps):
            clock.step()
        base_end = time.perf_counter()
        baseline = clock.gaps(streams, base_start, base_end)
        arrival = time.perf_counter()
        long_id = submit(args.long, 1, first)
        shorts = [submit(args.short_len, seed + 100 + i, first) for i in range(args.shorts)]
        until_first_token([long_id, *shorts], clock)
        done = time.perf_counter()
        during = clock.gaps(streams, arrival, done)
        for rid in streams:
            engine.abort(rid)
        while engine.has_unfinished():
            engine.step()
        return clock, baseline, during, arrival, long_id, shorts

    long_alone()  # compiles every kernel shape the long prompt needs in one chunk
    alone = long_alone()
    contended(1000)  # and in the chunks of a contended step (their shapes differ: Triton compiles them once)
    clock, baseline, during, arrival, long_id, shorts = contended(2000)
    short_ttft = [clock.times[r][0] - arrival for r in shorts]
    chunk_s = max(clock.step_s[-len(during) - 1:] or [0.0])
    p99_base, p99_during = _percentile(baseline, 0.99), _percentile(during, 0.99)
    rows = [
        {"metric": "streams' inter-token gap p50 (s)", "with_long": _percentile(during, 0.5),
         "without_long": _percentile(baseline, 0.5)},
        {"metric": "streams' inter-token gap p99 (s)", "with_long": p99_during, "without_long": p99_base,
         "target": f"<= 2 x {p99_base:.3f} + one chunk ({chunk_s:.3f})" if p99_base is not None else None},
        {"metric": "short prompts' TTFT max (s)", "with_long": max(short_ttft) if short_ttft else None,
         "target": "<= 0.5 on an H200, 7B-1M shape"},
        {"metric": "long prompt's TTFT (s)", "with_long": clock.times[long_id][0] - arrival, "without_long": alone,
         "target": "<= 1.15 x alone"},
    ]
    for r in rows:
        if r.get("with_long") is not None and r.get("without_long"):
            r["ratio"] = r["with_long"] / r["without_long"]
    print(f"device: {device_name()}; {args.model}, {args.streams} streams of {args.stream_len}, a {args.long}-token "
          f"prompt with {args.shorts} of {args.short_len}, {args.method}; {budget} prompt tokens in all")
    print_table("serving a long prompt beside running streams", rows,
                ["metric", "with_long", "without_long", "ratio", "target"])
    write_json(args.json, rows)
    return 0
