"""The OpenAI-compatible HTTP API: completions, chat completions, models, tokenize, health and Prometheus metrics."""
from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from pbs_engine import __version__
from pbs_engine.engine.errors import InvalidRequest
from pbs_engine.engine.llm_engine import LLMEngine
from pbs_engine.engine.outputs import RequestOutput
from pbs_engine.engine.sampling_params import SamplingParams
from pbs_engine.engine.tokenizer import ChatTemplateError
from pbs_engine.server.async_engine import AsyncEngine, EngineError
from pbs_engine.server.body_limit import DEFAULT_MAX_REQUEST_BYTES, BodyLimit
from pbs_engine.server.errors import APIError, install_error_handlers
from pbs_engine.server.metrics import CONTENT_TYPE, Metrics
from pbs_engine.server.protocol import (ChatCompletionRequest, ChatMessage, CompletionRequest, DetokenizeRequest,
                                        ErrorResponse, SamplingRequest, TokenizeRequest)
from pbs_engine.server.responses import DONE, Job, sse

DISCONNECT_POLL_S = 0.5
ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in (
    (400, "invalid request: `error.param` names the field"), (401, "missing or invalid API key"),
    (404, "unknown model or route"), (413, "request body over --max-request-bytes"),
    (500, "the engine failed while running the request"), (503, "queue full or engine not running"))}


