"""Hostile clients: a bad request gets its 4xx and nobody else notices (real SmolLM2 on CPU behind uvicorn)."""
from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from pbs_engine import SamplingParams
from pbs_engine.cli.main import main
from pbs_engine.server import create_app
from serving import all_blocks_free, assert_openai_error, serving, wait_until

MODEL = "smol"
LONG = {"prompt": "Write a long story about a dragon.", "max_tokens": 24, "ignore_eos": True}


@pytest.fixture(scope="module")
def app(smollm2):
    return create_app(smollm2, MODEL, max_queue=32, max_request_bytes=8 << 20)


@pytest.fixture(scope="module")
def base_url(app):
    with serving(app) as url:
        yield url


@pytest.fixture
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=120) as client:
        yield client


def concurrently(base_url: str, bodies: list[dict]) -> list[httpx.Response]:
    """POST every body to /v1/completions at once (each from its own thread); the responses in order."""
    results: list[httpx.Response | None] = [None] * len(bodies)

    def post(i: int) -> None:
        with httpx.Client(base_url=base_url, timeout=120) as c:
            results[i] = c.post("/v1/completions", json=bodies[i])

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "stop_token_ids": [1000000], "min_tokens": 2}, "stop_token_ids"),
    ({"prompt": "x", "stop_token_ids": [2**64]}, "stop_token_ids"),
    ({"prompt": [1, 2**63]}, "prompt"),
    ({"prompt": [[5, 6], [2**70]]}, "prompt"),
], ids=["stop_id_beyond_vocab", "stop_id_beyond_int64", "prompt_id_beyond_int64", "batch_prompt_id_beyond_int64"])
def test_poison_token_ids_fail_alone_while_others_in_the_step_succeed(base_url, app, body, param):
    responses = concurrently(base_url, [LONG, LONG, body, LONG])
    assert_openai_error(responses[2], 400, param)
    for res in responses[:2] + responses[3:]:
        assert res.status_code == 200, res.text
        assert res.json()["usage"]["completion_tokens"] == 24
    assert wait_until(lambda: all_blocks_free(app))


def test_a_request_failing_inside_a_step_fails_alone(base_url, app, smollm2, monkeypatch):
    sampler = smollm2.engine.runner.sampler
    real = type(sampler).__call__

    def fragile(self, logits, seqs):  # a fault that only this one request's tokens set off
        if any(s.params.seed == 666 for s in seqs):
            raise RuntimeError("simulated fault in one request")
        return real(self, logits, seqs)

    monkeypatch.setattr(type(sampler), "__call__", fragile)
    poison = {**LONG, "seed": 666, "temperature": 0.5}
    responses = concurrently(base_url, [LONG, LONG, poison, LONG])
    assert_openai_error(responses[2], 500)
    assert "simulated fault" in responses[2].json()["error"]["message"]
    assert [r.status_code for i, r in enumerate(responses) if i != 2] == [200, 200, 200]
    assert wait_until(lambda: all_blocks_free(app))


def test_engine_isolates_the_failing_request_of_a_batch(smollm2, monkeypatch):
    """Through the offline API: the failing request finishes with "error", the others as if alone."""
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    expected = [o.text for o in smollm2.generate(["one", "two", "three"], params)]
    real = type(smollm2.engine.runner.sampler).__call__

    def fragile(self, logits, seqs):
        if any(s.prompt == "poison" for s in seqs):
            raise IndexError("bad id in this request")
        return real(self, logits, seqs)

    monkeypatch.setattr(type(smollm2.engine.runner.sampler), "__call__", fragile)
    outs = smollm2.generate(["one", "poison", "two", "three"], params)
    assert outs[1].finish_reason == "error" and "bad id" in outs[1].error
    assert [o.text for i, o in enumerate(outs) if i != 1] == expected
    assert smollm2.stats()["kv_free_blocks"] == smollm2.stats()["kv_total_blocks"]


