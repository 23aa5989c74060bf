"""`pbs-engine chat`: piped lines are answered one by one; the session keeps, resets and trims its history."""
from __future__ import annotations

import io
from contextlib import closing

import pytest

from pbs_engine import SamplingParams
from pbs_engine.cli.chat import ChatSession
from pbs_engine.cli.main import main

GREEDY = SamplingParams(max_tokens=8, temperature=0)


def all_blocks_free(engine) -> bool:
    stats = engine.stats()
    return stats["kv_free_blocks"] == stats["kv_total_blocks"] and stats["num_running"] == stats["num_waiting"] == 0


def test_piped_lines_are_answered_until_exit(smollm2_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n\n/exit\nAnd of Italy?\n"))
    code = main(["chat", "--model", str(smollm2_path), "--device", "cpu", "--attention", "dense",
                 "--max-tokens", "8", "--temperature", "0"])
    out = capsys.readouterr().out
    assert code == 0
    assert [line for line in out.splitlines() if line.strip()] == [out.strip()]  # one answer: /exit ended it
    assert "Paris" in out


def test_an_answer_joins_the_history(smollm2):
    session = ChatSession(smollm2, GREEDY)
    answer = "".join(session.ask("What is the capital of France?"))
    assert session.history == [{"role": "user", "content": "What is the capital of France?"},
                               {"role": "assistant", "content": answer}]


def test_reset_forgets_the_conversation(smollm2):
    session = ChatSession(smollm2, GREEDY, system="Be brief.")
    session.history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert session.command("/reset")
    assert session.history == [] and session.messages == [{"role": "system", "content": "Be brief."}]


def test_system_command_sets_the_system_message_and_starts_over(smollm2):
    session = ChatSession(smollm2, GREEDY)
    session.history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert session.command("/system You are a pirate.")
    assert session.messages == [{"role": "system", "content": "You are a pirate."}]


def test_exit_command_ends_the_session(smollm2):
    assert not ChatSession(smollm2, GREEDY).command("/exit")


def test_unknown_command_is_a_message(smollm2):
    with pytest.raises(ValueError, match="/frobnicate"):
        ChatSession(smollm2, GREEDY).command("/frobnicate")


def test_stopping_an_answer_aborts_it_and_drops_the_question(smollm2):
    session = ChatSession(smollm2, SamplingParams(max_tokens=200, temperature=0))
    with closing(session.ask("Tell me a long story about a dragon.")) as pieces:
        next(pieces)
        assert not all_blocks_free(smollm2.engine)
    assert all_blocks_free(smollm2.engine)
    assert session.history == []


def test_oldest_exchanges_are_dropped_when_the_context_is_full(smollm2, monkeypatch):
    question = [{"role": "user", "content": "Hi"}]
    room_for_one_question = len(smollm2.get_tokenizer().encode_chat(question)) + 4 + 10
    monkeypatch.setattr(smollm2.engine.config, "max_model_len", room_for_one_question)
    session = ChatSession(smollm2, SamplingParams(max_tokens=4, temperature=0))
    old = [{"role": "user", "content": "Tell me about cats. " * 8}, {"role": "assistant", "content": "Cats purr."}]
    session.history = old * 2
    "".join(session.ask("Hi"))
    assert session.history[0] == question[0] and len(session.history) == 2


def test_a_message_too_long_for_the_context_is_refused(smollm2, monkeypatch):
    monkeypatch.setattr(smollm2.engine.config, "max_model_len", 64)
    session = ChatSession(smollm2, GREEDY)
    with pytest.raises(ValueError, match="does not fit"):
        "".join(session.ask("word " * 100))
    assert session.history == []
