"""The benchmark room's shared helpers and command line (the benchmarks themselves need a GPU)."""
from __future__ import annotations

import json

import pytest

from pbs_engine.bench.common import model_source, numbers, print_table, write_json
from pbs_engine.cli.main import main


def test_list_flags_parse_and_name_the_flag_when_bad():
    assert numbers("8192,32768", "--lengths") == [8192, 32768]
    assert numbers("0.1, 0.2", "--budgets", float) == [0.1, 0.2]
    with pytest.raises(ValueError, match="--lengths '8k'"):
        numbers("8k", "--lengths")


def test_table_prints_every_column_with_missing_values_as_dashes(capsys):
    print_table("title", [{"tokens": 8, "ours_s": 0.5, "hf_s": None}, {"tokens": 16, "ours_s": 1.25}])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "title" and lines[1].split() == ["tokens", "ours_s", "hf_s"]
    assert lines[2].split() == ["8", "0.500", "-"] and lines[3].split() == ["16", "1.250", "-"]


def test_json_records_device_and_command(tmp_path):
    write_json(str(tmp_path / "r.json"), [{"tokens": 8}], note="x")
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["rows"] == [{"tokens": 8}] and record["note"] == "x"
    assert {"device", "versions", "command"} <= set(record)


def test_random_shape_source_is_named_when_unknown():
    path, load_format, cfg = model_source("random:qwen2.5-7b-1m")
    assert load_format == "dummy" and cfg["num_key_value_heads"] == 4
    with pytest.raises(ValueError, match="unknown shape"):
        model_source("random:gpt-9")


@pytest.mark.parametrize("kind", ["kernels", "prefill", "decode", "check", "tiles", "profile"])
def test_gpu_benchmarks_refuse_clearly_without_a_gpu(kind, capsys):
    assert main(["bench", kind]) == 2
    assert "need a CUDA GPU" in capsys.readouterr().err


def test_serve_benchmark_runs_on_the_cpu_at_small_sizes(smollm2_path, capsys):
    assert main(["bench", "serve", "--model", str(smollm2_path), "--device", "cpu", "--method", "dense",
                 "--streams", "2", "--stream-len", "16", "--long", "300", "--shorts", "2", "--short-len", "16",
                 "--max-num-batched-tokens", "128", "--baseline-steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "streams' inter-token gap p99" in out and "short prompts' TTFT" in out and "long prompt's TTFT" in out


def test_cpu_benchmark_prints_ours_and_hf_on_the_same_prompt(smollm2_path, tmp_path, capsys):
    out = tmp_path / "cpu.json"
    assert main(["bench", "cpu", "--model", str(smollm2_path), "--length", "64", "--repeats", "1",
                 "--json", str(out)]) == 0
    assert "hf_over_ours" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense", "pbs"]
    for r in rows:
        assert r["tokens"] == 64 and r["ours_s"] > 0 and r["hf_s"] > 0 and r["hf_over_ours"] == r["hf_s"] / r["ours_s"]