def test_a_50mb_body_is_refused_at_once_while_health_answers(base_url):
    host, port = base_url.removeprefix("http://").split(":")
    start = time.time()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 52428800\r\n\r\n" + b'{"prompt": "' + b"a" * (1 << 20))
        with httpx.Client(base_url=base_url, timeout=1.0) as quick:
            assert quick.get("/health").status_code == 200
        reply = sock.recv(65536).decode(errors="replace")
    assert reply.startswith("HTTP/1.1 413"), reply[:200]
    assert "max-request-bytes" in reply
    assert time.time() - start < 2.0


def test_a_chunked_body_over_the_cap_is_refused(http):
    def chunks():
        for _ in range(10):
            yield b" " * (1 << 20)

    res = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_openai_error(res, 413)


def test_text_that_cannot_fit_is_refused_without_tokenising_it(base_url, http):
    """4 MB of text under an 8K context: refused from a probe of its start; the server answers meanwhile."""
    text = "All work and no play makes Jack a dull boy. " * 95000
    result = []
    thread = threading.Thread(target=lambda: result.append(http.post("/v1/completions", json={"prompt": text})))
    thread.start()
    with httpx.Client(base_url=base_url, timeout=1.0) as quick:
        while thread.is_alive():
            assert quick.get("/health").status_code == 200
            time.sleep(0.05)
    assert_openai_error(result[0], 400, "prompt")
    assert result[0].json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "a\ud800b"}, "prompt"),
    ("/v1/completions", {"prompt": ["fine", "a\udfffb"]}, "prompt.1"),
    ("/v1/completions", {"prompt": "hi", "stop": ["\ud800"]}, "stop.0"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages.0.content"),
    ("/v1/completions", {"model": "\ud83d", "prompt": "hi"}, "model"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "min_tokens": 5}, "min_tokens"),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 50.0}, "repetition_penalty"),
    ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 16}, "n"),
], ids=["surrogate_prompt", "surrogate_in_prompt_list", "surrogate_stop", "surrogate_message", "surrogate_model",
        "min_tokens_over_max_tokens", "repetition_penalty_unbounded", "n_times_prompts_over_queue"])
def test_invalid_request_gets_400_naming_the_field(http, path, body, param):
    raw = json.dumps(body).encode()  # ASCII JSON: a lone surrogate travels as its \ud800 escape, as a client sends it
    assert_openai_error(http.post(path, content=raw, headers={"content-type": "application/json"}), 400, param)
    assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 200


def test_wrong_method_keeps_the_allow_header(http):
    res = http.get("/v1/completions")
    assert_openai_error(res, 405)
    assert res.headers["allow"] == "POST"


def test_unauthorised_answer_names_the_bearer_scheme(smollm2):
    with serving(create_app(smollm2, MODEL, api_key="k")) as url, httpx.Client(base_url=url) as http:
        res = http.get("/v1/models")
        assert_openai_error(res, 401)
        assert res.headers["www-authenticate"] == "Bearer"


def test_empty_api_key_is_refused_at_startup(smollm2, capsys):
    with pytest.raises(ValueError, match="API key is empty"):
        create_app(smollm2, MODEL, api_key="")
    assert main(["serve", "--api-key", "", "--model", "/nonexistent"]) == 2
    assert "--api-key is empty" in capsys.readouterr().err


def test_openapi_documents_the_errors_the_server_sends(http):
    schema = http.get("/openapi.json").json()
    completions = schema["paths"]["/v1/completions"]["post"]["responses"]
    assert {"200", "400", "401", "404", "413", "500", "503"} <= set(completions)
    assert all("422" not in op["responses"] for ops in schema["paths"].values() for op in ops.values())
    assert "text/plain" in schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "application/json" not in schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]


def test_tokenize_and_detokenize_round_trip(http, smollm2):
    res = http.post("/tokenize", json={"prompt": "Hello world"})
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["tokens"] == smollm2.get_tokenizer().encode("Hello world")
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == smollm2.stats()["max_model_len"]
    assert http.post("/detokenize", json={"tokens": body["tokens"]}).json() == {"prompt": "Hello world"}
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] > 3
    assert_openai_error(http.post("/detokenize", json={"tokens": [10**9]}), 400, "tokens")
    assert_openai_error(http.post("/tokenize", json={}), 400, "prompt")


def test_version_names_the_package(http):
    from pbs_engine import __version__

    assert http.get("/version").json() == {"version": __version__}
