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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pbs_engine.cli.common import add_model_args, add_sampling_args, load_llm, sampling_params

DEFAULT_TEMPLATE = "Summarise the following document in a few sentences.\n\n{text}"
TEXT_SUFFIXES = (".txt", ".md")
ELISION = "\n\n[...]\n\n"  # where --truncate cut the middle of a document out


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
    add_sampling_args(p, max_tokens=256, temperature=0.0)
    add_model_args(p)
    p.set_defaults(func=run)


@dataclass
class Document:
    id: str
    text: str
    error: str | None = None  # why it cannot be read; it gets an error line instead of a summary


class DocumentError(ValueError):
    """A document that cannot be summarised: it gets an error line in the output and the batch goes on."""


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


def fit_prompt(render: Callable[[str], list[int]], tokenizer, text: str, room: int, truncate: bool
               ) -> tuple[list[int], bool]:
    """Prompt ids leaving `room` tokens of context for the summary, and whether the document was cut to fit."""
    ids = render(text)
    if len(ids) <= room:
        return ids, False
    if not truncate:
        raise DocumentError(f"the prompt is {len(ids)} tokens but only {room} fit with --max-tokens "
                              "(use --truncate to keep the start and end of long documents)")
    doc = tokenizer.encode(text, add_special_tokens=False)
    keep = room - (len(ids) - len(doc)) - len(tokenizer.encode(ELISION, add_special_tokens=False))
    for _ in range(4):  # retokenising at the cut can shift the count by a few tokens
        if keep < 2:
            raise DocumentError(f"the prompt template alone leaves no room for the document in {room} tokens")
        head = keep // 2
        ids = render(tokenizer.decode(doc[:head]) + ELISION + tokenizer.decode(doc[len(doc) - (keep - head):]))
        if len(ids) <= room:
            return ids, True
        keep -= len(ids) - room
    raise DocumentError(f"could not cut the document to fit {room} tokens")


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

    params = sampling_params(args)
    engine = load_llm(args).engine
    tok = engine.tokenizer
    system = [{"role": "system", "content": args.system}] if args.system else []
    room = engine.config.max_model_len - params.max_tokens

    def render(text: str) -> list[int]:
        content = args.prompt_template.replace("{text}", text)
        return tok.encode_chat(system + [{"role": "user", "content": content}]) if tok.chat_template \
            else tok.encode(content)

    def prompt(doc: Document) -> tuple[list[int], bool]:
        if doc.error:
            raise DocumentError(doc.error)
        if not doc.text.strip():
            raise DocumentError("the document is empty: nothing to summarise")
        return fit_prompt(render, tok, doc.text, room, args.truncate)

    writer = ResultWriter(output)
    pending: dict[str, tuple[Document, bool]] = {}
    prompt_tokens = 0
    try:
        for doc in docs:
            try:
                ids, truncated = prompt(doc)
            except DocumentError as e:
                print(f"pbs-engine: {doc.id}: {e}", file=sys.stderr)
                writer.write({"id": doc.id, "error": str(e)})
                continue
            pending[engine.add_request(ids, params, request_id=str(len(pending)))] = (doc, truncated)
            prompt_tokens += len(ids)
        if pending:
            n = len(pending)
            print(f"pbs-engine: queued {n} document{'s' * (n > 1)}, {prompt_tokens} prompt tokens", file=sys.stderr)
            _generate(engine, pending, writer, prompt_tokens, params.max_tokens)
    except KeyboardInterrupt:
        print(f"\npbs-engine: interrupted; finished documents are in {output}; rerun with --resume", file=sys.stderr)
        raise
    finally:
        writer.close()
    return 0


def _generate(engine, pending: dict[str, tuple[Document, bool]], writer: ResultWriter, prompt_tokens: int,
              max_tokens: int) -> None:
    """Step the engine until every pending document is written. The meter counts tokens: prompt tokens read and
    summary tokens generated, out of every prompt plus --max-tokens per unfinished summary (so the ETA covers
    both phases; a summary that stops early gives its unused tokens back)."""
    from pbs_engine.progress import progress

    num_docs, done, generated = len(pending), 0, 0
    read = 0  # prompt tokens of the finished documents
    seen: dict[str, int] = {}  # tokens generated so far, per request
    bar = progress(prompt_tokens + num_docs * max_tokens, "batch", unit="tok",
                   postfix=f"0/{num_docs} docs, 0/{prompt_tokens} prompt tokens read")
    try:
        while engine.has_unfinished():
            for out in engine.step():
                rid, c = out.request_id, out.outputs[0]
                generated += len(c.token_ids) - seen.get(rid, 0)
                seen[rid] = len(c.token_ids)
                if out.finished:
                    doc, truncated = pending.pop(rid)
                    m = out.metrics
                    record = {"id": doc.id, "summary": c.text.strip(), "prompt_tokens": len(out.prompt_token_ids),
                              "completion_tokens": len(c.token_ids),
                              "seconds": round(m.finished_time - m.arrival_time, 3), "finish_reason": c.finish_reason}
                    writer.write({**record, "truncated": True} if truncated else record)
                    done += 1
                    read += len(out.prompt_token_ids)
                    bar.total -= max_tokens - len(c.token_ids)
            prompt_read = read + engine.num_prompt_tokens_computed()
            bar.set_postfix_str(f"{done}/{num_docs} docs, {prompt_read}/{prompt_tokens} prompt tokens read, "
                                f"{generated} generated", refresh=False)
            bar.update(prompt_read + generated - bar.n)
    finally:
        bar.close()
        for rid in pending:
            engine.abort(rid)
