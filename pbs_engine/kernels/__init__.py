"""Attention and layer kernels. Each public attention function runs Triton on CUDA tensors and its PyTorch
reference (`*_ref`, same signature) otherwise."""
from pbs_engine.kernels.config import PBSConfig
from pbs_engine.kernels.flash_prefill import flash_prefill, flash_prefill_ref
from pbs_engine.kernels.fused import apply_rope, build_cos_sin_cache, rms_norm, rope_inv_freq, silu_and_mul
from pbs_engine.kernels.paged_decode import paged_decode, paged_decode_ref
from pbs_engine.kernels.pbs_prefill import pbs_prefill, pbs_prefill_ref
from pbs_engine.kernels.pbs_select import PBSStats, pbs_select

__all__ = ["PBSConfig", "PBSStats", "flash_prefill", "flash_prefill_ref", "paged_decode", "paged_decode_ref",
           "pbs_prefill", "pbs_prefill_ref", "pbs_select", "rms_norm", "silu_and_mul", "apply_rope",
           "rope_inv_freq", "build_cos_sin_cache"]
