"""Split-K paged decode (Triton, CPU interpreter) against its PyTorch reference."""
from __future__ import annotations

import pytest
import torch

from pbs_engine.kernels.paged_decode import paged_decode_ref, paged_decode_triton


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("hq, hkv, d, page", [(7, 1, 64, 16), (8, 2, 128, 16), (4, 1, 64, 128)])
def test_random_block_tables_and_lengths_match_reference(hq, hkv, d, page):
    """Pages scattered through the cache; lengths from one token to a full table; pages larger than a tile."""
    num_blocks, width = 24, 6
    kc, vc = rand(num_blocks, page, hkv, d, seed=4), rand(num_blocks, page, hkv, d, seed=5)
    gen = torch.Generator().manual_seed(6)
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:width] for _ in range(4)]).int()
    lens = torch.tensor([1, page, 2 * page + 13, width * page], dtype=torch.int32)
    q = rand(4, hq, d, seed=7)
    out = paged_decode_triton(q, kc, vc, tables, lens, sm_scale=0.1)
    torch.testing.assert_close(out, paged_decode_ref(q, kc, vc, tables, lens, sm_scale=0.1), atol=1e-5, rtol=1e-5)
