"""`pbs-engine batch`: summarise many (long) documents offline, one durable JSON line per document.

All documents go to the engine at once so it batches them; each result is appended with a single write and an
fsync as soon as it finishes, so a crash or Ctrl-C loses nothing written and `--resume` skips what is done.
A document that cannot be summarised (unreadable, empty, too long) gets an error line instead and the batch goes
on; `--resume` retries those, replacing their error lines, so each document keeps exactly one line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pbs_engine.cli.common import add_model_args, add_sampling_args, load_llm, sampling_params
from pbs_engine.summarize import DEFAULT_TEMPLATE, Document, SummaryJob

TEXT_SUFFIXES = (".txt", ".md")


def register(sub) -> None:
    p = sub.add_parser("batch", help="summarise many documents offline into a JSONL file",
                       description="Summarise documents: .txt/.md files, folders of them, or .jsonl files of "
                                   "{\"id\", \"text\"} objects. Writes one JSON line per document to --output.")
    p.add_argument("inputs", nargs="+", help="files, folders or .jsonl files")
    p.add_argument("--output", "-o", required=True, help="JSONL file the results are appended to")
    p.add_argument("--prompt-template", default=DEFAULT_TEMPLATE,
                   help="the user message; {text} is replaced by the document (default: a summary request)")
    p.add_argument("--system", default=None, help="system message for the chat template")
    p.add_argument("--resume", action="store_true",
                   help="skip documents already summarised in --output; retry those with an error line")
    p.add_argument("--truncate", action="store_true",
                   help="cut the middle out of documents longer than the context (default: report them as errors)")
    p.add_argument("--limit", type=int, default=None, help="process at most N of the documents still to do")
    p.add_argument("--verbose", "-v", action="store_true")
    r = p.add_argument_group("Ray cluster (pip install \"pbs-engine[ray]\")")
    r.add_argument("--ray", action="store_true", help="summarise on a Ray cluster, one engine per replica")
    r.add_argument("--ray-address", default=None, help="the cluster to join (default: RAY_ADDRESS, else a local one)")
    r.add_argument("--replicas", type=int, default=1, help="engines (Ray actors) summarising at once (default: 1)")
    r.add_argument("--gpus-per-replica", type=float, default=0,
                   help="GPUs each replica asks Ray for (default: 0; give the tensor-parallel size on GPUs)")
    r.add_argument("--ray-batch-size", type=int, default=16, help="documents per batch handed to a replica")
    add_sampling_args(p, max_tokens=256, temperature=0.0)
    add_model_args(p)
    p.set_defaults(func=run)


def read_documents(inputs: list[str]) -> list[Document]:
    """Every document of the inputs; an input holding none is an error naming it."""
    docs: list[Document] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
            if not files:
                raise ValueError(f"{name}: no {' or '.join(TEXT_SUFFIXES)} files in this folder")
            docs += [_read_text(p) for p in files]
        elif path.suffix == ".jsonl":
            found = _read_jsonl(path)
            if not found:
                raise ValueError(f"{name}: no documents in this file (one {{\"id\", \"text\"}} object per line)")
            docs += found
        elif path.suffix in TEXT_SUFFIXES:
            docs.append(_read_text(path))
        elif not path.exists():
            raise FileNotFoundError(f"{name}: no such file or folder")
        else:
            raise ValueError(f"{name}: not a .txt, .md or .jsonl file, nor a folder")
    seen: set[str] = set()
    for doc in docs:
        if doc.id in seen:
            raise ValueError(f"document id {doc.id!r} appears twice in the inputs")
        seen.add(doc.id)
    return docs


def _read_text(path: Path) -> Document:
    try:
        return Document(str(path), path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        return Document(str(path), "", error=f"not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8")


def _read_jsonl(path: Path) -> list[Document]:
    docs = []
    for n, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from e
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("id"), (str, int)) or isinstance(obj.get("id"), bool):
            raise ValueError(f"{path}:{n}: each line needs an 'id' (string or integer)")
        if not isinstance(obj.get("text"), str):
            raise ValueError(f"{path}:{n}: 'text' must be a string")
        docs.append(Document(str(obj["id"]), obj["text"]))
    return docs


def done_ids(output: Path) -> set[str]:
    """Ids summarised in `output`. Error lines do not count: --resume retries those documents."""
    return {doc_id for doc_id, record, _ in _result_lines(output) if "error" not in record}


def drop_results(output: Path, ids: set[str]) -> None:
    """Rewrite `output` without the lines of `ids` (the error lines of documents retried now), atomically, so
    each document keeps exactly one line."""
    lines = _result_lines(output)
    keep = [raw for doc_id, _, raw in lines if doc_id not in ids]
    if len(keep) == len(lines):
        return
    tmp = output.with_name(output.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(b"".join(raw + b"\n" for raw in keep))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(output)


def _result_lines(output: Path) -> list[tuple[str, dict, bytes]]:
    """(id, record, raw line) for each line of `output`; a torn last line (a write cut short) is cut off so
    appending stays valid JSONL."""
    if not output.exists():
        return []
    data = output.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        print(f"pbs-engine: {output}: dropping a torn last line ({len(data) - len(complete)} bytes)", file=sys.stderr)
        with open(output, "r+b") as f:
            f.truncate(len(complete))
    lines = []
    for n, raw in enumerate(complete.splitlines(), start=1):
        try:
            record = json.loads(raw)
            lines.append((str(record["id"]), record, raw))
        except (ValueError, KeyError, TypeError) as e:  # ValueError: bad JSON or bad UTF-8
            raise ValueError(f"{output}:{n}: not a result line ({e}); fix or move the file") from e
    return lines


class ResultWriter:
    """Appends one JSON line per call with a single unbuffered write, then fsyncs."""

    def __init__(self, path: Path):
        self.file = open(path, "ab", buffering=0)

    def write(self, record: dict) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        if self.file.write(data) != len(data):
            raise OSError(f"{self.file.name}: short write")
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def run(args: argparse.Namespace) -> int:
    if "{text}" not in args.prompt_template:
        raise ValueError("--prompt-template must contain the {text} placeholder")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit} must be >= 1")
    output = Path(args.output)
    docs = read_documents(args.inputs)
    found = len(docs)
    if args.resume:
        done = done_ids(output)
        docs = [d for d in docs if d.id not in done]
    elif output.exists() and output.stat().st_size:
        raise ValueError(f"{output} already has results: pass --resume to continue it, or remove it")
    docs = docs[:args.limit]
    if not docs:
        print("pbs-engine: nothing to do: every document is already in the output", file=sys.stderr)
        return 0
    if args.resume:
        drop_results(output, {d.id for d in docs})
    print(f"pbs-engine: {len(docs)} of {found} documents to summarise into {output}", file=sys.stderr, flush=True)
    if getattr(args, "ray", False):
        from pbs_engine.ray import run_batch_on_ray

        return run_batch_on_ray(args, docs, output)
    job = SummaryJob(load_llm(args).engine, sampling_params(args), args.prompt_template, args.system, args.truncate)
    writer = ResultWriter(output)
    try:
        _summarise(job, docs, writer)
    except KeyboardInterrupt:
        print(f"\npbs-engine: interrupted; finished documents are in {output}; rerun with --resume", file=sys.stderr)
        raise
    finally:
        writer.close()
    return 0


def _summarise(job: SummaryJob, docs: list[Document], writer: ResultWriter) -> None:
    """Write every document's record as it finishes. The meter counts tokens: prompt tokens read and summary
    tokens generated, out of every prompt plus --max-tokens per unfinished summary (so the ETA covers both phases;
    a summary that stops early gives its unused tokens back)."""
    from pbs_engine.progress import progress

    engine, max_tokens = job.engine, job.params.max_tokens
    prepared = job.prepare(docs)
    prompts = [p for p in prepared if p.ids is not None]
    prompt_tokens, num_docs = sum(len(p.ids) for p in prompts), len(docs)
    queued = {p.doc.id for p in prompts}
    if prompts:
        n = len(prompts)
        print(f"pbs-engine: queued {n} document{'s' * (n > 1)}, {prompt_tokens} prompt tokens", file=sys.stderr)
    bar = progress(prompt_tokens + len(prompts) * max_tokens, "batch", unit="tok",
                   postfix=f"0/{num_docs} docs, 0/{prompt_tokens} prompt tokens read")
    state = {"done": 0, "read": 0, "generated": 0}

    def on_step(generated: int) -> None:
        state["generated"] += generated
        prompt_read = state["read"] + engine.num_prompt_tokens_computed()
        bar.set_postfix_str(f"{state['done']}/{num_docs} docs, {prompt_read}/{prompt_tokens} prompt tokens read, "
                            f"{state['generated']} generated", refresh=False)
        bar.update(prompt_read + state["generated"] - bar.n)

    try:
        for record in job.run(prepared, on_step):
            writer.write(record)
            state["done"] += 1
            if "error" in record:
                print(f"pbs-engine: {record['id']}: {record['error']}", file=sys.stderr)
                if record["id"] in queued:  # failed in the engine: its summary tokens will not come
                    bar.total -= max_tokens
                continue
            state["read"] += record["prompt_tokens"]
            bar.total -= max_tokens - record["completion_tokens"]
        on_step(0)
    finally:
        bar.close()
