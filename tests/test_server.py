"""The OpenAI-compatible server: real SmolLM2 on CPU behind uvicorn on 127.0.0.1, driven by `openai` and httpx."""
from __future__ import annotations

import asyncio
import json
import math
import re
import threading

import httpx
import openai
import pytest

from pbs_engine.server import create_app
from serving import all_blocks_free, assert_openai_error, serving, sse_payloads, wait_until

MODEL = "smol"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def app(smollm2):
    return create_app(smollm2, MODEL, max_queue=32)


@pytest.fixture(scope="module")
def base_url(app):
    with serving(app) as url:
        yield url


@pytest.fixture
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=120) as client:
        yield client


@pytest.fixture
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


# ---- the OpenAI API through the official client -------------------------------------------------------------------
def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion_returns_text_and_usage(client):
    res = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, temperature=0)
    assert res.object == "text_completion" and len(res.choices) == 1
    assert res.choices[0].text and res.choices[0].finish_reason == "length"
    assert res.usage.completion_tokens == 4 and res.usage.prompt_tokens > 0
    assert res.usage.total_tokens == res.usage.prompt_tokens + 4
    assert res.usage.model_extra["prefill_density"] == 1.0  # this server's engine prefills densely


def test_vllm_extra_sampling_parameters(client, smollm2):
    """ignore_eos/min_tokens keep generating past the end of the answer; stop_token_ids end it at a given token."""
    from pbs_engine import SamplingParams

    res = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=40, temperature=0)
    assert res.choices[0].finish_reason == "stop" and res.usage.completion_tokens < 40  # the answer ends by itself
    for extra in ({"ignore_eos": True}, {"min_tokens": 40}):
        res = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=40, temperature=0,
                                             extra_body=extra)
        assert res.choices[0].finish_reason == "length" and res.usage.completion_tokens == 40, extra
    ids = smollm2.generate("Once upon a time", SamplingParams(max_tokens=4, temperature=0))[0].token_ids
    res = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, temperature=0,
                                    extra_body={"stop_token_ids": [ids[1]]})
    assert res.choices[0].finish_reason == "stop" and res.usage.completion_tokens <= 2


def test_chat_completion_answers_the_question(client):
    res = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    assert res.choices[0].message.role == "assistant"
    assert "Paris" in res.choices[0].message.content
    assert res.usage.completion_tokens <= 8


def test_streamed_chat_matches_the_whole_answer_and_ends_with_done(client, http):
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0)
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as res:
        assert res.status_code == 200 and res.headers["content-type"].startswith("text/event-stream")
        payloads = sse_payloads(res)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole.choices[0].message.content
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole.usage.model_dump(exclude_none=True)


def test_streamed_completion_through_the_client(client):
    stream = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=4, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks)


def test_n_samples_are_distinct_choices_and_reproducible_with_a_seed(client):
    kwargs = dict(model=MODEL, prompt="My favourite food is", max_tokens=4, temperature=1.0, n=3, seed=7)
    first, again = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.usage.completion_tokens == 12


def test_completion_logprobs_have_openai_shape(client):
    res = client.completions.create(model=MODEL, prompt="One, two,", max_tokens=3, temperature=0, logprobs=2)
    lp = res.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 3
    assert "".join(lp.tokens) == res.choices[0].text
    assert all(lp_ <= 0 for lp_ in lp.token_logprobs) and all(2 <= len(top) <= 3 for top in lp.top_logprobs)


def test_streamed_completion_text_offsets_continue_across_chunks(client):
    whole = client.completions.create(model=MODEL, prompt="One, two,", max_tokens=6, temperature=0, logprobs=1)
    chunks = client.completions.create(model=MODEL, prompt="One, two,", max_tokens=6, temperature=0, logprobs=1,
                                       stream=True)
    offsets = [o for c in chunks if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == whole.choices[0].logprobs.text_offset and offsets[-1] > 0


def test_chat_logprobs_have_openai_shape(client):
    res = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, temperature=0, logprobs=True,
                                         top_logprobs=2)
    content = res.choices[0].logprobs.content
    assert len(content) == 3
    for entry in content:
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token  # greedy: the top one
        assert bytes(entry.bytes).decode() == entry.token


