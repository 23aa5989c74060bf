"""After each step, the runner's sampled tokens become what a request returns (vLLM V1's output processor): tokens
appended, text detokenised incrementally, stop tokens and strings checked, logprobs accounted and decoded, streamed
text held back while it could still turn into a stop string."""
from __future__ import annotations

import time

from pbs_engine.engine.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from pbs_engine.engine.sequence import Sequence
from pbs_engine.engine.tokenizer import IncrementalDetokenizer, Tokenizer


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None, max_model_len: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len

    def add(self, seq: Sequence) -> None:
        """Settle a new request's stop tokens, token limit and detokenizer."""
        params = seq.params
        seq.max_tokens = params.max_tokens or self.max_model_len - seq.num_prompt_tokens
        eos = set() if params.ignore_eos or self.tokenizer is None else set(self.tokenizer.eos_token_ids)
        seq.stop_ids = set(params.stop_token_ids) | eos
        if self.tokenizer is not None:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.prompt_ids, params.skip_special_tokens)

    def append(self, seq: Sequence, tok: int) -> None:
        """Account one sampled token; sets seq.finish_reason when it ends the request."""
        now = time.time()
        if seq.metrics.first_token_time is None:
            seq.metrics.first_token_time = now
            for row in seq.prompt_logprobs or []:
                self._decode(row)
        seq.output_ids.append(tok)
        seq.metrics.num_generated_tokens = len(seq.output_ids)
        if seq.pending_logprobs is not None:
            seq.cumulative_logprob += seq.pending_logprobs[tok].logprob
            seq.logprobs.append(self._decode(seq.pending_logprobs))
            seq.pending_logprobs = None
        seq.new_text = seq.detokenizer.step(tok) if seq.detokenizer is not None else ""
        seq.text += seq.new_text
        may_stop = len(seq.output_ids) >= seq.params.min_tokens
        if tok in seq.stop_ids and may_stop:
            seq.finish_reason = "stop"
            seq.stop_reason = tok if tok in seq.params.stop_token_ids else None
        elif seq.params.stop_list and seq.new_text and may_stop:
            self._check_stop_strings(seq)
        if seq.finish_reason is None and (len(seq.output_ids) >= seq.max_tokens or len(seq) >= self.max_model_len):
            seq.finish_reason = "length"

    def output(self, seq: Sequence) -> RequestOutput:
        text = seq.text
        if seq.finish_reason is None and seq.params.stop_list:
            # hold back what could still become a stop string, so streamed text never shows part of one
            hold = max(len(s) for s in seq.params.stop_list) - 1
            text = text[:max(0, len(text) - hold)]
        completion = CompletionOutput(
            index=0, text=text, token_ids=list(seq.output_ids),
            cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
            logprobs=seq.logprobs, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason)
        return RequestOutput(request_id=seq.request_id, prompt=seq.prompt, prompt_token_ids=seq.prompt_ids,
                             prompt_logprobs=seq.prompt_logprobs, outputs=[completion],
                             finished=seq.finish_reason is not None, metrics=seq.metrics, error=seq.error)

    def _decode(self, row: PositionLogprobs | None) -> PositionLogprobs | None:
        if row is not None and self.tokenizer is not None:
            for token_id, lp in row.items():
                lp.decoded_token = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return row

    @staticmethod
    def _check_stop_strings(seq: Sequence) -> None:
        window = len(seq.new_text) + max(len(s) for s in seq.params.stop_list)
        start = max(0, len(seq.text) - window)
        hits = [(seq.text.find(s, start), s) for s in seq.params.stop_list]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return
        index, stop = min(hits)
        cut = index + len(stop) if seq.params.include_stop_str_in_output else index
        emitted = len(seq.text) - len(seq.new_text)
        seq.text = seq.text[:cut]
        seq.new_text = seq.text[emitted:]
        seq.finish_reason, seq.stop_reason = "stop", stop
