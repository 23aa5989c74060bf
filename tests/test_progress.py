"""Long waits show progress on stderr: a redrawn tqdm bar on a terminal, plain periodic lines elsewhere."""
from __future__ import annotations

import io
import re
import sys

from tqdm import tqdm

import fixtures
from pbs_engine.engine.model_source import converted_gguf
from pbs_engine.progress import LineProgress, progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_a_line_is_printed_at_the_start_every_interval_and_at_the_end():
    out = io.StringIO()
    meter = LineProgress(10, "work", "it", "", out, interval=3600)
    for _ in range(10):
        meter.update()
    meter.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("work:   0% 0/10") and lines[1].startswith("work: 100% 10/10")


def test_on_a_terminal_the_meter_is_tqdm(monkeypatch):
    monkeypatch.setattr(sys, "stderr", FakeTerminal())
    with progress(3, "work") as meter:
        assert isinstance(meter, tqdm)


def test_first_use_conversion_reports_tensors_written_as_lines(tmp_path, monkeypatch, capsys):
    gguf = fixtures.smollm2_gguf()  # from the real cache, before it is moved aside
    monkeypatch.setenv("PBS_ENGINE_CACHE", str(tmp_path))
    converted_gguf(gguf)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert re.search(rf"converting {re.escape(gguf.name)}:   0% 0/(\d+) .*\n.*: 100% (\1)/\1 \[.*tensor/s\]", err)


def test_first_use_conversion_draws_a_bar_on_a_terminal(tmp_path, monkeypatch):
    gguf = fixtures.smollm2_gguf()
    monkeypatch.setenv("PBS_ENGINE_CACHE", str(tmp_path))
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    converted_gguf(gguf)
    last = terminal.getvalue().split("\r")[-1]
    assert re.match(r"converting .*\.gguf: 100%\|.*\| (\d+)/\1 \[", last)
