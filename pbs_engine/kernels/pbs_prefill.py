"""PBS-Attn prefill: select blocks (selection.py), then FlashAttention over only the kept key blocks of the
permuted K/V, the causal mask applied through the keys' original positions inside the diagonal segment.

Layouts: q (N, Hq, D); k, v (N_kv, Hkv, D), N_kv >= N, the first N_kv - N keys a fully visible cached prefix
(query i sits at position N_kv - N + i).
"""
from __future__ import annotations

import bisect
import math

import torch
from pbs_engine.kernels.triton_compat import tl, triton

from pbs_engine.kernels.config import PBSConfig
from pbs_engine.kernels.dispatch import use_triton
from pbs_engine.kernels.flash_prefill import online_step
from pbs_engine.kernels.selection import PBSSelection, PBSStats, block_geometry, pbs_select


def pbs_prefill_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: PBSConfig,
                    sm_scale: float | None = None) -> tuple[torch.Tensor, PBSStats]:
    """The specification, one KV head and one query block at a time, in float32: permute each segment's keys by
    the last query block's attention, pick blocks by pooled scores (`block_score`; softmaxed outside the diagonal
    segment), attend densely under the block mask."""
    cfg, (n, hq, d), (n_kv, hkv, _) = config, q.shape, k.shape
    scale = sm_scale if sm_scale is not None else d ** -0.5
    bs, seg, group = cfg.block_size, cfg.segment_size, hq // hkv
    q_pos = torch.arange(n) + n_kv - n
    causal = torch.arange(n_kv)[None, :] <= q_pos[:, None]  # (N, N_kv) in original positions
    nqb, nkb = -(-n // bs), -(-n_kv // bs)
    geo = block_geometry(cfg, n, n_kv)
    out, kept, visible_pairs = torch.empty_like(q), torch.zeros(hq, dtype=torch.long), 0
    for g in range(hkv):
        qg, kg, vg = q[:, g * group:(g + 1) * group].float().cpu(), k[:, g].float().cpu(), v[:, g].float().cpu()
        # PBS: 1. Permutation (one per KV head, by its query heads' mean attention from the last query block)
        order = torch.arange(n_kv)
        if cfg.permute:
            last = slice(max(0, n - bs), n)
            probs = (torch.einsum("lhd,kd->hlk", qg[last], kg) * scale).masked_fill(~causal[last], float("-inf"))
            importance = probs.softmax(-1).mean((0, 1))
            for s0 in range(0, n_kv, seg):
                order[s0:s0 + seg] = s0 + importance[s0:s0 + seg].argsort(descending=True, stable=True)
        kp = kg[order]  # the permuted keys; values need no permuting (attention below is by original position)
        k_means = torch.stack([kp[j * bs:(j + 1) * bs].mean(0) for j in range(nkb)])
        allowed = torch.zeros(group, n, n_kv, dtype=torch.bool)
        for m in range(nqb):
            rows = slice(m * bs, min(n, (m + 1) * bs))
            vis = geo.visible[m].nonzero().flatten().tolist()
            forced = geo.forced[m].nonzero().flatten().tolist()
            # the diagonal segment takes no part in the softmax; with "lse" nor do the other forced blocks: the
            # sink's mass would use up the threshold
            soft = [j for j in vis if not (geo.forced if cfg.block_score == "lse" else geo.diag)[m, j]]
            # PBS: 2. Block scoring
            sub = bs // cfg.query_reps  # pooled queries: the means of the block's groups of `sub` queries
            pooled = [range(r0, min(rows.stop, r0 + sub)) for r0 in range(rows.start, rows.stop, sub)]
            pooled += pooled[-1:] * (cfg.query_reps - len(pooled))  # a short last block repeats its last group
            for hg in range(group):
                per_pool = []  # per pooled query: block -> probability
                for pool in pooled:
                    mass = dict.fromkeys(vis, 0.0)
                    if soft:
                        qmean = qg[pool.stop - 1, hg] if cfg.query_pool == "last" else qg[pool.start:pool.stop,
                                                                                               hg].mean(0)
                        if cfg.block_score == "lse":  # the mean query's attention mass per block
                            blocks = [(qmean @ kp[j * bs:(j + 1) * bs].T * scale).logsumexp(0) for j in soft]
                            p = torch.stack(blocks).softmax(-1)
                        else:
                            p = (qmean @ k_means[soft].T * scale).softmax(-1)
                        mass.update(zip(soft, p.tolist()))
                    per_pool.append(mass)
                # PBS: 3. Selection
                if cfg.budget is not None or cfg.threshold >= 1.0:  # one choice by each block's largest probability
                    per_pool = [{j: max(mass[j] for mass in per_pool) for j in vis}]
                elif cfg.rep_combine == "mean":  # one choice by the mean probability over the pooled queries
                    per_pool = [{j: sum(mass[j] for mass in per_pool) / len(per_pool) for j in vis}]
                chosen: set[int] = set()  # the union of the pooled queries' choices
                for mass in per_pool:
                    cands = sorted((j for j in vis if j not in forced), key=lambda j: -mass[j])
                    if cfg.budget is not None:
                        n_sel = math.ceil(cfg.budget * len(vis) - 1e-6) - len(forced)
                    elif cfg.threshold >= 1.0:
                        n_sel = len(cands)
                    else:
                        total, n_sel = sum(mass[j] for j in forced), 0
                        while n_sel < len(cands) and total < cfg.threshold:
                            total, n_sel = total + mass[cands[n_sel]], n_sel + 1
                    chosen.update(cands[:max(n_sel, 0)])
                for j in forced + sorted(chosen):
                    allowed[hg, rows, order[j * bs:(j + 1) * bs]] = True
                kept[g * group + hg] += len(forced) + len(chosen)
            visible_pairs += len(vis) if g == 0 else 0
        # PBS: 4. Sparse attention (dense attention under the block mask)
        for hg in range(group):
            scores = (qg[:, hg] @ kg.T * scale).masked_fill(~(allowed[hg] & causal), float("-inf"))
            out[:, g * group + hg] = (scores.softmax(-1) @ vg).to(q.dtype)
    return out, PBSStats(kept=kept, visible=torch.full((hq,), visible_pairs))


@triton.jit
def _block_tile(K, V, g, npad, row0, offs_n, offs_d, s_kh, s_kt, s_vh, s_vt, TMA: tl.constexpr):
    """BLOCK_N rows of the permuted K/V of KV head g from row row0: TMA descriptors over (Hkv x npad, D), or
    pointers into (Hkv, npad, D)."""
    if TMA:
        k = K.load([(g * npad + row0).to(tl.int32), 0])
        v = V.load([(g * npad + row0).to(tl.int32), 0])
    else:
        k = tl.load(K + g * s_kh + (row0 + offs_n)[:, None] * s_kt + offs_d[None, :])
        v = tl.load(V + g * s_vh + (row0 + offs_n)[:, None] * s_vt + offs_d[None, :])
    return k, v


@triton.jit
def _tile_row(listed, cur, t, count, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, PREFETCH: tl.constexpr):
    """First permuted-K/V row of tile t (BLOCK_N rows of the listed block t // (BLOCK // BLOCK_N)), and the block
    carried to the next tile: with PREFETCH, `cur` is tile t's block, read one tile earlier, and the next tile's is
    read now, so the tile's K/V load never waits on an index load of the same iteration."""
    SUB: tl.constexpr = BLOCK // BLOCK_N
    if PREFETCH:
        blk = cur
        cur = tl.load(listed + tl.minimum((t + 1) // SUB, count - 1)).to(tl.int64)
    else:
        blk = tl.load(listed + t // SUB).to(tl.int64)
    return blk * BLOCK + (t % SUB) * BLOCK_N, cur


@triton.jit
def _pbs_attention_kernel(Q, K, V, POS, IDX, CNT, DIAG, O, sm_scale, n_q, q_offset, npad,
                          s_qt, s_qh, s_kh, s_kt, s_vh, s_vt, s_ph, s_ih, s_im, s_ch, s_ot, s_oh,
                          GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
                          TMA: tl.constexpr, PREFETCH: tl.constexpr):
    # PBS: 4. Sparse attention. Program (query head h, query block m counted from the end so the longest lists start first): online softmax
    # over the CNT[h, m] key blocks listed in IDX[h, m] (ascending), each walked in BLOCK_N-row tiles of the
    # permuted K/V (Hkv, Npad, D) of KV head h // GROUP. Blocks before the diagonal segment are wholly visible; the
    # last DIAG[m] listed blocks are masked by original position: key j visible to query i iff POS[j] <= q_pos(i).
    # TMA: K and V are 2-D descriptors over (Hkv x npad, D) and tiles come through the tensor-memory accelerator.
    h = tl.program_id(0)
    m = tl.num_programs(1) - 1 - tl.program_id(1)
    g = h // GROUP
    offs_m = m * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + offs_m[:, None] * s_qt + h * s_qh + offs_d[None, :], mask=(offs_m < n_q)[:, None], other=0.0)
    q_pos = offs_m + q_offset
    acc = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    count = tl.load(CNT + h * s_ch + m)
    n_full = count - tl.load(DIAG + m)
    SUB: tl.constexpr = BLOCK // BLOCK_N
    listed = IDX + h * s_ih + m * s_im
    cur = tl.load(listed).to(tl.int64)  # the first tile's block (see _tile_row)
    for t in range(0, n_full * SUB):
        row0, cur = _tile_row(listed, cur, t, count, BLOCK, BLOCK_N, PREFETCH)
        k, v = _block_tile(K, V, g, npad, row0, offs_n, offs_d, s_kh, s_kt, s_vh, s_vt, TMA)
        acc, m_i, l_i = online_step(acc, m_i, l_i, q, k, v, offs_n, q_pos, 0, qk_scale, MASKED=False, CAUSAL=True)
    for t in range(n_full * SUB, count * SUB):
        row0, cur = _tile_row(listed, cur, t, count, BLOCK, BLOCK_N, PREFETCH)
        k, v = _block_tile(K, V, g, npad, row0, offs_n, offs_d, s_kh, s_kt, s_vh, s_vt, TMA)
        pos = tl.load(POS + g * s_ph + row0 + offs_n)  # padding slots sit past every query: hidden as future keys
        acc, m_i, l_i = online_step(acc, m_i, l_i, q, k, v, pos, q_pos, 2147483647, qk_scale, MASKED=True,
                                    CAUSAL=True)
    acc = acc / tl.where(l_i == 0, 1.0, l_i)[:, None]
    tl.store(O + offs_m[:, None] * s_ot + h * s_oh + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=(offs_m < n_q)[:, None])


def sparse_tiles(block_size: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N rows per key tile, num_warps, num_stages) of the sparse kernel; query tiles are whole blocks."""
    if device.type != "cuda":
        return block_size, 4, 1
    # H100, 128K tokens, 10% / 20% of the blocks: 128/8/3 28.7 / 59.1 ms, 128/8/2 31.0 / 67.4, 64/8/3 34.6 / 75.6
    return min(block_size, 128), 8 if block_size >= 128 else 4, 3


def pbs_attention_triton(q: torch.Tensor, sel: PBSSelection, cfg: PBSConfig, scale: float,
                         tma: bool | None = None, prefetch: bool = True,
                         tiles: tuple[int, int, int] | None = None) -> torch.Tensor:
    """FlashAttention of q over the selected blocks of the permuted K/V in `sel`. tma: fetch K/V tiles through
    TMA descriptors (None: on Hopper and newer); prefetch: read each tile's block index one tile ahead; tiles:
    (BLOCK_N, num_warps, num_stages), None: `sparse_tiles`' choice."""
    n, hq, d = q.shape
    out = torch.empty_like(q)
    keys, values = sel.keys, sel.values
    if tiles is not None:
        block_n, warps, stages = tiles
    else:
        block_n, warps, stages = sparse_tiles(cfg.block_size, q.device)
        if q.element_size() > 2:  # float32 tiles: halve them to fit shared memory
            block_n, stages = min(block_n, 64), 1
    if tma is None:
        tma = q.is_cuda and torch.cuda.get_device_capability(q.device)[0] >= 9
    hkv, npad = keys.shape[0], keys.shape[1]
    k_arg, v_arg = keys, values
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        k_arg, v_arg = (TensorDescriptor(x, [hkv * npad, d], [d, 1], [block_n, d])
                        for x in (keys.contiguous(), values.contiguous()))
    _pbs_attention_kernel[(hq, sel.block_count.shape[1])](
        q, k_arg, v_arg, sel.key_pos, sel.block_idx, sel.block_count, sel.diag_count, out, scale, n, sel.q_offset,
        npad,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        sel.key_pos.stride(0), sel.block_idx.stride(0), sel.block_idx.stride(1), sel.block_count.stride(0),
        out.stride(0), out.stride(1),
        GROUP=hq // keys.shape[0], HEAD_DIM=d, BLOCK=cfg.block_size, BLOCK_N=block_n, TMA=tma,
        PREFETCH=prefetch, num_warps=warps, num_stages=stages)
    return out


def pbs_prefill_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: PBSConfig,
                       sm_scale: float | None = None) -> tuple[torch.Tensor, PBSStats]:
    scale = sm_scale if sm_scale is not None else q.shape[-1] ** -0.5
    sel = pbs_select(q, k, v, config, scale)  # PBS: 1. Permutation, 2. Block scoring, 3. Selection
    return pbs_attention_triton(q, sel, config, scale), PBSStats(kept=sel.kept, visible=sel.visible)


SELECTION_RANGE, ATTENTION_RANGE = "pbs.selection", "pbs.attention"  # torch.profiler ranges of pbs_prefill
GATHER_ELEMENTS = 1 << 24  # CPU path: the most K (and V) elements gathered for one attention call


def sdpa_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Hq, r, D), k/v (B, Hkv, L, D) -> (output (B, Hq, r, D), log-sum-exp of each row's scaled scores
    (B, Hq, r)): the CPU flash-attention kernel behind F.scaled_dot_product_attention, called directly for the
    log-sum-exp that lets two attentions over disjoint keys be merged. GQA by Hq % Hkv; mask additive, broadcast."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask,
                                                                       scale=scale)


