"""`pbs-engine eval --suite ruler`: RULER through the real lm-eval package against real `pbs-engine serve`
subprocesses (SmolLM2 on CPU, 2K tokens, two offline tasks, one sample each: prefill on CPU is the cost), with no
network."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pbs_engine.cli.common import pbs_config
from pbs_engine.cli.main import build_parser, main
from pbs_engine.eval.ruler import HEADROOM, sample_length, server_max_len, summary
from pbs_engine.eval.served import model_flags
from pbs_engine.kernels.config import PBSConfig

TASKS = ["niah_single_1", "ruler_vt"]


@pytest.fixture(scope="module")
def ruler(smollm2_path, tmp_path_factory):
    # the eval extra is installed apart from dev (.ci/run does; README's install builds nothing from source)
    pytest.importorskip("lm_eval", reason="needs the eval extra: pip install -e '.[eval]'")
    out = tmp_path_factory.mktemp("ruler")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "pbs_engine.cli.main", "eval", "--suite", "ruler",
                          "--model", str(smollm2_path), "--device", "cpu", "--lengths", "2048",
                          "--tasks", "niah_single_1,vt", "--samples", "1", "--methods", "dense,pbs", "--out", str(out)],
                         capture_output=True, text=True, timeout=1500, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout, out, json.loads((out / "results.json").read_text())


def test_prints_a_table_per_method_and_each_against_dense(ruler):
    stdout, _, _ = ruler
    print(stdout)
    for title in ("dense: serve --attention dense", "pbs: serve --attention pbs", "pbs minus dense"):
        assert title in stdout
    assert stdout.count("| niah_single_1 |") == 3 and stdout.count("| ruler_vt |") == 3


def test_every_cell_has_an_accuracy_over_its_samples(ruler):
    cells = ruler[2]["cells"]
    assert sorted((c["method"], c["task"]) for c in cells) == sorted((m, t) for m in ("dense", "pbs") for t in TASKS)
    for c in cells:
        assert c["length"] == 2048 and c["samples"] == c["requests"] == 1 and 0 <= c["accuracy"] <= 1


def test_each_cell_reports_the_prefill_density_its_requests_got(ruler):
    density = {(c["method"], c["task"]): c["density"] for c in ruler[2]["cells"]}
    for task in TASKS:
        assert density["dense", task] == 1.0
        assert 0 < density["pbs", task] < 1


def test_lm_evals_own_outputs_and_the_plot_are_kept(ruler):
    out = ruler[1]
    for method in ("dense", "pbs"):
        for task in TASKS:
            samples = (out / "raw" / method / f"samples_{task}_2048.jsonl").read_text().splitlines()
            assert len(samples) == 1 and "resps" in json.loads(samples[0])
            assert task in json.loads((out / "raw" / method / f"results_{task}_2048.json").read_text())["results"]
        assert "ready" in (out / "raw" / method / "server.log").read_text()
    assert (out / "ruler_accuracy.png").stat().st_size > 0


def test_resume_keeps_the_finished_cells_and_starts_no_server(ruler, smollm2_path):
    _, out, results = ruler
    logs = {m: (out / "raw" / m / "server.log").stat().st_mtime_ns for m in ("dense", "pbs")}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "pbs_engine.cli.main", "eval", "--suite", "ruler",
                          "--model", str(smollm2_path), "--device", "cpu", "--lengths", "2048",
                          "--tasks", "niah_single_1,vt", "--samples", "1", "--methods", "dense,pbs", "--out", str(out),
                          "--resume"], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["cells"] == results["cells"]
    assert {m: (out / "raw" / m / "server.log").stat().st_mtime_ns for m in logs} == logs


@pytest.mark.parametrize("flags, fault", [
    (["--tasks", "niah_multivalue"], "--tasks niah_multivalue: lm-eval downloads"),
    (["--tasks", "qa_squad"], "--tasks qa_squad: lm-eval downloads"),
    (["--tasks", "niah_single_9"], "--tasks niah_single_9: not a RULER task"),
    (["--methods", "dense,sparse"], "--methods sparse"),
    (["--lengths", "4096,16384"], "--lengths 16384: beyond the model's context of 8192 tokens"),
    (["--max-model-len", "9000"], "--max-model-len 9000: beyond the model's context of 8192 tokens"),
    (["--samples", "0"], "--samples 0 must be >= 1"),
])
def test_bad_input_is_refused_before_any_server_starts(smollm2_path, tmp_path, capsys, flags, fault):
    code = main(["eval", "--suite", "ruler", "--model", str(smollm2_path), "--out", str(tmp_path / "o"), *flags])
    assert code == 2 and fault in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_servers_get_the_model_options_given_to_eval():
    args = build_parser().parse_args(["eval", "--suite", "ruler", "--model", "m", "--device", "cpu", "--attention",
                                      "dense", "--pbs-budget", "0.2", "--pbs-permute", "--samples", "3"])
    flags = model_flags(args, skip=("attention",))
    assert "--attention" not in flags and "--samples" not in flags
    served = build_parser().parse_args(["serve", *flags])
    assert (served.model, served.device) == ("m", "cpu")
    assert pbs_config(served) == PBSConfig(budget=0.2, permute=True)


def test_a_length_filling_the_models_context_gets_samples_short_enough_for_the_answer(qwen_path):
    max_len = server_max_len([4096, 32768], qwen_path, None)  # Qwen2.5-Coder-0.5B: 32768 positions
    assert max_len == 32768
    assert sample_length(4096, max_len) == 4096 and sample_length(32768, max_len) == 32768 - HEADROOM
    assert server_max_len([4096], qwen_path, None) == 4096 + HEADROOM


def test_the_summary_names_the_lengths_whose_samples_were_shortened():
    cells = [{"method": "dense", "task": "ruler_vt", "length": n, "sample_length": m, "accuracy": 0.5, "density": 1.0}
             for n, m in ((4096, 4096), (32768, 32512))]
    text = summary({"lm_eval": "0.4.13", "model": "m", "samples": 50, "max_model_len": 32768, "tasks": ["ruler_vt"],
                    "lengths": [4096, 32768], "methods": {"dense": ["--attention", "dense"]}, "cells": cells})
    assert "max_model_len 32768: 32768 -> 32512 tokens" in text and "4096 ->" not in text
    assert "| ruler_vt | 50.0 (1.00) | 50.0 (1.00) |" in text


def test_samples_are_generated_once_then_read_from_the_cache(smollm2_path, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="needs the eval extra: pip install -e '.[eval]'")
    from pbs_engine.eval import ruler as ruler_mod

    monkeypatch.setenv("PBS_ENGINE_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ruler_mod._import_lm_eval()
    first = ruler_mod.load_tasks(["ruler_vt"], [1024], smollm2_path, 2)
    assert ruler_mod.sample_cache("ruler_vt", 1024, smollm2_path, 2).is_dir()

    def generate(*args):
        raise AssertionError("a cached cell was generated again")

    monkeypatch.setattr(ruler_mod, "_generate_cell", generate)
    again = ruler_mod.load_tasks(["ruler_vt"], [1024], smollm2_path, 2)
    _, direct = ruler_mod._load_task("ruler_vt", 1024, smollm2_path)  # what lm-eval generates itself
    docs = [list(t[1].test_docs()) for t in (first["ruler_vt", 1024], again["ruler_vt", 1024])]
    assert len(docs[0]) == 2 and docs[0] == docs[1] == list(direct.test_docs())[:2]
    assert ruler_mod.sample_cache("ruler_vt", 1024, smollm2_path, 3) != ruler_mod.sample_cache(
        "ruler_vt", 1024, smollm2_path, 2)


def test_a_dataset_whose_state_cannot_be_pickled_gets_a_random_fingerprint(monkeypatch):
    """Python 3.12 + pyarrow 26: datasets' fingerprint pickling fails on pyarrow's MonthDayNano inside RULER's
    Dataset.from_list; the samples must still be built."""
    pytest.importorskip("lm_eval", reason="needs the eval extra: pip install -e '.[eval]'")
    import pickle

    import datasets
    import datasets.arrow_dataset as arrow_dataset

    from pbs_engine.eval import ruler as ruler_mod

    def unpicklable(dataset):
        raise pickle.PicklingError("Can't pickle <class 'MonthDayNano'>: it's not found as builtins.MonthDayNano")

    monkeypatch.setattr(arrow_dataset, "generate_fingerprint", unpicklable)
    ruler_mod._fingerprint_fallback()
    ruler_mod._fingerprint_fallback()  # idempotent: wrapped once
    ds = datasets.Dataset.from_list([{"input": "a", "outputs": ["1"]}])
    assert ds[0] == {"input": "a", "outputs": ["1"]} and len(ds._fingerprint) == 16
