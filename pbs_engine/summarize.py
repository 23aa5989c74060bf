"""The summarisation job behind `pbs-engine batch` and its Ray replicas: each document's prompt (chat template,
fitted to the context), one engine run over all of them, and one result record per document: a summary, or an
error for a document that cannot be summarised (unreadable, empty, too long, failed in the engine)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

DEFAULT_TEMPLATE = "Summarise the following document in a few sentences.\n\n{text}"
ELISION = "\n\n[...]\n\n"  # where --truncate cut the middle of a document out


@dataclass
class Document:
    id: str
    text: str
    error: str | None = None  # why it cannot be read; it gets an error line instead of a summary


@dataclass
class Prepared:
    doc: Document
    ids: list[int] | None = None  # the prompt; None when the document cannot be summarised
    truncated: bool = False
    error: str | None = None


class DocumentError(ValueError):
    """A document that cannot be summarised: it gets an error record and the job goes on."""


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


class SummaryJob:
    """Summaries of documents with one engine. `run` yields one record per document as it finishes:
    {"id", "summary", "prompt_tokens", "completion_tokens", "seconds", "finish_reason"[, "truncated"]}, or
    {"id", "error"}."""

    def __init__(self, engine, params, template: str = DEFAULT_TEMPLATE, system: str | None = None,
                 truncate: bool = False):
        if "{text}" not in template:
            raise ValueError("--prompt-template must contain the {text} placeholder")
        self.engine, self.params, self.template, self.truncate = engine, params, template, truncate
        self.system = system
        self.room = engine.config.max_model_len - params.max_tokens

    def render(self, text: str) -> list[int]:
        return self.engine.tokenizer.encode_prompt(self.template.replace("{text}", text), self.system)

    def prompt(self, doc: Document) -> tuple[list[int], bool]:
        if doc.error:
            raise DocumentError(doc.error)
        if not doc.text.strip():
            raise DocumentError("the document is empty: nothing to summarise")
        return fit_prompt(self.render, self.engine.tokenizer, doc.text, self.room, self.truncate)

    def prepare(self, docs: list[Document]) -> list[Prepared]:
        """Every document's prompt, or the reason it has none."""
        prepared = []
        for doc in docs:
            try:
                prepared.append(Prepared(doc, *self.prompt(doc)))
            except DocumentError as e:
                prepared.append(Prepared(doc, error=str(e)))
        return prepared

    def run(self, prepared: list[Prepared], on_step: Callable[[int], None] | None = None) -> Iterator[dict]:
        """Records in finishing order (error records first); `on_step(tokens generated in the step)` after every
        engine step. Leaving the iterator early aborts what is still running."""
        pending: dict[str, Prepared] = {}
        seen: dict[str, int] = {}
        try:
            for p in prepared:
                if p.error is not None:
                    yield {"id": p.doc.id, "error": p.error}
                else:
                    pending[self.engine.add_request(p.ids, self.params)] = p
            while pending:
                generated = 0
                for out in self.engine.step():
                    c = out.outputs[0]
                    generated += len(c.token_ids) - seen.get(out.request_id, 0)
                    seen[out.request_id] = len(c.token_ids)
                    if out.finished:
                        yield self._record(out, pending.pop(out.request_id))
                if on_step is not None:
                    on_step(generated)
        finally:
            for rid in pending:
                self.engine.abort(rid)

    @staticmethod
    def _record(out, p: Prepared) -> dict:
        c, m, doc = out.outputs[0], out.metrics, p.doc
        if c.finish_reason == "error":
            return {"id": doc.id, "error": f"the engine failed on this document: {out.error}"}
        record = {"id": doc.id, "summary": c.text.strip(), "prompt_tokens": len(out.prompt_token_ids),
                  "completion_tokens": len(c.token_ids), "seconds": round(m.finished_time - m.arrival_time, 3),
                  "finish_reason": c.finish_reason}
        return {**record, "truncated": True} if p.truncated else record
