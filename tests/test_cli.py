"""`pbs-engine`: help and start-up, generate, --chat-template, convert, models; clear messages for bad input."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

import fixtures
from pbs_engine.cli.main import main
from pbs_engine.engine.tokenizer import Tokenizer


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


def test_chat_template_replaces_the_models_own(smollm2_path, tmp_path, capsys):
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}Q: {{ m.content }}\n{% endfor %}A:")
    assert main(["generate", "--model", str(smollm2_path), "--device", "cpu", "--chat-template", str(template),
                 "--json", "--max-tokens", "2", "What is two plus two?"]) == 0
    answer = json.loads(capsys.readouterr().out)
    expected = Tokenizer(smollm2_path).encode("Q: What is two plus two?\nA:", add_special_tokens=False)
    assert answer["prompt_tokens"] == len(expected)


def test_a_chat_template_that_is_neither_a_file_nor_a_template_is_refused(tmp_path, capsys):
    assert main(["generate", "--chat-template", str(tmp_path / "absent.jinja"), "hi"]) == 2
    assert "chat_template=" in capsys.readouterr().err


def test_convert_refuses_to_write_into_a_non_empty_folder(tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["convert", str(tmp_path / "any.gguf"), str(out)]) == 2
    assert "--force" in capsys.readouterr().err and (out / "notes.txt").read_text() == "mine"


def test_convert_with_force_writes_into_a_non_empty_folder(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert main(["convert", str(fixtures.smollm2_gguf()), str(out), "--force"]) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_models_lists_the_converted_models_and_removes_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PBS_ENGINE_CACHE", str(tmp_path))
    for name, size in (("small-0123", 3 << 20), ("big-4567", 5 << 30 >> 4)):
        folder = tmp_path / "models" / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        with open(folder / "model.safetensors", "wb") as f:
            f.truncate(size)
    (tmp_path / "models" / "partial.tmp99").mkdir()  # an unfinished conversion: no config.json
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert re.search(r"big-4567\s+320\.0 MiB", listing) and re.search(r"small-0123\s+3\.0 MiB", listing)
    assert "partial" not in listing
    assert main(["models", "--remove", "small-0123"]) == 0
    assert "removed small-0123" in capsys.readouterr().out and not (tmp_path / "models" / "small-0123").exists()
    assert main(["models", "--remove", "small-0123"]) == 2
    assert "small-0123" in capsys.readouterr().err and (tmp_path / "models" / "big-4567").is_dir()


def test_a_bad_sampling_flag_is_named_as_the_flag(smollm2_path, capsys):
    assert main(["generate", "--model", str(smollm2_path), "--device", "cpu", "--max-tokens", "-5", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "pbs-engine: error: --max-tokens -5: must be >= 1"


def test_an_unknown_device_is_one_short_line(smollm2_path, capsys):
    assert main(["generate", "--model", str(smollm2_path), "--device", "tpu", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "pbs-engine: error: device 'tpu': choose cuda, cuda:N or cpu"


def test_an_unreachable_hub_says_so_and_points_to_offline_use(monkeypatch, tmp_path, capsys):
    import huggingface_hub

    def unreachable(*args, **kwargs):
        raise ConnectionError("Failed to establish a new connection: [Errno 101] Network is unreachable")

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    assert main(["generate", "--model", "qwen2.5-7b-1m", "hi"]) == 2
    err = capsys.readouterr().err
    assert "unreachable" in err and "HF_HUB_OFFLINE=1" in err and "pbs-engine convert" in err
