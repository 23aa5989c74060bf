"""The engine loop: requests in, one scheduled step at a time, RequestOutputs (for streaming) out."""
from __future__ import annotations

import itertools
import time

from pbs_engine.engine.block_manager import BlockManager
from pbs_engine.engine.config import EngineConfig
from pbs_engine.engine.model_runner import ModelRunner
from pbs_engine.engine.model_source import resolve_model
from pbs_engine.engine.outputs import CompletionOutput, RequestOutput
from pbs_engine.engine.sampling_params import SamplingParams
from pbs_engine.engine.scheduler import Scheduler
from pbs_engine.engine.sequence import Sequence
from pbs_engine.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from pbs_engine.models.config import ModelConfig


class StepError(RuntimeError):
    """A batch failed on the device; names the requests it held so only they need failing."""

    def __init__(self, request_ids: list[str], cause: Exception):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.request_ids = request_ids


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.model_dir = resolve_model(config.model)
        model_config = ModelConfig.from_dir(self.model_dir)
        from_model = config.max_model_len is None
        if from_model:
            config.max_model_len = model_config.max_position_embeddings
        elif config.max_model_len > model_config.max_position_embeddings:
            raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's max_position_embeddings="
                             f"{model_config.max_position_embeddings}")
        self.tokenizer = None if config.skip_tokenizer_init else Tokenizer(self.model_dir, config.chat_template)
        self.runner = ModelRunner(config, str(self.model_dir), from_model)
        self.model_config = self.runner.model_config
        self.blocks = BlockManager(self.runner.num_kv_blocks, config.kv_block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.chunked_prefill)
        self.seqs: dict[str, Sequence] = {}
        self._ids = itertools.count()

    # ---- requests -------------------------------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError naming the problem if the request cannot run; nothing is queued."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad!r} is outside the vocabulary [0, {vocab})")
        limit = self.config.max_model_len
        wanted = len(prompt_ids) + (params.max_tokens or 1)
        if wanted > limit:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens plus max_tokens={params.max_tokens} is "
                             f"{wanted} tokens, more than max_model_len={limit}")

    def add_request(self, prompt_ids: list[int], params: SamplingParams, prompt: str | None = None,
                    request_id: str | None = None) -> str:
        self.validate(prompt_ids, params)
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        seq = Sequence(request_id, prompt, prompt_ids, params)
        seq.max_tokens = params.max_tokens or self.config.max_model_len - len(prompt_ids)
        eos = set() if params.ignore_eos or self.tokenizer is None else set(self.tokenizer.eos_token_ids)
        seq.stop_ids = set(params.stop_token_ids) | eos
        if self.tokenizer is not None:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)
        self.seqs[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request at once and free its cache blocks."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return None
        seq.finish_reason = "abort"
        self._finish(seq)
        return self._output(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def num_prompt_tokens_computed(self) -> int:
        """Prompt tokens whose K/V are in the cache, over the unfinished requests: prefill progress for a bar."""
        return sum(min(seq.num_computed_tokens, seq.num_prompt_tokens) for seq in self.seqs.values())

    # ---- the loop ---------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one batch; return an output for every request that produced text or finished in it."""
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        now = time.time()
        for seq in batch.seqs:
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = now
        try:
            tokens = self.runner.step(batch, self._decode_token)
        except Exception as e:
            raise StepError([s.request_id for s in batch.seqs], e) from e
        self.scheduler.after_step(batch)
        outputs = []
        for seq, tok in zip(batch.seqs, tokens):
            if tok is None:
                continue
            self._append(seq, tok)
            if seq.finish_reason is not None:
                self._finish(seq)
                self.seqs.pop(seq.request_id, None)
            outputs.append(self._output(seq))
        return outputs

    def _decode_token(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _append(self, seq: Sequence, tok: int) -> None:
        now = time.time()
        if seq.metrics.first_token_time is None:
            seq.metrics.first_token_time = now
        seq.output_ids.append(tok)
        seq.metrics.num_generated_tokens = len(seq.output_ids)
        if seq.pending_logprobs is not None:
            seq.cumulative_logprob += seq.pending_logprobs[tok].logprob
            seq.logprobs.append(seq.pending_logprobs)
            seq.pending_logprobs = None
        seq.new_text = seq.detokenizer.step(tok) if seq.detokenizer is not None else ""
        seq.text += seq.new_text
        if tok in seq.stop_ids and len(seq.output_ids) >= seq.params.min_tokens:
            seq.finish_reason = "stop"
            seq.stop_reason = tok if tok in seq.params.stop_token_ids else None
        elif seq.params.stop_list and seq.new_text and len(seq.output_ids) >= seq.params.min_tokens:
            self._check_stop_strings(seq)
        if seq.finish_reason is None and (len(seq.output_ids) >= seq.max_tokens or
                                          len(seq) >= self.config.max_model_len):
            seq.finish_reason = "length"

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

    def _finish(self, seq: Sequence) -> None:
        seq.metrics.finished_time = time.time()
        self.scheduler.finish(seq)
        self.runner.sampler.release(seq)

    def _output(self, seq: Sequence) -> RequestOutput:
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
                             finished=seq.finish_reason is not None, metrics=seq.metrics)

    def stats(self) -> dict:
        return {
            "kv_total_blocks": self.blocks.num_blocks,
            "kv_free_blocks": self.blocks.num_free,
            "kv_block_size": self.blocks.block_size,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_hit_rate": self.blocks.hits / self.blocks.queries if self.blocks.queries else 0.0,
            "max_model_len": self.config.max_model_len,
        }
