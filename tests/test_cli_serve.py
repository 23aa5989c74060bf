"""`pbs-engine serve`: a busy address fails before the model loads; "ready" is printed once the server listens."""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import urllib.request

from pbs_engine.cli import serve
from pbs_engine.cli.main import main


def test_a_busy_port_fails_with_a_message_before_the_model_loads(monkeypatch, capsys):
    loads = []
    monkeypatch.setattr(serve, "load_llm", lambda args: loads.append(args))
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port), "--model", "qwen2.5-7b-1m"]) == 2
    err = capsys.readouterr().err
    assert f"--host 127.0.0.1 --port {port}" in err and "in use" in err and len(err.splitlines()) == 1
    assert loads == []


def test_a_port_out_of_range_is_refused(capsys):
    assert main(["serve", "--port", "70000"]) == 2
    assert "--port 70000" in capsys.readouterr().err


def test_ready_is_printed_once_the_server_answers(smollm2_path):
    proc = subprocess.Popen([sys.executable, "-m", "pbs_engine.cli.main", "serve", "--port", "0", "--device", "cpu",
                             "--model", str(smollm2_path)], stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "ready" in line:
                break
        url = re.search(r"ready: serving '[^']+' at (http://127\.0\.0\.1:(\d+)/v1)", lines[-1])
        assert url and url.group(2) != "0", lines
        assert not any("ready" in line for line in lines[:-1]) and any("loading model" in line for line in lines)
        with urllib.request.urlopen(url.group(1) + "/models", timeout=30) as reply:
            assert json.load(reply)["data"][0]["id"] == smollm2_path.name
    finally:
        proc.terminate()
        proc.wait(timeout=60)
