"""`pbs-engine batch`: one durable JSON line per document, exactly once across interrupted and resumed runs."""
from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import pytest

from pbs_engine.cli.batch import done_ids, read_documents
from pbs_engine.cli.main import main
from pbs_engine.summarize import ELISION, fit_prompt

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


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def one_doc(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "eiffel.txt").write_text(SHORT["eiffel.txt"])
    return tmp_path


def run_docs(smollm2_path, *extra: str) -> int:
    return main(["batch", "docs", "--output", "out.jsonl", "--model", str(smollm2_path), "--device", "cpu",
                 "--attention", "dense", "--max-tokens", "4", *extra])


def test_progress_off_a_terminal_is_plain_lines_of_documents_and_tokens(smollm2_path, one_doc, capsys):
    assert run_docs(smollm2_path) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    assert "1 of 1 documents to summarise" in err and "loading model" in err and "queued 1 document" in err
    assert re.search(r"batch:   0% 0/\d+ \[00:00<\?.*0/1 docs, 0/\d+ prompt tokens read", err)
    assert re.search(r"batch: 100% (\d+)/\1 \[.*tok/s, 1/1 docs, (\d+)/\2 prompt tokens read, [1-4] generated\]", err)


def test_progress_on_a_terminal_is_a_redrawn_bar_with_an_eta(smollm2_path, one_doc, monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert run_docs(smollm2_path) == 0
    redraws = terminal.getvalue().split("\r")
    assert len(redraws) >= 2 and "batch:   0%|" in redraws[1] and "<?" in redraws[1]
    assert "batch: 100%|" in redraws[-1] and "1/1 docs" in redraws[-1] and "<00:00" in redraws[-1]


def test_a_non_utf8_file_is_named_and_gets_an_error_line(tmp_path):
    (tmp_path / "cyrillic.txt").write_bytes("Привет".encode("cp1251"))
    [doc] = read_documents([str(tmp_path)])
    assert doc.id == str(tmp_path / "cyrillic.txt") and "not UTF-8" in doc.error


def test_a_non_utf8_jsonl_line_is_named(tmp_path):
    (tmp_path / "docs.jsonl").write_bytes(b'{"id": "a", "text": "fine"}\n{"id": "b", "text": "\xd0"}\n')
    with pytest.raises(ValueError, match=r"docs.jsonl:2: not UTF-8"):
        read_documents([str(tmp_path / "docs.jsonl")])


@pytest.mark.parametrize("make", [lambda p: (p / "empty").mkdir(), lambda p: (p / "empty.jsonl").write_text("\n")],
                         ids=["folder", "jsonl"])
def test_an_input_without_documents_is_an_error_naming_it(tmp_path, monkeypatch, capsys, make):
    monkeypatch.chdir(tmp_path)
    make(tmp_path)
    name = next(tmp_path.iterdir()).name
    assert main(["batch", name, "--output", "out.jsonl"]) == 2
    err = capsys.readouterr().err
    assert f"error: {name}: no " in err and "nothing to do" not in err


def test_unreadable_and_empty_documents_get_error_lines_and_the_batch_goes_on(smollm2_path, one_doc, capsys):
    (one_doc / "docs" / "latin1.txt").write_bytes("Café".encode("latin-1"))
    (one_doc / "docs" / "blank.md").write_text("  \n\n ")
    assert run_docs(smollm2_path) == 0
    lines = {r["id"]: r for r in results(one_doc)}
    assert "not UTF-8" in lines["docs/latin1.txt"]["error"] and "empty" in lines["docs/blank.md"]["error"]
    assert lines["docs/eiffel.txt"]["summary"]
    err = capsys.readouterr().err
    assert "docs/latin1.txt: not UTF-8" in err and "docs/blank.md: the document is empty" in err


def test_resume_retries_the_documents_with_an_error_line(smollm2_path, one_doc):
    (one_doc / "docs" / "late.txt").write_text(" ")
    assert run_docs(smollm2_path) == 0
    (one_doc / "docs" / "late.txt").write_text("The Moon orbits the Earth about every 27 days.")
    assert run_docs(smollm2_path, "--resume") == 0
    ids = [r["id"] for r in results(one_doc)]
    assert sorted(ids) == ["docs/eiffel.txt", "docs/late.txt"]
    assert "summary" in results(one_doc)[1] and results(one_doc)[0]["id"] == "docs/eiffel.txt"