def test_sixteen_concurrent_streams_all_finish(base_url):
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str]:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=4, stream=True)
        text, reason = "", None
        async for chunk in stream:
            text += chunk.choices[0].delta.content or ""
            reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def main():
        async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(16)))

    results = asyncio.run(main())
    assert len(results) == 16 and all(text and reason in ("stop", "length") for text, reason in results)


def num_aborted(app) -> float:
    value = app.state.engine.metrics.registry.get_sample_value("pbs_requests_finished_total", {"finish_reason": "abort"})
    return value or 0.0


def test_disconnected_stream_is_aborted_and_frees_its_blocks(app, http):
    # the answer must outlast the disconnect, whatever the numerics and however slowly a loaded machine lets this
    # client read (500 tokens finished before the first line was read on a 2-core machine at load 4)
    body = {"model": MODEL, "prompt": "Write a very long story.", "max_tokens": 4000, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with http.stream("POST", "/v1/completions", json=body) as res:
        first = next(line for line in res.iter_lines() if line.startswith("data: "))
        assert json.loads(first[len("data: "):])["choices"][0]["text"] is not None
        assert not all_blocks_free(app)
    assert wait_until(lambda: all_blocks_free(app)), app.state.engine.stats
    assert num_aborted(app) >= 1


def test_disconnected_request_is_aborted_and_frees_its_blocks(app, base_url):
    aborted = num_aborted(app)
    body = {"model": MODEL, "prompt": "Write a very long story.", "max_tokens": 500, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base_url + "/v1/completions", json=body, timeout=1.0)
    assert wait_until(lambda: num_aborted(app) == aborted + 1)
    assert wait_until(lambda: all_blocks_free(app)), app.state.engine.stats


# ---- bad input: the status, the OpenAI error body, and a server that keeps serving ---------------------------------
BAD_REQUESTS = [
    ("malformed_json", "/v1/completions", b'{"prompt": "hi", ', 400, None),
    ("body_not_an_object", "/v1/completions", [1, 2], 400, None),
    ("missing_prompt", "/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("temperature_not_a_number", "/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("max_tokens_not_an_integer", "/v1/completions", {"prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens"),
    ("top_p_out_of_range", "/v1/completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("negative_max_tokens", "/v1/chat/completions", {"messages": CHAT, "max_tokens": -1}, 400, "max_tokens"),
    ("too_many_logprobs", "/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("empty_stop_string", "/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("negative_stop_token_id", "/v1/completions", {"prompt": "hi", "stop_token_ids": [-1]}, 400, "stop_token_ids.0"),
    ("negative_min_tokens", "/v1/completions", {"prompt": "hi", "min_tokens": -2}, 400, "min_tokens"),
    ("empty_prompt", "/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("prompt_token_outside_vocabulary", "/v1/completions", {"prompt": [10**9]}, 400, "prompt"),
    ("unknown_model", "/v1/completions", {"model": "gpt-9", "prompt": "hi"}, 404, "model"),
    ("no_messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("unknown_role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400,
     "messages.0.role"),
    ("content_not_text", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400,
     "messages.0.content"),
    ("top_logprobs_without_logprobs", "/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("unsupported_echo", "/v1/completions", {"prompt": "hi", "echo": True}, 400, "echo"),
    ("prompt_plus_max_tokens_beyond_context", "/v1/completions", {"prompt": "hi", "max_tokens": 10**6}, 400,
     "max_tokens"),
    ("prompt_beyond_context", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "word " * 9000}]}, 400, "messages"),
]


@pytest.mark.parametrize("path, body, status, param", [case[1:] for case in BAD_REQUESTS],
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_gets_an_openai_error_and_the_server_keeps_serving(http, path, body, status, param):
    if isinstance(body, bytes):
        res = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        res = http.post(path, json=body)
    assert_openai_error(res, status, param)
    assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 200


def test_unknown_route_gets_an_openai_error(http):
    assert_openai_error(http.get("/v1/nothing"), 404)


def test_api_key_is_required_when_configured(smollm2, base_url):
    with serving(create_app(smollm2, MODEL, api_key="s3cret")) as url, httpx.Client(base_url=url) as http:
        assert_openai_error(http.get("/v1/models"), 401)
        assert_openai_error(http.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert http.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert http.get("/health").status_code == 200


def test_full_queue_gets_503(app, http, smollm2, monkeypatch):
    gate, real_step = threading.Event(), smollm2.engine.step

    def held_step():
        gate.wait(timeout=60)
        return real_step()

    monkeypatch.setattr(smollm2.engine, "step", held_step)
    monkeypatch.setattr(app.state.engine, "max_queue", 1)
    results = []
    waiting = threading.Thread(target=lambda: results.append(
        http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})))
    waiting.start()
    try:
        assert wait_until(lambda: app.state.engine.num_waiting == 1)
        assert_openai_error(http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 1}), 503)
    finally:
        gate.set()
        waiting.join(timeout=60)
    assert results[0].status_code == 200


def test_engine_failure_fails_only_its_request(app, http, smollm2, monkeypatch):
    real_step = smollm2.engine.step
    failures = iter([RuntimeError("simulated device fault")])

    def failing_step():
        error = next(failures, None)
        if error is not None:
            raise error
        return real_step()

    monkeypatch.setattr(smollm2.engine, "step", failing_step)
    res = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert_openai_error(res, 500)
    assert "simulated device fault" in res.json()["error"]["message"]
    assert wait_until(lambda: all_blocks_free(app))
    assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    assert http.get("/health").status_code == 200


# ---- health and metrics -----------------------------------------------------------------------------------------
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"'
                    r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*")*)?\})? (\S+)$')
TYPE = re.compile(r"^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (counter|gauge|histogram|summary|untyped)$")
HELP = re.compile(r"^# HELP ([a-zA-Z_:][a-zA-Z0-9_:]*) .+$")


def parse_prometheus(text: str) -> dict[str, tuple[str, list[tuple[str, str, float]]]]:
    """Strict parse of the text exposition format: family -> (type, [(sample name, labels, value)])."""
    assert text.endswith("\n")
    families: dict[str, tuple[str, list]] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert HELP.match(line) or TYPE.match(line), line
            if m := TYPE.match(line):
                assert m.group(1) not in families, f"{m.group(1)} declared twice"
                families[m.group(1)] = (m.group(2), [])
            continue
        m = SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        family = next((f for f, (kind, _) in families.items() if name == f or (
            kind == "histogram" and name in (f + "_bucket", f + "_sum", f + "_count"))), None)
        assert family is not None, f"{name} has no # TYPE line before it"
        families[family][1].append((name, labels, value))
    return families


def test_metrics_are_prometheus_text(http):
    http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
    res = http.get("/metrics")
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/plain")
    families = parse_prometheus(res.text)
    for family in ("pbs_requests_finished_total", "pbs_prompt_tokens_total", "pbs_generation_tokens_total",
                   "pbs_time_to_first_token_seconds", "pbs_time_per_output_token_seconds", "pbs_kv_cache_usage_ratio",
                   "pbs_num_requests_running", "pbs_num_requests_waiting", "pbs_num_prefill_tokens_pending",
                   "pbs_prefill_density",
                   "pbs_oldest_waiting_request_seconds"):
        assert family in families
    for family, (kind, samples) in families.items():
        if kind == "histogram":
            buckets = [v for name, labels, v in samples if name.endswith("_bucket")]
            assert buckets == sorted(buckets) and 'le="+Inf"' in samples[len(buckets) - 1][1]
            assert buckets[-1] == next(v for name, _, v in samples if name == family + "_count")
        if kind == "counter":
            assert all(v >= 0 and math.isfinite(v) for _, _, v in samples)
    assert sum(v for _, _, v in families["pbs_generation_tokens_total"][1]) > 0
    assert 0 <= families["pbs_kv_cache_usage_ratio"][1][0][2] <= 1


def test_health_is_ok_while_the_engine_runs(http):
    assert http.get("/health").json() == {"status": "ok"}
