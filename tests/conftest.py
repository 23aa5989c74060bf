"""Shared fixtures: the real models (fetched and converted once by tests/fixtures.py, cached across runs)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Triton kernels are tested in the CPU interpreter; it must be chosen before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).parent))

import fixtures  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return fixtures.smollm2_dir()


@pytest.fixture(scope="session")
def qwen_path() -> Path:
    return fixtures.qwen_dir()


@pytest.fixture(scope="session")
def real_text() -> str:
    return fixtures.real_text()


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """One SmolLM2 engine shared by the tests that only generate (dense attention, fp32, CPU)."""
    from pbs_engine import LLM

    return LLM(str(smollm2_path), device="cpu", attention="dense")
