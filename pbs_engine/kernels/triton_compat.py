"""Triton where it is installed (every CUDA build of torch brings it; the tests' interpreter needs it), else
stand-ins that let the kernel modules import on a CPU-only machine, where only the torch paths run: a kernel
launched there says what is missing instead of failing at import."""
from __future__ import annotations


class _NoTriton:
    """`triton` / `triton.language` without Triton: `jit` keeps the function; a launch raises."""

    def jit(self, fn=None, **_):
        return _Unlaunchable(fn) if fn is not None else _Unlaunchable

    def __getattr__(self, name: str):
        raise RuntimeError(f"triton.{name}: Triton is not installed (pip install triton); the CPU paths do not "
                           "need it")


class _Unlaunchable:
    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        raise RuntimeError(f"Triton kernel {self.fn.__name__} cannot launch: Triton is not installed")


try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = _NoTriton()

__all__ = ["triton", "tl"]
