"""The `pbs-engine` command: help, generate, and clear messages for bad input."""
from __future__ import annotations

import subprocess
import sys

import pytest

from pbs_engine.cli.main import main


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pbs_engine.cli.main", *args], input=stdin, capture_output=True,
                          text=True, timeout=600)


def test_help_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ("generate", "convert", "bench"):
        assert command in out


def test_generate_answers_a_chat_prompt(smollm2_path):
    res = run_cli("generate", "--model", str(smollm2_path), "--device", "cpu", "--max-tokens", "24",
                  "What is the capital of France?")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout


def test_generate_reads_prompts_from_stdin(smollm2_path):
    res = run_cli("generate", "--model", str(smollm2_path), "--device", "cpu", "--raw", "--max-tokens", "4",
                  stdin="Once upon a time\nThe number after one is\n")
    assert res.returncode == 0, res.stderr
    assert len([block for block in res.stdout.split("\n\n") if block.strip()]) == 2


def test_missing_model_is_a_message_not_a_traceback(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "absent"), "hi"]) == 2
    err = capsys.readouterr().err
    assert "absent" in err and "Traceback" not in err


def test_convert_rejects_a_missing_file(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "absent.gguf"), str(tmp_path / "out")]) == 2
    assert "absent.gguf" in capsys.readouterr().err


def test_help_and_typos_do_not_import_torch():
    probe = ("import sys\nfrom pbs_engine.cli.main import main\nfor argv in (['--help'], ['generate', '--help'], "
             "['generat']):\n    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
             "print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert res.stdout.strip().splitlines()[-1] == "False", res.stderr


def test_an_unknown_option_shows_the_subcommand_usage(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["generate", "--bogus", "hi"])
    err = capsys.readouterr().err
    assert exit.value.code == 2
    assert "usage: pbs-engine generate" in err and "unrecognized arguments: --bogus" in err
