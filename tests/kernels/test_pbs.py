"""PBS-Attn: the batched selection + sparse Triton kernel (CPU interpreter) against the loop-by-loop reference,
and the method's defining behaviours."""
from __future__ import annotations

import importlib

import pytest
import torch

from pbs_engine.kernels import PBSConfig, flash_prefill_ref, pbs_prefill, pbs_prefill_ref, pbs_select
from pbs_engine.kernels.selection import block_geometry
from pbs_engine.kernels.pbs_prefill import pbs_prefill_triton

SHAPES = [(7, 1, 64), (8, 2, 128)]  # (query heads, KV heads, head_dim): GQA 7:1 and 4:1
SMALL = dict(block_size=16, segment_size=32, query_reps=1, dense_last_blocks=1)  # one pooled query and one dense
# last block unless a test says (a few blocks per test: the default two would leave little to select)


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def dense(q, k, v):
    return flash_prefill_ref(q, k, v, torch.tensor([0, len(q)], dtype=torch.int32),
                             torch.tensor([0, len(k)], dtype=torch.int32))


CONFIGS = {
    "threshold": PBSConfig(threshold=0.6, **SMALL, permute=True),
    "budget-nopermute": PBSConfig(budget=0.3, permute=False, **SMALL),
    "no-dense-last": PBSConfig(threshold=0.5, **{**SMALL, "dense_last_blocks": 0}, permute=True),
    "lse": PBSConfig(threshold=0.6, block_score="lse", **SMALL),
    "lse-permute": PBSConfig(threshold=0.6, block_score="lse", **SMALL, permute=True),
    "budget-permute": PBSConfig(budget=0.3, **SMALL, permute=True),
    "query-reps": PBSConfig(threshold=0.6, **{**SMALL, "query_reps": 4}),
    "query-reps-mean": PBSConfig(threshold=0.6, block_score="mean", **{**SMALL, "query_reps": 2}, permute=True),
    "query-reps-budget": PBSConfig(budget=0.3, **{**SMALL, "query_reps": 4}),
    "reps-mean-combine": PBSConfig(threshold=0.6, rep_combine="mean", **{**SMALL, "query_reps": 4}),
    "last-query-pool": PBSConfig(threshold=0.6, query_pool="last", **{**SMALL, "query_reps": 2}),
    "local-blocks": PBSConfig(threshold=0.5, local_blocks=2, **{**SMALL, "dense_last_blocks": 0}),
}


@pytest.mark.parametrize("hq, hkv, d", SHAPES)
@pytest.mark.parametrize("n, n_kv", [(100, 100), (70, 133)])  # lengths off the block grid; a cached prefix
@pytest.mark.parametrize("name", list(CONFIGS))
def test_triton_matches_reference(hq, hkv, d, n, n_kv, name):
    q, k, v = rand(n, hq, d, seed=8), rand(n_kv, hkv, d, seed=9), rand(n_kv, hkv, d, seed=10)
    out, stats = pbs_prefill_triton(q, k, v, CONFIGS[name])
    ref, ref_stats = pbs_prefill_ref(q, k, v, CONFIGS[name])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert stats.kept.tolist() == ref_stats.kept.tolist() and stats.visible.tolist() == ref_stats.visible.tolist()
    assert 0 < stats.density < 1 and len(stats.density_per_head) == hq


@pytest.mark.parametrize("permute", [True, False])
@pytest.mark.parametrize("n, n_kv", [(100, 100), (70, 133)])
def test_threshold_one_equals_dense_causal_attention(n, n_kv, permute):
    q, k, v = rand(n, 8, 64, seed=11), rand(n_kv, 2, 64, seed=12), rand(n_kv, 2, 64, seed=13)
    cfg = PBSConfig(threshold=1.0, permute=permute, **SMALL)
    for out, stats in (pbs_prefill_triton(q, k, v, cfg), pbs_prefill_ref(q, k, v, cfg)):
        torch.testing.assert_close(out, dense(q, k, v), atol=1e-5, rtol=1e-5)
        assert stats.density == 1.0


