"""OpenAI response bodies for completions and chat completions: whole responses, stream chunks, logprobs, usage."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from pbs_engine.engine.outputs import PositionLogprobs, RequestOutput


@dataclass
class Job:
    """What the response needs to know about one HTTP request: its kind, ids and what it asked to get back."""

    id: str
    chat: bool
    model: str
    created: int
    prompt_lens: list[int]  # one per prompt; choice i belongs to prompt i // n
    n: int
    logprobs: int | None = None  # top alternatives per token; None: no logprobs
    include_usage: bool = False
    sent_text: list[int] = field(default_factory=list)  # streaming: characters already sent, per choice
    sent_tokens: list[int] = field(default_factory=list)  # streaming: tokens already sent, per choice

    @property
    def num_choices(self) -> int:
        return len(self.prompt_lens) * self.n

    def _envelope(self, chunk: bool) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def usage(self, outputs: list[RequestOutput]) -> dict:
        prompt = sum(self.prompt_lens)
        completion = sum(len(o.outputs[0].token_ids) for o in outputs)
        kept = sum(o.metrics.pbs_kept_blocks for o in outputs)
        visible = sum(o.metrics.pbs_visible_blocks for o in outputs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                # the share of causal attention blocks the prefill computed (PBS), 1.0 when it ran dense
                "prefill_density": kept / visible if visible else 1.0}

    def response(self, outputs: list[RequestOutput]) -> dict:
        """The whole response, `outputs` in choice order."""
        choices = []
        for i, out in enumerate(outputs):
            c = out.outputs[0]
            choice = {"index": i, "logprobs": self._logprobs(c.logprobs, c.token_ids, 0),
                      "finish_reason": c.finish_reason}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": c.text}
            else:
                choice["text"] = c.text
            choices.append(choice)
        return {**self._envelope(False), "choices": choices, "usage": self.usage(outputs)}

    def first_chunks(self) -> list[str]:
        """Chat streams open every choice with the assistant role."""
        self.sent_text = [0] * self.num_choices
        self.sent_tokens = [0] * self.num_choices
        if not self.chat:
            return []
        return [self._event(i, {"role": "assistant", "content": ""}, None, None) for i in range(self.num_choices)]

    def chunk(self, index: int, out: RequestOutput) -> str | None:
        """The event carrying what choice `index` produced since the last one, or None when nothing is new."""
        c = out.outputs[0]
        text, start = c.text[self.sent_text[index]:], self.sent_tokens[index]
        if not text and not out.finished:
            return None
        self.sent_text[index], self.sent_tokens[index] = len(c.text), len(c.token_ids)
        logprobs = self._logprobs(c.logprobs, c.token_ids, start)
        delta = {"content": text} if self.chat else text
        return self._event(index, delta, logprobs, c.finish_reason)

    def usage_chunk(self, outputs: list[RequestOutput]) -> str:
        return sse({**self._envelope(True), "choices": [], "usage": self.usage(outputs)})

    def _event(self, index: int, delta, logprobs, finish_reason) -> str:
        choice = {"index": index, ("delta" if self.chat else "text"): delta, "logprobs": logprobs,
                  "finish_reason": finish_reason}
        body = {**self._envelope(True), "choices": [choice]}
        if self.include_usage:
            body["usage"] = None
        return sse(body)

    def _logprobs(self, positions: list[PositionLogprobs] | None, token_ids: list[int], start: int) -> dict | None:
        if self.logprobs is None or positions is None:
            return None
        rows = list(zip(token_ids[start:], positions[start:]))
        if self.chat:
            return _chat_logprobs(rows, self.logprobs)
        before = sum(len(row[tok].decoded_token or "") for tok, row in zip(token_ids[:start], positions[:start]))
        return _completion_logprobs(rows, before)


def _completion_logprobs(rows: list[tuple[int, PositionLogprobs]], offset: int = 0) -> dict:
    """OpenAI's legacy logprobs; text_offset counts characters from the start of the completion (a stream chunk
    continues where the text already sent ends)."""
    tokens = [row[tok].decoded_token or "" for tok, row in rows]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [row[tok].logprob for tok, row in rows],
            "top_logprobs": [{lp.decoded_token or "": lp.logprob for lp in row.values()} for _, row in rows],
            "text_offset": offsets}


def _chat_logprobs(rows: list[tuple[int, PositionLogprobs]], top: int) -> dict:
    def entry(lp) -> dict:
        token = lp.decoded_token or ""
        return {"token": token, "logprob": lp.logprob, "bytes": list(token.encode("utf-8"))}

    content = []
    for tok, row in rows:
        best = sorted((lp for lp in row.values() if lp.rank is not None and lp.rank <= top), key=lambda lp: lp.rank)
        content.append({**entry(row[tok]), "top_logprobs": [entry(lp) for lp in best[:top]]})
    return {"content": content, "refusal": None}


def sse(body: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"
