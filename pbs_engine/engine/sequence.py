"""One request's state as it moves through the engine: tokens, cache blocks, detokenised text, logprobs, timings."""
from __future__ import annotations

import time
from enum import Enum, auto

from pbs_engine.engine.outputs import PositionLogprobs, RequestMetrics
from pbs_engine.engine.sampling_params import SamplingParams


PLACEHOLDER = -1  # an output token still on the device (async scheduling)


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    def __init__(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # prefix-cache hashes of the leading full prompt blocks, as known
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.error: str | None = None  # why the engine failed this request (finish_reason "error")
        self.logprobs: list[PositionLogprobs] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[PositionLogprobs | None] | None = None
        self.cumulative_logprob = 0.0
        self.metrics = RequestMetrics(arrival_time=time.time(), num_prompt_tokens=len(prompt_ids))
        self.detokenizer = None  # set by the engine
        self.new_text = ""  # text produced by the last step, for streaming
        self.pending_logprobs: PositionLogprobs | None = None  # logprobs of the token just sampled
        self.max_tokens = params.max_tokens or 0  # resolved against max_model_len by the engine
        self.stop_ids: set[int] = set()  # token ids that end this request (EOS unless ignored, stop_token_ids)
        self.inflight = 0  # async scheduling: tokens sampled on the device and not read back yet; output_ids ends
        # with that many PLACEHOLDER entries, so lengths and cache slots count them

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def tokens(self, start: int, end: int) -> list[int]:
        """token_ids[start:end] without building the whole list (prompts can be a million tokens)."""
        p = len(self.prompt_ids)
        if start >= p:
            return self.output_ids[start - p:end - p]
        return self.prompt_ids[start:end] + self.output_ids[:max(0, end - p)]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)
