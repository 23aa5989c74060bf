"""The OpenAI-compatible HTTP API: completions, chat completions, models, health and Prometheus metrics."""
from __future__ import annotations

import asyncio
import hmac
import re
import time
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from pbs_engine.engine.llm_engine import LLMEngine
from pbs_engine.engine.outputs import RequestOutput
from pbs_engine.engine.sampling_params import SamplingParams
from pbs_engine.server.async_engine import AsyncEngine, EngineError
from pbs_engine.server.errors import APIError, install_error_handlers
from pbs_engine.server.metrics import Metrics
from pbs_engine.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest
from pbs_engine.server.responses import DONE, Job, sse

DISCONNECT_POLL_S = 0.5


def create_app(engine_or_llm, served_model_name: str, api_key: str | None = None, max_queue: int = 256) -> FastAPI:
    """An app serving `engine_or_llm` (an LLM or LLMEngine) as `served_model_name`; its engine thread runs while
    the app does. `max_queue` caps the requests waiting for their first token (more: 503)."""
    engine: LLMEngine = getattr(engine_or_llm, "engine", engine_or_llm)
    if engine.tokenizer is None:
        raise ValueError("the server needs the tokenizer: build the engine with skip_tokenizer_init=False")
    if max_queue < 1:
        raise ValueError(f"max_queue={max_queue} must be >= 1")
    runner = AsyncEngine(engine, Metrics(), max_queue)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        runner.start()
        yield
        runner.stop()

    app = FastAPI(title="pbs-engine", lifespan=lifespan)
    app.state.engine = runner
    install_error_handlers(app)

    async def check_api_key(request: Request) -> None:
        given = request.headers.get("authorization", "")
        if api_key and not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @app.get("/health")
    async def health() -> JSONResponse:
        if not runner.alive:
            raise APIError(503, "the engine loop is not running", code="engine_dead")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text = runner.metrics.render(runner.stats, runner.num_waiting)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": created,
                                            "owned_by": "pbs-engine", "max_model_len": engine.config.max_model_len}]}

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        _check_common(body, served_model_name)
        params = _sampling_params(body, body.max_tokens, body.logprobs)

        def prepare() -> list[list[int]]:
            prompts = _completion_prompt_ids(body, engine)
            for ids in prompts:
                _validate(engine, ids, params[0], "prompt")
            return prompts

        prompts = await asyncio.to_thread(prepare)
        job = Job(f"cmpl-{uuid.uuid4().hex}", False, served_model_name, int(time.time()), [len(p) for p in prompts],
                  body.n, body.logprobs, body.include_usage)
        return await _run(runner, job, body.stream, prompts, params, request)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        _check_common(body, served_model_name)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        params = _sampling_params(body, body.max_completion_tokens or body.max_tokens,
                                  (body.top_logprobs or 0) if body.logprobs else None)

        def prepare() -> list[int]:
            try:
                ids = engine.tokenizer.encode_chat([m.as_template_dict() for m in body.messages])
            except ValueError as e:
                raise APIError(400, str(e), param="messages") from e
            _validate(engine, ids, params[0], "messages")
            return ids

        ids = await asyncio.to_thread(prepare)
        job = Job(f"chatcmpl-{uuid.uuid4().hex}", True, served_model_name, int(time.time()), [len(ids)], body.n,
                  params[0].logprobs, body.include_usage)
        return await _run(runner, job, body.stream, [ids], params, request)

    app.include_router(v1)
    return app


def _check_common(body: SamplingRequest, served: str) -> None:
    if body.model is not None and body.model != served:
        raise APIError(404, f"model {body.model!r} does not exist; this server serves {served!r}", param="model",
                       code="model_not_found")
    unsupported = body.unsupported_field()
    if unsupported:
        raise APIError(400, f"{unsupported} is not supported by this server", param=unsupported,
                       code="unsupported_parameter")


def _completion_prompt_ids(body: CompletionRequest, engine: LLMEngine) -> list[list[int]]:
    p = body.prompt
    if isinstance(p, str):
        return [engine.tokenizer.encode(p)]
    if not p:
        raise APIError(400, "prompt must not be an empty list", param="prompt")
    if isinstance(p[0], int):
        return [p]
    return [engine.tokenizer.encode(x) if isinstance(x, str) else x for x in p]


def _validate(engine: LLMEngine, ids: list[int], params: SamplingParams, prompt_field: str) -> None:
    try:
        engine.validate(ids, params)
    except ValueError as e:
        too_long = "max_tokens" in str(e) and 0 < len(ids) < engine.config.max_model_len
        raise APIError(400, str(e), param="max_tokens" if too_long else prompt_field,
                       code="context_length_exceeded" if "max_model_len" in str(e) else "invalid_value") from e


def _sampling_params(body: SamplingRequest, max_tokens: int | None, logprobs: int | None) -> list[SamplingParams]:
    """One SamplingParams per sample of the n asked for."""
    try:
        return [body.sampling_params(i, max_tokens, logprobs) for i in range(body.n)]
    except ValueError as e:  # a combination pydantic's per-field checks let through, e.g. an empty stop string
        field = re.match(r"SamplingParams\.(\w+)=", str(e))
        raise APIError(400, str(e), param=field.group(1) if field else None) from e


async def _run(runner: AsyncEngine, job: Job, stream_events: bool, prompts: list[list[int]],
               params: list[SamplingParams], request: Request) -> Response:
    stream = runner.submit(job.id, [(ids, p) for ids in prompts for p in params])
    if stream_events:
        return StreamingResponse(_events(job, stream), media_type="text/event-stream")
    outputs = await _collect(stream, job.num_choices, request)
    return JSONResponse(job.response(outputs)) if outputs is not None else Response(status_code=499)


async def _events(job: Job, stream: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
    final: dict[int, RequestOutput] = {}
    try:
        for event in job.first_chunks():
            yield event
        async for index, out in stream:
            event = job.chunk(index, out)
            if event is not None:
                yield event
            if out.finished:
                final[index] = out
        if job.include_usage:
            yield job.usage_chunk([final[i] for i in sorted(final)])
    except EngineError as e:
        yield sse(APIError(500, str(e), code="engine_error").body())
    finally:
        await stream.aclose()  # a client that went away aborts its requests, freeing their cache blocks
    yield DONE


async def _collect(stream: AsyncIterator[tuple[int, RequestOutput]], num_choices: int, request: Request
                   ) -> list[RequestOutput] | None:
    """The finished outputs in choice order, or None when the client disconnected first (its requests aborted)."""
    final: dict[int, RequestOutput] = {}

    async def drain() -> None:
        async for index, out in stream:
            if out.finished:
                final[index] = out

    task = asyncio.create_task(drain())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                return None
        task.result()
    except EngineError as e:
        raise APIError(500, str(e), code="engine_error") from e
    finally:
        task.cancel()
    return [final[i] for i in range(num_choices)]
