"""Offline batch over Ray: the Summarizer replica class, and `pbs-engine batch --ray` on a local Ray cluster with
the single-process job's inputs, outputs and --resume."""
from __future__ import annotations

import json

import pytest

from pbs_engine.cli.main import main
from pbs_engine.ray import COLUMNS, Summarizer

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield
    ray.shutdown()


def test_summarizer_gives_one_record_per_row(smollm2_path):
    replica = Summarizer(str(smollm2_path), device="cpu", attention="dense", max_tokens=4)
    out = replica({"id": ["a", "b", "c"], "text": ["Paris is the capital of France.", "", "Water boils at 100 C."]})
    assert set(out) == set(COLUMNS) and out["id"] == ["a", "b", "c"]
    assert out["summary"][0] and out["completion_tokens"][0] == 4 and out["error"][0] is None
    assert "empty" in out["error"][1] and out["summary"][1] is None


def test_batch_on_ray_writes_each_document_once_and_resumes(smollm2_path, tmp_path, monkeypatch, local_ray):
    monkeypatch.chdir(tmp_path)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": i, "text": f"Document {i} says the sky is blue."}) + "\n"
                            for i in range(4)))
    args = ["batch", str(docs), "--output", "out.jsonl", "--ray", "--ray-batch-size", "1",
            "--model", str(smollm2_path), "--device", "cpu", "--attention", "dense", "--max-tokens", "4"]
    assert main(args + ["--replicas", "2"]) == 0
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in records) == ["0", "1", "2", "3"]
    assert all(r["summary"] and r["completion_tokens"] == 4 for r in records)
    with open(docs, "a") as f:
        f.write(json.dumps({"id": 9, "text": "One more document about rivers."}) + "\n")
    assert main(args + ["--resume"]) == 0
    ids = [json.loads(line)["id"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(ids) == ["0", "1", "2", "3", "9"]
