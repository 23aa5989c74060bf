"""Attention and layer kernels. Each public function runs its Triton kernel on CUDA tensors and its PyTorch
reference (`*_ref`, same signature, the specification) otherwise, except prefill attention, whose CPU path is
torch's SDPA (dense) or a blocked torch computation (PBS), tested against the references, and fp8_linear, which is
torch._scaled_mm on CUDA (`fp8_linear_scaled_mm` forces it); `*_triton` in each module forces the kernel (the tests
run those on CPU under TRITON_INTERPRET=1). docs/kernels.md lists them.

The names load lazily, so `pbs_engine.kernels.config` (PBSConfig) imports without torch: the CLI builds its
--pbs-* flags from it."""
from __future__ import annotations

import importlib
import sys
import types

_MODULES = {
    "PBSConfig": "config", "linear": "dispatch",
    "flash_prefill": "flash_prefill", "flash_prefill_ref": "flash_prefill",
    "rms_norm": "fused", "rms_norm_ref": "fused", "silu_and_mul": "fused", "silu_and_mul_ref": "fused",
    "FP8_DTYPE": "fp8", "FP8_MAX": "fp8", "FP8_UNSUPPORTED": "fp8", "supports_fp8": "fp8", "quantize_weight": "fp8",
    "rms_norm_quant": "fp8", "rms_norm_quant_ref": "fp8", "silu_and_mul_quant": "fp8",
    "silu_and_mul_quant_ref": "fp8", "quantize_per_token": "fp8", "quantize_per_token_ref": "fp8",
    "fp8_linear": "fp8", "fp8_linear_ref": "fp8", "fp8_weight_only": "fp8", "skinny_linear": "skinny",
    "paged_decode": "paged_decode", "paged_decode_ref": "paged_decode",
    "pbs_prefill": "pbs_prefill", "pbs_prefill_ref": "pbs_prefill",
    "PBSSelection": "selection", "PBSStats": "selection", "pbs_select": "selection",
    "apply_rope": "rope", "apply_rope_ref": "rope", "build_cos_sin_cache": "rope", "rope_inv_freq": "rope",
    "rope_and_cache": "rope", "rope_and_cache_ref": "rope",
}

__all__ = sorted(_MODULES)


class _Package(types.ModuleType):
    """Keeps an exported function (`pbs_prefill`) from being replaced by its same-named module, which the import
    system binds on the package when that module is first imported."""

    def __setattr__(self, name: str, value: object) -> None:
        if not (name in _MODULES and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULES))
