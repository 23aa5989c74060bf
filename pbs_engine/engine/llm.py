"""The user-facing offline API, shaped like vLLM's `LLM`."""
from __future__ import annotations

from typing import Any, Iterator

from pathlib import Path

import torch
from torch import nn

from pbs_engine.engine.config import EngineConfig
from pbs_engine.engine.llm_engine import LLMEngine
from pbs_engine.engine.outputs import RequestOutput
from pbs_engine.engine.sampling_params import SamplingParams
from pbs_engine.engine.tokenizer import Tokenizer
from pbs_engine.kernels import PBSConfig

class LLM:
    """Load a model and generate: `LLM().generate("Hello", SamplingParams(max_tokens=20))`."""

    def __init__(self, model: str | None = None, *, device: str | None = None, dtype: str | None = None,
                 attention: str = "pbs", max_model_len: int | None = None, **kwargs: Any):
        self.config = EngineConfig(model=model, device=device, dtype=dtype, attention=attention,
                                   max_model_len=max_model_len, **kwargs)
        self.engine = LLMEngine(self.config)

    def shutdown(self) -> None:
        """Release the tensor-parallel worker processes (nothing to do with one rank)."""
        self.engine.shutdown()

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def model(self) -> nn.Module:
        """The loaded model (its `attention_layers()` take hooks; eval and bench run prompts through it)."""
        return self.engine.runner.model

    @property
    def device(self) -> torch.device:
        return self.engine.runner.device

    @property
    def model_dir(self) -> Path:
        return self.engine.model_dir

    def set_prefill_attention(self, attention: str, pbs: PBSConfig | None = None) -> None:
        """Switch the prefill attention of the requests scheduled from now on: "dense", or "pbs" with `pbs`
        (None keeps the current PBS settings)."""
        if attention not in ("pbs", "dense"):
            raise ValueError(f"attention={attention!r}: choose 'pbs' or 'dense'")
        if pbs is not None and not isinstance(pbs, PBSConfig):
            raise TypeError(f"pbs must be a PBSConfig, not {type(pbs).__name__}")
        self.config.attention = attention
        self.config.pbs = pbs or self.config.pbs

    def stats(self) -> dict:
        return self.engine.stats()

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Each prompt is a string or {"prompt_token_ids": [...]}; one output per prompt, in order."""
        return self._run(self._encode_all(prompts), sampling_params)

    def stream(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None
               ) -> Iterator[RequestOutput]:
        """generate() as it happens: a RequestOutput (text and tokens so far) each time a request grows, its
        finished one last. Each prompt's first output comes no later than the next prompt's. Prompts are checked
        before anything is queued; closing the iterator aborts the unfinished requests."""
        return self._stream(self._encode_all(prompts), sampling_params)

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """`messages` is one conversation (a list of {"role", "content"}) or a list of conversations."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("skip_tokenizer_init=True: chat needs the tokenizer; use generate with token ids")
        encoded = []
        for conv in conversations:
            text = tok.apply_chat_template(conv, add_generation_prompt=add_generation_prompt)
            encoded.append((text, tok.encode(text, add_special_tokens=False)))
        return self._run(encoded, sampling_params)

    def _encode_all(self, prompts) -> list[tuple[str | None, list[int]]]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        return [self._encode(p, i) for i, p in enumerate(prompts)]

    def _encode(self, prompt, index: int) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.engine.tokenizer is None:
                raise ValueError("skip_tokenizer_init=True: give prompts as {'prompt_token_ids': [...]}")
            return prompt, self.engine.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and isinstance(prompt.get("prompt_token_ids"), list):
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        raise TypeError(f"prompts[{index}] must be a string or {{'prompt_token_ids': [...]}}, got {type(prompt).__name__}")

    def _run(self, encoded: list[tuple[str | None, list[int]]], sampling_params) -> list[RequestOutput]:
        finished = [out for out in self._stream(encoded, sampling_params) if out.finished]
        return sorted(finished, key=lambda out: int(out.request_id))  # the engine numbers requests as they come

    def _stream(self, encoded: list[tuple[str | None, list[int]]], sampling_params) -> Iterator[RequestOutput]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(encoded)
        if len(params) != len(encoded):
            raise ValueError(f"{len(params)} sampling params for {len(encoded)} prompts")
        for (_, ids), p in zip(encoded, params):
            self.engine.validate(ids, p)
        return self._steps(encoded, params)

    def _steps(self, encoded: list[tuple[str | None, list[int]]], params: list[SamplingParams]
               ) -> Iterator[RequestOutput]:
        """Step the engine until every request is finished. A request's outputs are held back (its newest kept)
        until the request before it has produced its first one, so first outputs come in prompt order whatever
        order the scheduler finishes prefills in (short prompts may overtake a long one)."""
        unfinished: set[str] = set()
        order: list[str] = []
        held: dict[str, RequestOutput] = {}
        started = 0  # order[:started] have yielded their first output
        try:
            for (text, tokens), p in zip(encoded, params):
                order.append(self.engine.add_request(tokens, p, prompt=text))
            unfinished.update(order)
            position = {rid: i for i, rid in enumerate(order)}
            while unfinished:
                for out in self.engine.step():
                    if out.request_id not in unfinished:
                        continue
                    if out.finished:
                        unfinished.discard(out.request_id)
                    if position[out.request_id] > started:
                        held[out.request_id] = out
                        continue
                    yield out
                    while started < len(order) and (order[started] == out.request_id or order[started] in held):
                        if order[started] in held:
                            yield held.pop(order[started])
                        started += 1
        finally:
            for rid in unfinished:
                self.engine.abort(rid)
