"""The fused key-importance kernel (CPU interpreter) against its torch reference."""
from __future__ import annotations

import pytest
import torch

from pbs_engine.kernels.importance import key_importance_ref, key_importance_triton


@pytest.mark.parametrize("hq, hkv, d", [(7, 1, 64), (8, 2, 128)])
@pytest.mark.parametrize("n, n_kv, block", [(50, 50, 16), (40, 133, 32), (10, 70, 16)])
def test_triton_matches_reference(hq, hkv, d, n, n_kv, block):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(n, hq, d, generator=gen)
    k = torch.randn(n_kv, hkv, d, generator=gen)
    got = key_importance_triton(q, k, block, d ** -0.5)
    ref = key_importance_ref(q, k, block, d ** -0.5)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(got.sum(1), torch.ones(hkv), atol=1e-5, rtol=0)  # each row's probabilities sum to 1


def test_strided_queries():
    """q sliced out of a fused qkv buffer (non-contiguous rows) gives the same importance."""
    gen = torch.Generator().manual_seed(4)
    qkv = torch.randn(60, 12 * 32, generator=gen)
    q = qkv[:, : 8 * 32].view(60, 8, 32)
    k = qkv[:, 8 * 32: 10 * 32].view(60, 2, 32)
    torch.testing.assert_close(key_importance_triton(q, k, 16, 0.2), key_importance_ref(q, k, 16, 0.2),
                               atol=1e-6, rtol=1e-4)
