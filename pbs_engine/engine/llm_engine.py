"""The engine loop: requests in, one scheduled step at a time, RequestOutputs (for streaming) out."""
from __future__ import annotations

import itertools
import logging
import time

from pbs_engine.engine.block_manager import BlockManager
from pbs_engine.engine.config import EngineConfig
from pbs_engine.engine.errors import InvalidRequest
from pbs_engine.engine.model_runner import Launched, ModelRunner
from pbs_engine.engine.model_source import resolve_model
from pbs_engine.engine.output_processor import OutputProcessor
from pbs_engine.engine.outputs import RequestOutput
from pbs_engine.engine.sampling_params import SamplingParams
from pbs_engine.engine.scheduler import ScheduledBatch, Scheduler
from pbs_engine.engine.sequence import PLACEHOLDER, Sequence, SequenceStatus
from pbs_engine.engine.tokenizer import Tokenizer
from pbs_engine.engine.workers import WorkerError, Workers, process_group, rank_device
from pbs_engine.models.config import ModelConfig

logger = logging.getLogger(__name__)


def check_tensor_parallel(cfg: ModelConfig, size: int) -> None:
    """The model's heads, KV heads and MLP must split evenly over `size` ranks (KV heads may be replicated)."""
    kv = cfg.num_key_value_heads
    problems = [f"num_attention_heads={cfg.num_attention_heads}" if cfg.num_attention_heads % size else None,
                f"num_key_value_heads={kv}" if (kv % size if kv >= size else size % kv) else None,
                f"intermediate_size={cfg.intermediate_size}" if cfg.intermediate_size % size else None]
    problems = [p for p in problems if p]
    if problems:
        raise ValueError(f"tensor_parallel_size={size} does not divide the model's {', '.join(problems)} "
                         f"(KV heads may also be fewer than the ranks if they divide them)")


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
        if model_config.quantization is not None and config.quantization is None:
            config.quantization = model_config.quantization  # an FP8 checkpoint runs FP8, as vLLM does
        check_tensor_parallel(model_config, config.tensor_parallel_size)
        self.tokenizer = None if config.skip_tokenizer_init else Tokenizer(self.model_dir, config.chat_template)
        self.workers = None
        if config.tensor_parallel_size > 1:
            self.workers = Workers(config, str(self.model_dir), from_model)
            try:
                tp = process_group(config, 0, self.workers.port)
                self.runner = ModelRunner(config, str(self.model_dir), from_model, tp, rank_device(config, 0),
                                          model_config)
                self.workers.wait_ready()
            except Exception:
                self.workers.check(wait=2.0)  # a worker's own error says more than the broken collective
                self.workers.stop()
                raise
        else:
            self.runner = ModelRunner(config, str(self.model_dir), from_model, model_config=model_config)
        self.model_config = self.runner.model_config
        self.blocks = BlockManager(self.runner.num_kv_blocks, config.kv_block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.chunked_prefill, config.max_num_partial_prefills,
                                   config.long_prefill_token_threshold)
        self.output_processor = OutputProcessor(self.tokenizer, config.max_model_len)
        self.seqs: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self._inflight: Launched | None = None  # async scheduling: the decode step whose samples are not read yet

    # ---- requests -------------------------------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequest naming the field at fault if the request cannot run; nothing is queued."""
        if not prompt_ids:
            raise InvalidRequest("prompt", "the prompt is empty")
        vocab = self.model_config.vocab_size
        for name, ids in (("prompt", prompt_ids), ("stop_token_ids", params.stop_token_ids)):
            bad = next((t for t in ids if type(t) is not int or not 0 <= t < vocab), None)
            if bad is not None:
                what = "prompt token id" if name == "prompt" else "stop token id"
                raise InvalidRequest(name, f"{what} {bad!r} is outside the vocabulary [0, {vocab})")
        limit = self.config.max_model_len
        if len(prompt_ids) >= limit:
            raise InvalidRequest("prompt", f"the prompt is {len(prompt_ids)} tokens; max_model_len={limit} leaves "
                                           f"no room for an answer", code="context_length_exceeded")
        wanted = len(prompt_ids) + (params.max_tokens or 1)
        if wanted > limit:
            raise InvalidRequest("max_tokens", f"prompt of {len(prompt_ids)} tokens plus max_tokens={params.max_tokens}"
                                               f" is {wanted} tokens, more than max_model_len={limit}",
                                 code="context_length_exceeded")

    def add_request(self, prompt_ids: list[int], params: SamplingParams, prompt: str | None = None,
                    request_id: str | None = None) -> str:
        self.validate(prompt_ids, params)
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.seqs:
            raise InvalidRequest("request_id", f"request id {request_id!r} is already in use")
        seq = Sequence(request_id, prompt, prompt_ids, params)
        self.output_processor.add(seq)
        self.seqs[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request at once and free its cache blocks."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return None
        seq.finish_reason = "abort"
        self._drop_placeholders(seq)
        self._finish(seq)
        return self.output_processor.output(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    def num_prompt_tokens_computed(self) -> int:
        """Prompt tokens whose K/V are in the cache, over the unfinished requests: prefill progress for a bar."""
        return sum(min(seq.num_computed_tokens, seq.num_prompt_tokens) for seq in self.seqs.values())

    # ---- the loop ---------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one batch; return an output for every request that produced text or finished in it. A request the
        batch fails on is finished with finish_reason "error" (its output's `error` says why); the rest carry on.
        With async scheduling a decode step returns the outputs of the step launched before it."""
        pipelinable = self._pipelinable()
        if self._inflight is None and not pipelinable:
            return self._step_sync()
        return self._step_async(pipelinable)

    def _step_sync(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        now = time.time()
        for seq in batch.seqs:
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = now
        tokens, errors = self._run(batch)
        self.scheduler.after_step(batch)
        outputs = []
        for seq, tok, error in zip(batch.seqs, tokens, errors):
            if error is not None:
                seq.finish_reason, seq.error, tok = "error", error, None
            elif tok is None:
                continue
            outputs.append(self._emit(seq, tok))
        return outputs

    def _emit(self, seq: Sequence, tok: int | None) -> RequestOutput:
        """Account a sampled token (None: none, the request already has its finish reason), finish the request if
        it ended, and return its output."""
        if tok is not None:
            self.output_processor.append(seq, tok)
        if seq.finish_reason is not None:
            self._finish(seq)
            self.seqs.pop(seq.request_id, None)
        return self.output_processor.output(seq)

    # ---- async scheduling -----------------------------------------------------------------------------------
    def _pipelinable(self) -> bool:
        """Whether the next step may be scheduled and launched before the samples in flight are read: one rank, no
        prompt waiting (so the step is decode rows only), every running sequence has a free cache block for its
        next token (no preemption) and room for one more token, and none needs its tokens on the host to be
        sampled (penalties) or returns logprobs (read on the host)."""
        running = self.scheduler.running
        if (not self.config.async_scheduling or self.workers is not None or self.scheduler.waiting or not running
                or len(running) > self.scheduler.max_num_batched_tokens or self.blocks.num_free < len(running)):
            return False
        limit = self.config.max_model_len
        for seq in running:
            p = seq.params
            if (p.logprobs is not None or p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty
                    or len(seq.output_ids) >= seq.max_tokens or len(seq) >= limit):
                return False
        return True

    def _step_async(self, pipelinable: bool) -> list[RequestOutput]:
        """Launch the next decode step if it may go ahead (its input tokens come from the step in flight, on the
        device), then read and process the step in flight while the GPU runs the new one. When the next step may
        not go ahead (a prompt arrived, a sequence is at its limit, ...) the step in flight is finished first and
        the following call runs a synchronous step."""
        prev, nxt = self._inflight, None
        if pipelinable:
            batch = self.scheduler.schedule()  # decode rows of every running sequence
            try:
                nxt = self.runner.launch(batch, prev)
            except Exception:  # the batch did not run: the next synchronous step retries it row by row
                logger.exception("async decode launch failed; running the step synchronously")
            else:
                self.scheduler.after_step(batch)
                for seq in batch.seqs:
                    seq.output_ids.append(PLACEHOLDER)
                    seq.inflight += 1
        self._inflight = nxt
        if prev is None:
            return [] if nxt is not None else self._step_sync()
        outputs = self._process(prev)
        if nxt is not None and all(seq.status == SequenceStatus.FINISHED for seq in nxt.batch.seqs):
            self.runner.collect(nxt)  # every row finished meanwhile: nothing left in flight
            self._inflight = None
        return outputs

    def _process(self, launched: Launched) -> list[RequestOutput]:
        """The launched step's samples become outputs; a sequence that finished (or was aborted) meanwhile drops
        its token, and one that finishes now drops the token of the step launched after it."""
        outputs = []
        for seq, tok in zip(launched.batch.seqs, self.runner.collect(launched)):
            if seq.status == SequenceStatus.FINISHED:
                continue
            later = seq.inflight - 1  # the step launched after this one
            self._drop_placeholders(seq)
            outputs.append(self._emit(seq, tok))
            if seq.finish_reason is None:
                seq.output_ids += [PLACEHOLDER] * later
                seq.inflight = later
        return outputs

    @staticmethod
    def _drop_placeholders(seq: Sequence) -> None:
        if seq.inflight:
            del seq.output_ids[len(seq.output_ids) - seq.inflight:]
            seq.inflight = 0

    def _run(self, batch: ScheduledBatch) -> tuple[list[int | None], list[str | None]]:
        """The runner's tokens for the batch; if the batch fails, each sequence runs alone so that the failure is
        pinned on the requests that cause it (their error message in the second list)."""
        try:
            return self.runner.step(batch, self.workers), [None] * len(batch.seqs)
        except Exception as e:
            if self.workers is not None:  # a failed collective leaves the ranks out of step: nothing more can run
                self.workers.check(wait=2.0)
                raise WorkerError(f"tensor-parallel step failed: {type(e).__name__}: {e}") from e
            if len(batch.seqs) == 1:
                logger.exception("request %s failed in the engine", batch.seqs[0].request_id)
                return [None], [f"{type(e).__name__}: {e}"]
        tokens, errors = [], []
        for i in range(len(batch.seqs)):
            tok, error = self._run(batch.row(i))
            tokens += tok
            errors += error
        return tokens, errors

    def _finish(self, seq: Sequence) -> None:
        seq.metrics.finished_time = time.time()
        self.scheduler.finish(seq)
        self.runner.sampler.release(seq)

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (the engine runs no more steps)."""
        if self.workers is not None:
            self.workers.stop()
            self.workers = None

    def _oldest_waiting(self) -> float:
        """Age of the oldest request that has no token yet (0 when none waits)."""
        waiting = [s.metrics.arrival_time for s in self.scheduler.waiting if s.metrics.first_token_time is None]
        return time.time() - min(waiting) if waiting else 0.0

    def stats(self) -> dict:
        return {
            "kv_total_blocks": self.blocks.num_blocks,
            "kv_free_blocks": self.blocks.num_free,
            "kv_block_size": self.blocks.block_size,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_preemptions": self.scheduler.num_preemptions,
            "num_prefill_tokens_pending": self.scheduler.pending_prefill_tokens(),
            "oldest_waiting_s": self._oldest_waiting(),
            "prefix_cache_hit_rate": self.blocks.hits / self.blocks.queries if self.blocks.queries else 0.0,
            "max_model_len": self.config.max_model_len,
            "max_num_batched_tokens": self.config.max_num_batched_tokens,
            "dtype": self.config.dtype,
            "weight_dtype": "float8_e4m3fn" if self.config.quantization == "fp8" else self.config.dtype,
            "kv_cache_dtype": "float8_e4m3fn" if self.config.kv_cache_dtype == "fp8" else self.config.dtype,
        }
