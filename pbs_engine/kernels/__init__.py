"""Attention and layer kernels. Each public function runs its Triton kernel on CUDA tensors and its PyTorch
reference (`*_ref`, same signature, the specification) otherwise, except prefill attention, whose CPU path is
torch's SDPA (dense) or a blocked torch computation (PBS), tested against the references; `*_triton` in each module
forces the kernel (the tests run those on CPU under TRITON_INTERPRET=1). docs/kernels.md lists them."""
from pbs_engine.kernels.config import PBSConfig
from pbs_engine.kernels.flash_prefill import flash_prefill, flash_prefill_ref
from pbs_engine.kernels.fused import rms_norm, rms_norm_ref, silu_and_mul, silu_and_mul_ref
from pbs_engine.kernels.paged_decode import paged_decode, paged_decode_ref
from pbs_engine.kernels.pbs_prefill import pbs_prefill, pbs_prefill_ref
from pbs_engine.kernels.pbs_select import PBSSelection, PBSStats, pbs_select
from pbs_engine.kernels.rope import apply_rope, apply_rope_ref, build_cos_sin_cache, rope_inv_freq

__all__ = ["PBSConfig", "PBSSelection", "PBSStats", "apply_rope", "apply_rope_ref", "build_cos_sin_cache",
           "flash_prefill", "flash_prefill_ref", "paged_decode", "paged_decode_ref", "pbs_prefill",
           "pbs_prefill_ref", "pbs_select", "rms_norm", "rms_norm_ref", "rope_inv_freq", "silu_and_mul",
           "silu_and_mul_ref"]
