"""`pbs-engine batch`: one durable JSON line per document, exactly once across interrupted and resumed runs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pbs_engine.cli.batch import ELISION, done_ids, fit_prompt, read_documents
from pbs_engine.cli.main import main

SHORT = {
    "eiffel.txt": "The Eiffel Tower is a wrought-iron tower in Paris, built for the 1889 World's Fair.",
    "leaves.md": "# Photosynthesis\nPlants turn light, water and carbon dioxide into sugar and oxygen.",
}
LONG_TEXT = "Chapter one begins here. " + "The river kept flowing past the old mill. " * 60 + "The end of the tale."


@pytest.fixture
def corpus(tmp_path, monkeypatch) -> Path:
    """A folder of two short documents and a JSONL file with one short and one long document; the working dir."""
    monkeypatch.chdir(tmp_path)
    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in SHORT.items():
        (docs / name).write_text(text)
    (docs / "notes.csv").write_text("ignored: not a text document")
    with open(tmp_path / "more.jsonl", "w") as f:
        f.write(json.dumps({"id": 7, "text": "Water boils at 100 degrees Celsius at sea level."}) + "\n")
        f.write(json.dumps({"id": "long", "text": LONG_TEXT}) + "\n")
    return tmp_path


def run_batch(smollm2_path, corpus: Path, *extra: str) -> int:
    return main(["batch", "docs", "more.jsonl", "--output", str(corpus / "out.jsonl"),
                 "--model", str(smollm2_path), "--device", "cpu", "--attention", "dense", "--max-tokens", "4",
                 "--max-model-len", "160", *extra])


def results(corpus: Path) -> list[dict]:
    return [json.loads(line) for line in (corpus / "out.jsonl").read_text().splitlines()]


ALL_IDS = {"7", "long", *(f"docs/{name}" for name in SHORT)}


def test_documents_come_from_folders_and_jsonl_with_their_ids(corpus):
    docs = read_documents(["docs", "more.jsonl"])
    assert [d.id for d in docs] == ["docs/eiffel.txt", "docs/leaves.md", "7", "long"]
    assert docs[0].text == SHORT["eiffel.txt"]


def test_a_duplicate_id_is_refused(corpus):
    with pytest.raises(ValueError, match="'7' appears twice"):
        read_documents([str(corpus / "more.jsonl"), str(corpus / "more.jsonl")])


def test_a_bad_jsonl_line_is_named(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "text": "fine"}\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: 'text'"):
        read_documents([str(tmp_path / "bad.jsonl")])


def test_every_document_gets_one_line_and_a_too_long_one_an_error(smollm2_path, corpus, capsys):
    assert run_batch(smollm2_path, corpus) == 0
    lines = {r["id"]: r for r in results(corpus)}
    assert set(lines) == ALL_IDS and len(results(corpus)) == len(ALL_IDS)
    assert "error" in lines["long"] and "long" in capsys.readouterr().err
    for doc_id in ALL_IDS - {"long"}:
        r = lines[doc_id]
        assert r["summary"] and r["completion_tokens"] <= 4 and r["prompt_tokens"] > 0 and r["seconds"] >= 0
        assert r["finish_reason"] in ("stop", "length")


def test_resume_after_an_interrupted_run_writes_each_id_exactly_once(smollm2_path, corpus):
    assert run_batch(smollm2_path, corpus, "--limit", "2") == 0
    first = [r["id"] for r in results(corpus)]
    assert len(first) == 2
    with open(corpus / "out.jsonl", "a") as f:  # a crash in the middle of a write
        f.write('{"id": "7", "summ')
    assert run_batch(smollm2_path, corpus, "--resume", "--truncate") == 0
    ids = [r["id"] for r in results(corpus)]
    assert sorted(ids) == sorted(ALL_IDS) and ids[:2] == first
    assert next(r for r in results(corpus) if r["id"] == "long")["truncated"] is True


def test_an_existing_output_needs_resume(smollm2_path, corpus):
    (corpus / "out.jsonl").write_text('{"id": "7", "summary": "done"}\n')
    assert run_batch(smollm2_path, corpus) == 2


def test_done_ids_drops_a_torn_last_line(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a", "summary": "x"}\n{"id": "b", "summ')
    assert done_ids(out) == {"a"}
    assert out.read_text() == '{"id": "a", "summary": "x"}\n'


def test_truncation_keeps_the_start_and_end_of_the_document(smollm2):
    tok = smollm2.get_tokenizer()

    def render(text: str) -> list[int]:
        return tok.encode_chat([{"role": "user", "content": "Summarise:\n\n" + text}])

    ids, truncated = fit_prompt(render, tok, LONG_TEXT, 120, truncate=True)
    text = tok.decode(ids)
    assert truncated and len(ids) <= 120
    assert "Chapter one begins" in text and "end of the tale" in text and ELISION.strip() in text