def test_first_block_and_diagonal_segment_survive_any_budget():
    q, k, v = rand(128, 2, 64, seed=14), rand(128, 1, 64, seed=15), rand(128, 1, 64, seed=16)
    sel = pbs_select(q, k, v, PBSConfig(budget=0.01, **{**SMALL, "dense_last_blocks": 0}, permute=True), 0.125)
    for m in range(128 // 16):
        kept = set(sel.block_idx[0, m, : sel.block_count[0, m]].tolist())
        assert kept == {0} | set(range(m * 16 // 32 * 2, m * 16 // 32 * 2 + 2))


@pytest.mark.parametrize("local", [0, 1, 3])
def test_local_blocks_force_the_blocks_before_the_diagonal_segment(local):
    cfg = PBSConfig(block_size=16, segment_size=32, local_blocks=local, dense_last_blocks=0)
    geo = block_geometry(cfg, 200, 260)
    prefix = 60
    for m in range(geo.visible.shape[0]):
        seg_block = (prefix + m * 16) // 32 * 32 // 16  # first key block of the query block's diagonal segment
        want = {0} | set(range(max(0, seg_block - local), seg_block)) | set(geo.diag[m].nonzero().flatten().tolist())
        assert set(geo.forced[m].nonzero().flatten().tolist()) == want


def test_block_geometry_nests_diagonal_in_forced_in_visible():
    """Forced blocks: the first, the diagonal segment and (last query block) every visible one; all visible."""
    geo = block_geometry(PBSConfig(**SMALL, permute=True), 128, 128)
    assert bool((geo.diag <= geo.forced).all() and (geo.forced <= geo.visible).all())
    assert geo.forced[:, 0].all() and torch.equal(geo.forced[-1], geo.visible[-1])
    assert geo.diag.sum(-1).tolist() == [2] * geo.diag.shape[0]  # one whole segment of two blocks per query block


@pytest.mark.parametrize("last", [1, 3])
def test_dense_last_blocks_attend_to_every_key_block(last):
    """The last `dense_last_blocks` query blocks keep every visible key block (they predict the first output token);
    the others keep only the forced blocks under a zero budget, and the output equals the reference."""
    q, k, v = rand(100, 4, 64, seed=32), rand(133, 2, 64, seed=33), rand(133, 2, 64, seed=34)
    cfg = PBSConfig(budget=0.01, **{**SMALL, "dense_last_blocks": last})
    sel = pbs_select(q, k, v, cfg, 0.125)
    nqb, prefix = -(-100 // 16), 33
    for m in range(nqb):
        visible = (prefix + min(100, (m + 1) * 16) - 1) // 16 + 1
        kept = sel.block_idx[0, m, : sel.block_count[0, m]].tolist()
        assert (kept == list(range(visible))) == (m >= nqb - last), (m, kept)
    ref, ref_stats = pbs_prefill_ref(q, k, v, cfg)
    for out, stats in (pbs_prefill(q, k, v, cfg), pbs_prefill_triton(q, k, v, cfg)):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert stats.kept.tolist() == ref_stats.kept.tolist()


def test_permutation_lowers_density_on_scattered_heavy_keys():
    """Heavy keys scattered inside segments: sorting them together needs fewer blocks for the same mass."""
    n, d, hq = 1024, 64, 4
    gen = torch.Generator().manual_seed(20)
    direction = torch.randn(d, generator=gen)
    q = torch.randn(n, hq, d, generator=gen) * 0.1 + direction
    k = torch.randn(n, 1, d, generator=gen) * 0.1
    k[torch.arange(3, n, 16), 0] += direction * 0.6  # one heavy key every 16 tokens: in every block unless permuted
    v = torch.randn(n, 1, d, generator=gen)
    cfg = PBSConfig(block_size=16, segment_size=128, threshold=0.8, permute=True, query_reps=1)
    permuted = pbs_select(q, k, v, cfg, d ** -0.5)
    plain = pbs_select(q, k, v, PBSConfig(block_size=16, segment_size=128, threshold=0.8, permute=False), d ** -0.5)
    density = [(s.kept.sum() / s.visible.sum()).item() for s in (permuted, plain)]
    assert density[0] < density[1] * 0.85, density


def check_last_block_keeps(q, k, v, cfg, block, kept):
    """The last query block keeps key block `block` exactly when `kept`; the engine path equals the reference."""
    sel = pbs_select(q, k, v, cfg, q.shape[-1] ** -0.5)
    last = sel.block_count.shape[1] - 1
    blocks = set(sel.block_idx[0, last, : sel.block_count[0, last]].tolist())
    assert (block in blocks) == kept, (cfg, sorted(blocks))
    ref, _ = pbs_prefill_ref(q, k, v, cfg)
    out, _ = pbs_prefill(q, k, v, cfg)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_lse_score_keeps_the_block_of_a_single_heavy_key():
    """One key that the queries attend to strongly, among 15 ordinary keys of its block, against five blocks of
    mildly relevant keys: by mean-pooled keys the mild blocks win and the threshold is reached without the heavy
    key's block; the log-sum-exp score carries that key's attention mass (most of the total) and keeps it."""
    n, d = 512, 64
    gen = torch.Generator().manual_seed(30)
    direction = torch.nn.functional.normalize(torch.randn(d, generator=gen), dim=0)
    q = torch.randn(n, 2, d, generator=gen) * 0.01 + direction * 4
    k = torch.randn(n, 1, d, generator=gen) * 0.01
    k[32:112, 0] += direction * 4  # blocks 2-6: every key scores 2 (scaled)
    k[165, 0] += direction * 16  # block 10: one key scores 8
    v = torch.randn(n, 1, d, generator=gen)
    for score, kept in (("mean", False), ("lse", True)):
        cfg = PBSConfig(block_size=16, segment_size=32, threshold=0.5, block_score=score, query_reps=1,
                        dense_last_blocks=0)
        check_last_block_keeps(q, k, v, cfg, 10, kept)


def test_query_reps_keep_the_block_a_few_queries_look_for():
    """Two queries of the last block look for one far block; the other 14 mildly prefer five other blocks. The
    block's single mean query barely sees the far block and the threshold is reached without it; with four pooled
    queries the pair's group has its own choice, and the union keeps the far block."""
    n, d = 512, 64
    gen = torch.Generator().manual_seed(31)
    a, b = torch.linalg.qr(torch.randn(d, 2, generator=gen)).Q.T  # orthonormal directions
    q = torch.randn(n, 1, d, generator=gen) * 0.01 + a * 4
    q[-2:, 0] += (b - a) * 4  # the last two queries look along b
    k = torch.randn(n, 1, d, generator=gen) * 0.01
    k[32:112, 0] += a * 4  # blocks 2-6: mildly relevant to most queries
    k[165, 0] += b * 16  # block 10: one key, strongly relevant to the two
    v = torch.randn(n, 1, d, generator=gen)
    for reps, kept in ((1, False), (4, True)):
        cfg = PBSConfig(block_size=16, segment_size=32, threshold=0.5, query_reps=reps, dense_last_blocks=0)
        check_last_block_keeps(q, k, v, cfg, 10, kept)


@pytest.mark.parametrize("field, kwargs", [("segment_size", dict(block_size=128, segment_size=192)),
                                           ("threshold", dict(threshold=0)), ("block_size", dict(block_size=24)),
                                           ("budget", dict(budget=1.5)),
                                           ("block_score", dict(block_score="max")),
                                           ("query_reps", dict(query_reps=3)), ("query_reps", dict(query_reps=0)),
                                           ("dense_last_blocks", dict(dense_last_blocks=-1)),
                                           ("query_pool", dict(query_pool="max")),
                                           ("rep_combine", dict(rep_combine="any")),
                                           ("local_blocks", dict(local_blocks=-1))])
def test_bad_config_names_the_field(field, kwargs):
    with pytest.raises(ValueError, match=f"PBSConfig.{field}"):
        PBSConfig(**kwargs)


@pytest.mark.parametrize("hq, hkv, d", SHAPES)
@pytest.mark.parametrize("n, n_kv", [(100, 100), (70, 133), (200, 260)])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_cpu_engine_path_matches_specification(hq, hkv, d, n, n_kv, name):
    """pbs_prefill on CPU (batched selection, then blocked attention: the diagonal segment causal, the other kept
    blocks gathered per head, merged by log-sum-exp) equals the loop-by-loop reference."""
    q, k, v = rand(n, hq, d, seed=21), rand(n_kv, hkv, d, seed=22), rand(n_kv, hkv, d, seed=23)
    out, stats = pbs_prefill(q, k, v, CONFIGS[name])
    ref, ref_stats = pbs_prefill_ref(q, k, v, CONFIGS[name])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert stats.kept.tolist() == ref_stats.kept.tolist()


def test_cpu_attention_split_into_small_gathers_matches_specification(monkeypatch):
    """With room for one key block per gather, every (query head, query block) pair attends in its own call."""
    pp = importlib.import_module("pbs_engine.kernels.pbs_prefill")
    monkeypatch.setattr(pp, "GATHER_ELEMENTS", 1)
    q, k, v = rand(70, 8, 64, seed=24), rand(133, 2, 64, seed=25), rand(133, 2, 64, seed=26)
    for name in ("threshold", "budget-nopermute"):
        torch.testing.assert_close(pbs_prefill(q, k, v, CONFIGS[name])[0], pbs_prefill_ref(q, k, v, CONFIGS[name])[0],
                                   atol=1e-5, rtol=1e-5)


def test_sdpa_lse_returns_attention_and_its_log_sum_exp():
    from pbs_engine.kernels.pbs_prefill import sdpa_lse

    q, k, v = rand(2, 4, 16, 32, seed=27), rand(2, 2, 24, 32, seed=28), rand(2, 2, 24, 32, seed=29)
    mask = torch.zeros(2, 1, 16, 24).masked_fill_(torch.rand(2, 1, 16, 24, generator=torch.Generator().manual_seed(0))
                                                 < 0.3, float("-inf"))
    out, lse = sdpa_lse(q, k, v, 0.2, mask)
    scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.2 + mask
    torch.testing.assert_close(out, scores.softmax(-1) @ v.repeat_interleave(2, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, scores.logsumexp(-1), atol=1e-5, rtol=1e-5)


# the interpreter runs one program per (head, query block): a few configs also with a cached prefix
@pytest.mark.parametrize("name, n, n_kv", [(name, 200, 260) for name in (*CONFIGS, "all")]
                         + [(name, 70, 133) for name in ("threshold", "lse", "lse-permute", "budget-permute",
                                                         "query-reps", "reps-mean-combine", "last-query-pool")])
def test_fused_choice_kernel_matches_torch(monkeypatch, name, n, n_kv):
    """The fused softmax/sort/cut/compaction kernel (interpreter) picks exactly the blocks the torch path does."""
    ps = importlib.import_module("pbs_engine.kernels.selection")
    cfg = PBSConfig(threshold=1.0, **SMALL, permute=True) if name == "all" else CONFIGS[name]
    q, k, v = rand(n, 8, 64, seed=22), rand(n_kv, 2, 64, seed=23), rand(n_kv, 2, 64, seed=24)
    ref = pbs_select(q, k, v, cfg, 0.125)
    monkeypatch.setattr(ps, "use_triton", lambda _: True)
    got = pbs_select(q, k, v, cfg, 0.125)
    assert got.block_count.tolist() == ref.block_count.tolist()
    assert got.block_idx.shape[:2] == ref.block_idx.shape[:2] and got.block_idx.shape[2] >= ref.block_idx.shape[2]
    listed = torch.arange(ref.block_idx.shape[2]) < ref.block_count[..., None]
    assert torch.equal(got.block_idx[..., : ref.block_idx.shape[2]][listed], ref.block_idx[listed])


@pytest.mark.parametrize("name, prefetch", [("threshold", True), ("budget-nopermute", False)])
def test_tma_sparse_kernel_matches_pointer_kernel(name, prefetch):
    """The Hopper path (K/V tiles through TMA descriptors, run here by the interpreter) equals the pointer path."""
    from pbs_engine.kernels.pbs_prefill import pbs_attention_triton

    q, k, v = rand(70, 8, 64, seed=25), rand(133, 2, 64, seed=26), rand(133, 2, 64, seed=27)
    sel = pbs_select(q, k, v, CONFIGS[name], 0.125)
    ref, _ = pbs_prefill_ref(q, k, v, CONFIGS[name], 0.125)
    out = pbs_attention_triton(q, sel, CONFIGS[name], 0.125, tma=True, prefetch=prefetch)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["threshold", "lse", "query-reps"])
def test_kept_mass_is_the_attention_share_of_the_kept_blocks(name):
    """The eval's attention recall against a loop over heads and queries; every block kept gives 1."""
    from pbs_engine.eval.fidelity import kept_mass

    cfg = CONFIGS[name]
    q, k, v = rand(70, 8, 64, seed=31), rand(133, 2, 64, seed=32), rand(133, 2, 64, seed=33)
    sel = pbs_select(q, k, v, cfg, 0.125)
    got = kept_mass(q, k, sel, cfg, 0.125, chunk_blocks=2)
    bs, prefix = cfg.block_size, 133 - 70
    for h in range(8):
        g = h // 4
        for i in range(0, 70, 7):
            m = i // bs
            blocks = sel.block_idx[h, m, :sel.block_count[h, m]].tolist()
            kept = {int(p) for j in blocks for p in sel.key_pos[g, j * bs:(j + 1) * bs] if p < 133}
            p = (q[i, h] @ k[:prefix + i + 1, g].T * 0.125).softmax(-1)
            want = sum(p[t] for t in kept if t <= prefix + i)
            assert abs(got[h, i].item() - float(want)) < 1e-4
    full = PBSConfig(threshold=1.0, **SMALL, permute=True)
    assert torch.allclose(kept_mass(q, k, pbs_select(q, k, v, full, 0.125), full, 0.125), torch.ones(8, 70))
