"""`pbs-engine eval --suite ruler`: RULER through the real lm-eval package against real `pbs-engine serve`
subprocesses (SmolLM2 on CPU, 2K tokens, two offline tasks, one sample each: prefill on CPU is the cost), with no
network."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pbs_engine.cli.main import build_parser, main
from pbs_engine.eval.served import model_flags

TASKS = ["niah_single_1", "ruler_vt"]


@pytest.fixture(scope="module")
def ruler(smollm2_path, tmp_path_factory):
    # the eval extra is installed apart from dev (.ci/run does; README's install builds nothing from source)
    pytest.importorskip("lm_eval", reason="needs the eval extra: pip install -e '.[eval]'")
    out = tmp_path_factory.mktemp("ruler")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "pbs_engine.cli.main", "eval", "--suite", "ruler",
                          "--model", str(smollm2_path), "--device", "cpu", "--lengths", "2048",
                          "--tasks", "niah_single_1,vt", "--limit", "1", "--methods", "dense,pbs", "--out", str(out)],
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


@pytest.mark.parametrize("flags, fault", [
    (["--tasks", "niah_multivalue"], "--tasks niah_multivalue: lm-eval downloads"),
    (["--tasks", "qa_squad"], "--tasks qa_squad: lm-eval downloads"),
    (["--tasks", "niah_single_9"], "--tasks niah_single_9: not a RULER task"),
    (["--methods", "dense,sparse"], "--methods sparse"),
    (["--lengths", "4096,16384"], "--lengths 16384: beyond the model's context of 8192 tokens"),
])
def test_bad_input_is_refused_before_any_server_starts(smollm2_path, tmp_path, capsys, flags, fault):
    code = main(["eval", "--suite", "ruler", "--model", str(smollm2_path), "--out", str(tmp_path / "o"), *flags])
    assert code == 2 and fault in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_servers_get_the_model_options_given_to_eval():
    args = build_parser().parse_args(["eval", "--suite", "ruler", "--model", "m", "--device", "cpu", "--attention",
                                      "dense", "--pbs-budget", "0.2", "--no-pbs-permute", "--limit", "3"])
    assert model_flags(args, skip=("attention",)) == ["--model", "m", "--device", "cpu", "--pbs-budget", "0.2",
                                                      "--no-pbs-permute"]
