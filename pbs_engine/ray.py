"""Offline summarisation over a Ray cluster (`pip install "pbs-engine[ray]"`).

`Summarizer` is a callable class for `ray.data.Dataset.map_batches`: each replica (a Ray actor) builds one engine
and summarises the batches of {"id", "text"} rows it is given. `pbs-engine batch --ray` runs the same job as the
single-process command over the cluster: the driver reads the documents and skips the finished ones (`--resume`),
the replicas summarise, and the driver appends each record to the output as its batch arrives, so every document
is written once; a replica that dies has its batch retried by Ray on another one.

    import ray
    from pbs_engine.ray import Summarizer

    ds = ray.data.read_json("docs.jsonl")  # rows with "id" and "text"
    out = ds.map_batches(Summarizer, fn_constructor_kwargs={"model": "qwen2.5-7b-1m", "max_tokens": 256},
                         batch_size=16, num_gpus=1, concurrency=4)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pbs_engine.summarize import DEFAULT_TEMPLATE, Document, SummaryJob

COLUMNS = ("id", "summary", "error", "prompt_tokens", "completion_tokens", "seconds", "finish_reason", "truncated")


class Summarizer:
    """One engine per replica; a batch of rows {"id", "text"} in, one record per row out (columns COLUMNS, None
    where a record has no such field)."""

    def __init__(self, model: str | None = None, *, max_tokens: int = 256, temperature: float = 0.0,
                 prompt_template: str = DEFAULT_TEMPLATE, system: str | None = None, truncate: bool = False,
                 **llm_kwargs):
        from pbs_engine import LLM, SamplingParams

        self.llm = LLM(model, **llm_kwargs)
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
        self.job = SummaryJob(self.llm.engine, params, prompt_template, system, truncate)

    def __call__(self, batch: dict) -> dict:
        docs = [Document(str(i), str(t)) for i, t in zip(batch["id"], batch["text"])]
        records = {r["id"]: r for r in self.job.run(self.job.prepare(docs))}
        rows = [records[d.id] for d in docs]
        return {c: [r.get(c) for r in rows] for c in COLUMNS}


def run_batch_on_ray(args: argparse.Namespace, docs: list[Document], output: Path) -> int:
    """`pbs-engine batch --ray`: the documents summarised by --replicas Summarizer actors, records appended to
    `output` by this driver as they arrive."""
    try:
        import ray
    except ImportError:
        raise ValueError("--ray needs Ray: pip install \"pbs-engine[ray]\"") from None
    from pbs_engine.cli.batch import ResultWriter
    from pbs_engine.cli.common import llm_kwargs

    if args.replicas < 1:
        raise ValueError(f"--replicas {args.replicas} must be >= 1")
    ray.init(address=args.ray_address, ignore_reinit_error=True, include_dashboard=False,
             log_to_driver=args.verbose)
    kwargs = llm_kwargs(args)
    model = kwargs.pop("model")
    blocks = max(1, min(len(docs), -(-len(docs) // args.ray_batch_size)))  # enough blocks for every replica
    ds = ray.data.from_items([{"id": d.id, "text": d.text} for d in docs], override_num_blocks=blocks)
    summaries = ds.map_batches(
        Summarizer, batch_size=args.ray_batch_size, concurrency=args.replicas, num_gpus=args.gpus_per_replica,
        fn_constructor_kwargs=dict(model=model, max_tokens=args.max_tokens, temperature=args.temperature,
                                   prompt_template=args.prompt_template, system=args.system,
                                   truncate=args.truncate, **kwargs),
        max_restarts=-1, max_task_retries=-1)  # a replica that dies is restarted and its batch run again
    writer = ResultWriter(output)
    written = 0
    try:
        for row in summaries.iter_rows():
            record = {c: row[c] for c in COLUMNS if row.get(c) is not None}
            writer.write(record)
            written += 1
            if "error" in record:
                print(f"pbs-engine: {record['id']}: {record['error']}", file=sys.stderr)
            print(f"pbs-engine: {written}/{len(docs)} documents", file=sys.stderr, flush=True)
    finally:
        writer.close()
    return 0
