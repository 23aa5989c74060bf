"""Tokenizer: chat templates render as transformers renders them; streaming detokenisation is exact."""
from __future__ import annotations

import pytest

from pbs_engine.engine.tokenizer import ChatTemplateError, IncrementalDetokenizer, Tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Count to 3 in Japanese: 一、二、三?"}],
]
TEXTS = ["Grüße aus Köln — 東京タワー 🗼🚀 and naïve café", "def f(x):\n    return x ** 2  # ✓\n", "12345 6789"]


@pytest.fixture(scope="module", params=["smollm2_path", "qwen_path"])
def model_dir(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def tok(model_dir):
    return Tokenizer(model_dir)


@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(model_dir, tok, conv, add_generation_prompt):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(model_dir)
    expected = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert tok.apply_chat_template(conv, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenisation_equals_full_decode(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    prompt = tok.encode("Say:", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt)
    pieces = [detok.step(t) for t in ids]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_end_of_turn_is_a_stop_token(tok):
    assert tok.encode("<|im_end|>", add_special_tokens=False)[0] in tok.eos_token_ids


@pytest.mark.parametrize("messages, problem", [
    ([], "non-empty list"),
    ([{"content": "hi"}], "role"),
    ([{"role": "wizard", "content": "hi"}], "wizard"),
    ([{"role": "user", "content": 5}], "content"),
    ("hello", "non-empty list"),
])
def test_invalid_messages_are_named(tok, messages, problem):
    with pytest.raises(ChatTemplateError, match=problem):
        tok.apply_chat_template(messages)
