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