def create_app(engine_or_llm, served_model_name: str, api_key: str | None = None, max_queue: int = 256,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    """An app serving `engine_or_llm` (an LLM or LLMEngine) as `served_model_name`; its engine thread runs while
    the app does. `max_queue` caps the requests waiting for their first token (more: 503); `api_key` None serves
    without authentication; bodies over `max_request_bytes` get 413."""
    engine: LLMEngine = getattr(engine_or_llm, "engine", engine_or_llm)
    if engine.tokenizer is None:
        raise ValueError("the server needs the tokenizer: build the engine with skip_tokenizer_init=False")
    if max_queue < 1:
        raise ValueError(f"max_queue={max_queue} must be >= 1")
    if max_request_bytes < 1:
        raise ValueError(f"max_request_bytes={max_request_bytes} must be >= 1")
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty: give a key, or none at all to serve without authentication")
    runner = AsyncEngine(engine, Metrics(), max_queue)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        runner.start()
        yield
        runner.stop()

    app = FastAPI(title="pbs-engine", version=__version__, lifespan=lifespan)
    app.state.engine = runner
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    install_error_handlers(app)
    _document_errors(app)

    async def check_api_key(request: Request) -> None:
        given = request.headers.get("authorization", "")
        if api_key and not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)], responses=ERRORS)
    tools = APIRouter(dependencies=[Depends(check_api_key)], responses=ERRORS)

    @app.get("/health")
    async def health() -> JSONResponse:
        if not runner.alive:
            raise APIError(503, "the engine loop is not running", code="engine_dead")
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text exposition format 0.0.4",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(runner.metrics.render(runner.stats, runner.num_waiting), media_type=CONTENT_TYPE)

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": created,
                                            "owned_by": "pbs-engine", "max_model_len": engine.config.max_model_len,
                                            "dtype": engine.config.dtype,
                                            "quantization": engine.config.quantization,
                                            "kv_cache_dtype": "float8_e4m3fn" if engine.config.kv_cache_dtype ==
                                            "fp8" else engine.config.dtype}]}

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        _check_common(body, served_model_name)
        params = _sampling_params(body, body.max_tokens, body.logprobs)

        def prepare() -> list[list[int]]:
            prompts = _completion_prompt_ids(body, engine)
            _check_queue(runner, len(prompts) * body.n)
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
            _check_queue(runner, body.n)
            ids = _chat_prompt_ids(body.messages, True, engine)
            _validate(engine, ids, params[0], "messages")
            return ids

        ids = await asyncio.to_thread(prepare)
        job = Job(f"chatcmpl-{uuid.uuid4().hex}", True, served_model_name, int(time.time()), [len(ids)], body.n,
                  params[0].logprobs, body.include_usage)
        return await _run(runner, job, body.stream, [ids], params, request)

    @tools.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        _check_model(body.model, served_model_name)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")

        def encode() -> list[int]:
            if body.messages is not None:
                return _chat_prompt_ids(body.messages, body.add_generation_prompt, engine)
            return _encode(engine, body.prompt, "prompt", body.add_special_tokens)

        tokens = await asyncio.to_thread(encode)
        return {"count": len(tokens), "max_model_len": engine.config.max_model_len, "tokens": tokens}

    @tools.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        _check_model(body.model, served_model_name)
        bad = next((t for t in body.tokens if t >= engine.model_config.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary [0, {engine.model_config.vocab_size})",
                           param="tokens")
        return {"prompt": await asyncio.to_thread(engine.tokenizer.decode, body.tokens, False)}

    app.include_router(v1)
    app.include_router(tools)
    return app


def _document_errors(app: FastAPI) -> None:
    """The OpenAPI schema lists the errors the server sends (ERRORS) and not FastAPI's 422, which it never sends:
    validation errors leave as 400s."""
    build = app.openapi

    def openapi() -> dict:
        schema = build()
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        return schema

    app.openapi = openapi


def _check_model(model: str | None, served: str) -> None:
    if model is not None and model != served:
        raise APIError(404, f"model {model!r} does not exist; this server serves {served!r}", param="model",
                       code="model_not_found")


def _check_common(body: SamplingRequest, served: str) -> None:
    _check_model(body.model, served)
    unsupported = body.unsupported_field()
    if unsupported:
        raise APIError(400, f"{unsupported} is not supported by this server", param=unsupported,
                       code="unsupported_parameter")


def _check_queue(runner: AsyncEngine, num_requests: int) -> None:
    """A request that could never be admitted is the client's error (400), not a busy server (503)."""
    if num_requests > runner.max_queue:
        raise APIError(400, f"the request asks for {num_requests} completions (prompts x n); at most "
                            f"{runner.max_queue} can wait at once (--max-queue)", param="n")


def _encode(engine: LLMEngine, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of a prompt text; one that cannot fit max_model_len is refused without tokenising all of it."""
    limit = engine.config.max_model_len
    ids = engine.tokenizer.encode_within(text, limit, add_special_tokens)
    if ids is None:
        raise InvalidRequest(param, f"the {param} is longer than max_model_len={limit} tokens",
                             code="context_length_exceeded")
    return ids


def _completion_prompt_ids(body: CompletionRequest, engine: LLMEngine) -> list[list[int]]:
    p = body.prompt
    if isinstance(p, str):
        return [_encode(engine, p, "prompt")]
    if not p:
        raise APIError(400, "prompt must not be an empty list", param="prompt")
    if isinstance(p[0], int):
        return [p]
    return [_encode(engine, x, "prompt") if isinstance(x, str) else x for x in p]


def _chat_prompt_ids(messages: list[ChatMessage], add_generation_prompt: bool, engine: LLMEngine) -> list[int]:
    try:
        text = engine.tokenizer.apply_chat_template([m.as_template_dict() for m in messages], add_generation_prompt)
    except ChatTemplateError as e:
        raise APIError(400, str(e), param="messages") from e
    return _encode(engine, text, "messages", add_special_tokens=False)


def _validate(engine: LLMEngine, ids: list[int], params: SamplingParams, prompt_field: str) -> None:
    try:
        engine.validate(ids, params)
    except InvalidRequest as e:
        raise InvalidRequest(prompt_field if e.param == "prompt" else e.param, e.message, e.code) from e


def _sampling_params(body: SamplingRequest, max_tokens: int | None, logprobs: int | None) -> list[SamplingParams]:
    """One SamplingParams per sample of the n asked for (InvalidRequest, a 400, names a field pydantic let by)."""
    return [body.sampling_params(i, max_tokens, logprobs) for i in range(body.n)]


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
