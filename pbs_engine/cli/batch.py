"""`pbs-engine batch`: summarise many (long) documents offline, one durable JSON line per document.

All documents go to the engine at once so it batches them; each result is appended with a single write and an
fsync as soon as it finishes, so a crash or Ctrl-C loses nothing written and `--resume` skips what is done.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pbs_engine.cli.common import add_model_args, add_sampling_args, llm_kwargs, sampling_params

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
    p.add_argument("--resume", action="store_true", help="skip documents whose id is already in --output")
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


class DocumentTooLong(ValueError):
    pass


def read_documents(inputs: list[str]) -> list[Document]:
    docs: list[Document] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
            docs += [Document(str(p), p.read_text(encoding="utf-8")) for p in files]
        elif path.suffix == ".jsonl":
            docs += _read_jsonl(path)
        elif path.suffix in TEXT_SUFFIXES:
            docs.append(Document(str(path), path.read_text(encoding="utf-8")))
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


def _read_jsonl(path: Path) -> list[Document]:
    docs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
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
    """Ids already in `output`; a torn last line (a write cut short) is cut off so appending stays valid JSONL."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        print(f"pbs-engine: {output}: dropping a torn last line ({len(data) - len(complete)} bytes)", file=sys.stderr)
        with open(output, "r+b") as f:
            f.truncate(len(complete))
    ids = set()
    for n, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
        try:
            ids.add(str(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{output}:{n}: not a result line ({e}); fix or move the file") from e
    return ids


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
        raise DocumentTooLong(f"the prompt is {len(ids)} tokens but only {room} fit with --max-tokens "
                              "(use --truncate to keep the start and end of long documents)")
    doc = tokenizer.encode(text, add_special_tokens=False)
    keep = room - (len(ids) - len(doc)) - len(tokenizer.encode(ELISION, add_special_tokens=False))
    for _ in range(4):  # retokenising at the cut can shift the count by a few tokens
        if keep < 2:
            raise DocumentTooLong(f"the prompt template alone leaves no room for the document in {room} tokens")
        head = keep // 2
        ids = render(tokenizer.decode(doc[:head]) + ELISION + tokenizer.decode(doc[len(doc) - (keep - head):]))
        if len(ids) <= room:
            return ids, True
        keep -= len(ids) - room
    raise DocumentTooLong(f"could not cut the document to fit {room} tokens")


class Progress:
    """A one-line progress bar on stderr: documents done, documents and tokens (prompt + generated) per second."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.done, self.tokens = total, 0, 0
        self.stream = stream
        self.tty = stream.isatty()
        self.start = self.last = time.monotonic()

    def update(self, tokens: int, finished: int) -> None:
        self.tokens += tokens
        self.done += finished
        now = time.monotonic()
        if now - self.last >= (0.2 if self.tty else 10.0) or (finished and self.done == self.total):
            self.last = now
            elapsed = max(now - self.start, 1e-9)
            filled = int(20 * self.done / max(1, self.total))
            line = (f"[{'#' * filled}{'.' * (20 - filled)}] {self.done}/{self.total} docs  "
                    f"{self.done / elapsed:.2f} docs/s  {self.tokens / elapsed:.0f} tok/s  {elapsed:.0f}s")
            self.stream.write("\r" + line if self.tty else line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


def run(args: argparse.Namespace) -> int:
    from pbs_engine import LLM

    if "{text}" not in args.prompt_template:
        raise ValueError("--prompt-template must contain the {text} placeholder")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit} must be >= 1")
    output = Path(args.output)
    docs = read_documents(args.inputs)
    if args.resume:
        done = done_ids(output)
        docs = [d for d in docs if d.id not in done]
    elif output.exists() and output.stat().st_size:
        raise ValueError(f"{output} already has results: pass --resume to continue it, or remove it")
    docs = docs[:args.limit]
    if not docs:
        print("pbs-engine: nothing to do: every document is already in the output", file=sys.stderr)
        return 0

    params = sampling_params(args)
    engine = LLM(**llm_kwargs(args)).engine
    tok = engine.tokenizer
    system = [{"role": "system", "content": args.system}] if args.system else []

    def render(text: str) -> list[int]:
        content = args.prompt_template.replace("{text}", text)
        return tok.encode_chat(system + [{"role": "user", "content": content}]) if tok.chat_template \
            else tok.encode(content)

    writer = ResultWriter(output)
    pending: dict[str, tuple[Document, bool]] = {}
    room = engine.config.max_model_len - params.max_tokens
    try:
        for doc in docs:
            try:
                ids, truncated = fit_prompt(render, tok, doc.text, room, args.truncate)
            except DocumentTooLong as e:
                print(f"pbs-engine: {doc.id}: {e}", file=sys.stderr)
                writer.write({"id": doc.id, "error": str(e)})
                continue
            pending[engine.add_request(ids, params, request_id=str(len(pending)))] = (doc, truncated)
        _generate(engine, pending, writer, Progress(len(pending)))
    except KeyboardInterrupt:
        print(f"\npbs-engine: interrupted; finished documents are in {output}; rerun with --resume", file=sys.stderr)
        raise
    finally:
        writer.close()
    return 0


def _generate(engine, pending: dict[str, tuple[Document, bool]], writer: ResultWriter, progress: Progress) -> None:
    seen: dict[str, int] = {}  # prompt + generated tokens counted so far, per request
    try:
        while engine.has_unfinished():
            tokens = finished = 0
            for out in engine.step():
                rid, c = out.request_id, out.outputs[0]
                total = len(out.prompt_token_ids) + len(c.token_ids)
                tokens += total - seen.get(rid, 0)
                seen[rid] = total
                if out.finished:
                    doc, truncated = pending.pop(rid)
                    m = out.metrics
                    record = {"id": doc.id, "summary": c.text.strip(), "prompt_tokens": len(out.prompt_token_ids),
                              "completion_tokens": len(c.token_ids),
                              "seconds": round(m.finished_time - m.arrival_time, 3), "finish_reason": c.finish_reason}
                    writer.write({**record, "truncated": True} if truncated else record)
                    finished += 1
            progress.update(tokens, finished)
    finally:
        progress.close()
        for rid in pending:
            engine.abort(rid)
