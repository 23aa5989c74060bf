"""pbs-engine: long-context LLM inference with Permuted Block-Sparse Attention.

The public names are imported on first use, so `pbs-engine --help` does not pay for importing torch."""
from __future__ import annotations

import importlib

__version__ = "0.1.0"
_EXPORTS = {"LLM": "pbs_engine.engine.llm", "SamplingParams": "pbs_engine.engine.sampling_params",
            "RequestOutput": "pbs_engine.engine.outputs", "CompletionOutput": "pbs_engine.engine.outputs",
            "Logprob": "pbs_engine.engine.outputs", "PBSConfig": "pbs_engine.kernels.config"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pbs_engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