def _diagonal_attention(qb: torch.Tensor, sel: PBSSelection, bs: int, scale: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """qb (nqb, Hq, bs, D) -> (output, lse) of every query block over its diagonal-segment key blocks, the last
    diag_count entries of every list (the same blocks for all heads), causal by original position."""
    nqb, hq, _, d = qb.shape
    hk, npad, _ = sel.keys.shape
    nkb, dev = npad // bs, qb.device
    diag = sel.diag_count.long()[:, None]
    j = torch.arange(int(diag.max()), device=dev)
    slot = (sel.block_count[0].long()[:, None] - diag + j).clamp_(0, sel.block_idx.shape[2] - 1)
    blocks = sel.block_idx[0].long().gather(1, slot)[:, None] + torch.arange(hk, device=dev)[:, None] * nkb
    keys, values = (x.view(hk * nkb, bs * d).index_select(0, blocks.flatten()).view(nqb, hk, -1, d)
                    for x in (sel.keys, sel.values))
    key_pos = sel.key_pos.view(hk * nkb, bs).index_select(0, blocks.flatten()).view(nqb, hk, 1, -1)
    q_pos = (torch.arange(nqb * bs, device=dev) + sel.q_offset).view(nqb, 1, bs, 1)
    listed = (j < diag).repeat_interleave(bs, 1)[:, None, None]  # slots past a block's diag_count: padding
    mask = torch.where((key_pos <= q_pos) & listed, 0.0, float("-inf"))
    # (query block, KV head) as the batch and the head's query group as its heads, so the mask, one per KV head
    # (its permutation), broadcasts over the group instead of being repeated for every query head
    group = hq // hk
    out, lse = sdpa_lse(qb.reshape(nqb * hk, group, bs, d), keys.view(nqb * hk, 1, -1, d),
                        values.view(nqb * hk, 1, -1, d), scale, mask.view(nqb * hk, 1, bs, -1))
    return out.reshape(nqb, hq, bs, d), lse.reshape(nqb, hq, bs)


def pbs_attention_torch(q: torch.Tensor, sel: PBSSelection, cfg: PBSConfig, scale: float) -> torch.Tensor:
    """The kernel's job in torch (the engine's CPU path) without an N x N mask: (1) every query block against its
    diagonal-segment blocks, causal, in one call; (2) each (query head, query block) against its other kept
    blocks, gathered, the pairs with equally many in one unmasked call; (3) the two softmaxes merged by their
    log-sum-exps."""
    n, hq, d = q.shape
    hk, npad, _ = sel.keys.shape
    bs = cfg.block_size
    nkb, nqb, dev = npad // bs, sel.block_count.shape[1], q.device
    if n < nqb * bs:  # whole query blocks: the rows past n are dropped at the end
        q = torch.cat([q, q.new_zeros(nqb * bs - n, hq, d)])
    qb = q.view(nqb, bs, hq, d).transpose(1, 2)
    out, lse = (x.transpose(0, 1).reshape(hq * nqb, bs, -1) for x in _diagonal_attention(qb, sel, bs, scale))
    q_pairs = qb.transpose(0, 1).reshape(hq * nqb, 1, bs, d)  # pair p = (query head p // nqb, block p % nqb)
    others = (sel.block_count - sel.diag_count).flatten()
    lists = sel.block_idx.flatten(0, 1).long()
    first = (torch.arange(hq, device=dev) // (hq // hk) * nkb).repeat_interleave(nqb)[:, None]
    keys, values = sel.keys.view(hk * nkb, bs * d), sel.values.view(hk * nkb, bs * d)
    order = others.argsort(stable=True)
    sizes = others[order].tolist()
    a = sizes.count(0)
    while a < len(sizes):
        w = sizes[a]
        b = min(bisect.bisect_right(sizes, w), a + max(1, GATHER_ELEMENTS // (w * bs * d)))
        p = order[a:b]
        blocks = (lists[p, :w] + first[p]).flatten()
        o, l = sdpa_lse(q_pairs[p], keys.index_select(0, blocks).view(b - a, 1, w * bs, d),
                        values.index_select(0, blocks).view(b - a, 1, w * bs, d), scale)
        share = torch.sigmoid(l[:, 0, :, None] - lse[p])  # of the pair's softmax mass, in its listed blocks
        out[p] = torch.lerp(out[p], o[:, 0], share)
        a = b
    return out.view(hq, nqb * bs, d).transpose(0, 1)[:n]


def pbs_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: PBSConfig,
                sm_scale: float | None = None) -> tuple[torch.Tensor, PBSStats]:
    """Approximate causal attention of q over k/v keeping only the selected blocks; returns (output, stats).
    Triton on CUDA; elsewhere the same batched selection with the attention in torch (`pbs_prefill_ref`, the
    loop-by-loop specification, is for tests: it is far too slow to serve from)."""
    scale = sm_scale if sm_scale is not None else q.shape[-1] ** -0.5
    # the profiler ranges let `pbs-engine bench prefill` report the selection's share of the GPU time
    with torch.profiler.record_function(SELECTION_RANGE):
        sel = pbs_select(q, k, v, config, scale)  # PBS: 1. Permutation, 2. Block scoring, 3. Selection
    with torch.profiler.record_function(ATTENTION_RANGE):
        out = pbs_attention(q, sel, config, scale)  # PBS: 4. Sparse attention
    return out, PBSStats(kept=sel.kept, visible=sel.visible)


def pbs_attention(q: torch.Tensor, sel: PBSSelection, config: PBSConfig, scale: float) -> torch.Tensor:
    """Attention of q over the blocks `sel` kept: Triton on CUDA, the blocked torch path elsewhere."""
    return (pbs_attention_triton if use_triton(q) else pbs_attention_torch)(q, sel, config, scale)
