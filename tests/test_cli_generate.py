"""`pbs-engine generate`: streamed answers in prompt order, --json, -n samples, --stop; engine options shared."""
from __future__ import annotations

import io
import json
import sys

import pytest

from pbs_engine.cli.common import llm_kwargs
from pbs_engine.cli.main import build_parser, main

CAPITAL = "What is the capital of France?"


class Recorder(io.StringIO):
    """stdout that remembers each write."""

    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


def generate(smollm2_path, *args: str) -> int:
    return main(["generate", "--model", str(smollm2_path), "--device", "cpu", "--attention", "dense", *args])


def test_the_answer_is_printed_piece_by_piece(smollm2_path, monkeypatch):
    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    assert generate(smollm2_path, "--max-tokens", "12", CAPITAL) == 0
    pieces = [w for w in out.writes if w.strip()]
    assert len(pieces) >= 3 and "Paris" in "".join(pieces)
    assert out.getvalue() == "".join(pieces) + "\n"


def test_json_prints_one_object_per_completion_in_prompt_order(smollm2_path, capsys):
    assert generate(smollm2_path, "--json", "-n", "2", "--seed", "7", "--temperature", "0.9", "--max-tokens", "3",
                    CAPITAL, "Name a colour.") == 0
    objects = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(o["prompt"], o["index"]) for o in objects] == [(CAPITAL, 0), (CAPITAL, 1), ("Name a colour.", 0),
                                                            ("Name a colour.", 1)]
    for o in objects:
        assert o["text"] and 1 <= o["completion_tokens"] <= 3 and o["prompt_tokens"] > 0
        assert o["finish_reason"] in ("stop", "length") and o["metrics"]["ttft_s"] > 0


def test_stop_ends_the_answer_before_the_stop_text(smollm2_path, capsys):
    assert generate(smollm2_path, "--json", "--stop", "Paris", "--stop", "London", "--max-tokens", "24",
                    CAPITAL) == 0
    [answer] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert answer["finish_reason"] == "stop" and answer["stop_reason"] == "Paris" and "Paris" not in answer["text"]


def test_n_below_one_is_refused(capsys):
    assert main(["generate", "-n", "0", "hi"]) == 2
    assert "-n 0" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"], ["serve"], ["batch", "docs", "-o", "o.jsonl"],
                                     ["eval"]])
def test_max_num_seqs_is_an_engine_option_of_every_model_command(command):
    args = build_parser().parse_args([*command, "--max-num-seqs", "3"])
    assert llm_kwargs(args)["max_num_seqs"] == 3
