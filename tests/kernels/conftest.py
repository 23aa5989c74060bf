"""Kernel tests run every Triton kernel in the CPU interpreter; it must be chosen before triton is first imported."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
