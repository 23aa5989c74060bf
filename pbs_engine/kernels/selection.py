"""PBS-Attn block selection, batched over heads and blocks on the device (no per-segment Python loop).

1. Permutation: the importance of each key is its attention mass from the last query block (softmax, mean over
   those queries and over the query heads of its KV group, so one permutation serves one KV head); inside each
   segment keys are sorted by importance, so the keys that matter cluster into few blocks.
2. Block scoring: mean-pooled query blocks against mean-pooled (permuted) key blocks (`block_score="mean"`), or
   the log-sum-exp over each key block's keys of the mean-pooled query's scores (`"lse"`: the share of that
   query's attention in the block, which a single heavy key can carry).
3. Selection: the scores are softmaxed over the visible blocks outside the diagonal segment, as the paper does
   (with "lse" over the blocks not kept anyway, so the attention sink in the first block does not use up the
   threshold). Per query block keep the forced blocks (`block_geometry`: the first key block, every block of its
   diagonal segment(s); the last `dense_last_blocks` query blocks: every visible block), then the fewest other
   blocks whose mass, added to the forced blocks' mass, reaches the threshold (or a fixed fraction of the visible
   blocks in budget mode). With `query_reps` > 1 each query block is pooled into that many means, each chooses as
   above, and the block keeps the union of their choices (budget mode: one choice by each block's largest
   probability over them). The kept blocks become a compact list per (query head, query block), ascending, padded
   to the longest list; the diagonal-segment blocks, which need the causal mask, are the last `diag_count` entries.

Steps 1-3 have Triton kernels on CUDA (importance.py; below, `_block_lse_kernel` for the "lse" scores and
`_choose_kernel`, which fuses the softmax, the sort, the threshold or budget cut and the compaction, one program per
(query head, query block)); the torch code is the CPU path and the kernels' reference. Step 4, the sparse
attention, is pbs_prefill.py.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from pbs_engine.kernels.triton_compat import tl, triton

from pbs_engine.kernels.config import PBSConfig
from pbs_engine.kernels.dispatch import use_triton
from pbs_engine.kernels.importance import key_importance


@dataclass
class PBSSelection:
    keys: torch.Tensor  # (Hkv, Npad, D) permuted keys, Npad = key blocks x block_size
    values: torch.Tensor  # (Hkv, Npad, D) permuted values
    key_pos: torch.Tensor  # (Hkv, Npad) int32 original position of each permuted key (>= N_kv: padding)
    q_offset: int  # position of query 0 (= N_kv - N); padding keys lie past every query, so causality hides them
    block_idx: torch.Tensor  # (Hq, num_q_blocks, width >= longest list) int32 kept key blocks, ascending
    block_count: torch.Tensor  # (Hq, num_q_blocks) int32 how many entries of block_idx are real
    diag_count: torch.Tensor  # (num_q_blocks,) int32 how many of them (the last ones) lie in the diagonal segment
    kept: torch.Tensor  # (Hq,) kept (query block, key block) pairs per head
    visible: torch.Tensor  # (Hq,) causally visible pairs per head


@dataclass
class BlockGeometry:
    """Which key blocks each query block sees, (num_q_blocks, num_k_blocks) bool each, nested diag <= forced <=
    visible; the same for every head."""
    visible: torch.Tensor  # the block's earliest possible key (its segment's start if permuted) precedes the
    # query block's last query
    diag: torch.Tensor  # visible blocks of the diagonal segment(s): from the segment of the block's first query on
    forced: torch.Tensor  # kept whatever the scores: the first block, the diagonal segment, and every visible block
    # of the last `dense_last_blocks` query blocks
    memo: dict = field(default_factory=dict, repr=False, compare=False)  # what the kernels derive from it, once

    def derived(self, name: str, make):
        """`make()` computed once per geometry: the selection kernels' int8 kinds, budget counts, first query
        blocks; every layer of a step shares one geometry, so these are built once per step, not per layer."""
        if name not in self.memo:
            self.memo[name] = make()
        return self.memo[name]


@functools.lru_cache(maxsize=4)
def block_geometry(cfg: PBSConfig, n: int, n_kv: int, device: torch.device | str = "cpu") -> BlockGeometry:
    """The block geometry of n queries at the end of n_kv keys (the first n_kv - n a cached prefix). Cached: each
    layer of a prefill step asks for the same one (treat it as read-only)."""
    bs, seg, prefix = cfg.block_size, cfg.segment_size, n_kv - n
    nqb, nkb = -(-n // bs), -(-n_kv // bs)
    m = torch.arange(nqb, device=device)
    q_first = prefix + m * bs
    q_last = prefix + torch.clamp((m + 1) * bs, max=n) - 1
    j = torch.arange(nkb, device=device)
    block_seg = j * bs // seg * seg
    earliest = block_seg if cfg.permute else j * bs
    visible = earliest[None, :] <= q_last[:, None]
    seg_start = (q_first // seg * seg)[:, None]
    diag = visible & (block_seg[None, :] >= seg_start)
    local = (j * bs)[None, :] >= seg_start - cfg.local_blocks * bs  # the local_blocks blocks before the segment
    forced = diag | (visible & (local | (j == 0)[None, :] | (m >= nqb - cfg.dense_last_blocks)[:, None]))
    return BlockGeometry(visible=visible, diag=diag, forced=forced)


def dense_stats(cfg: PBSConfig, n: int, n_kv: int, num_heads: int, device: torch.device) -> "PBSStats":
    """The stats of a prefill call that ran dense: every causally visible block pair kept."""
    visible = int(block_geometry(cfg, n, n_kv).visible.sum())  # on the host: no device sync
    pairs = torch.full((num_heads,), visible, dtype=torch.long, device=device)
    return PBSStats(kept=pairs, visible=pairs)


@dataclass
class PBSStats:
    kept: torch.Tensor  # (Hq,) kept (query block, key block) pairs
    visible: torch.Tensor  # (Hq,) pairs a causal kernel would visit

    @property
    def density(self) -> float:
        """Kept block pairs over causally visible block pairs, all heads."""
        return (self.kept.sum() / self.visible.sum()).item()

    @property
    def density_per_head(self) -> list[float]:
        return (self.kept / self.visible).tolist()


def _block_means(x: torch.Tensor, n: int, block: int) -> torch.Tensor:
    """x (H, >= n, D), any strides -> (H, ceil(n / block), D) float32 means of rows [0, n) in blocks of `block`
    (the last block may be partial), summed in float32 without a float32 copy of x."""
    h, _, d = x.shape
    full = n // block
    means = x[:, :full * block].reshape(h, full, block, d).sum(2, dtype=torch.float32) / block
    if n % block:
        tail = x[:, full * block:n].sum(1, dtype=torch.float32) / (n % block)
        means = torch.cat([means, tail[:, None]], 1)
    return means


def _rep_means(q: torch.Tensor, n: int, cfg: PBSConfig) -> torch.Tensor:
    """q (N, Hq, D) -> (Hq, nqb, reps, D) float32 pooled queries of each query block's `query_reps` consecutive
    groups of block_size / query_reps queries: their means, or (query_pool "last") each group's last query; a last
    query block too short for all its groups repeats its last one (the union, maximum or mean over groups then
    weighs the real groups as if the block were whole)."""
    reps, nqb, sub = cfg.query_reps, -(-n // cfg.block_size), cfg.block_size // cfg.query_reps
    if cfg.query_pool == "last":
        last = torch.arange(sub - 1, -(-n // sub) * sub, sub, device=q.device).clamp(max=n - 1)
        means = q[last].transpose(0, 1).float()
    else:
        means = _block_means(q.transpose(0, 1), n, sub)
    if means.shape[1] < nqb * reps:
        means = means[:, torch.arange(nqb * reps, device=q.device).clamp(max=means.shape[1] - 1)]
    return means.view(q.shape[1], nqb, reps, q.shape[2])


def _permutation(q: torch.Tensor, k: torch.Tensor, cfg: PBSConfig, scale: float, npad: int) -> torch.Tensor:
    """(Hkv, Npad) original position of each permuted key slot; slots past N_kv hold padding positions."""
    n_kv, hkv, _ = k.shape
    if not cfg.permute:
        return torch.arange(npad, device=k.device).expand(hkv, npad)
    seg = cfg.segment_size
    nseg = -(-n_kv // seg)
    imp = torch.full((hkv, nseg * seg), float("-inf"), device=k.device)
    imp[:, :n_kv] = key_importance(q, k, cfg.block_size, scale)
    order = imp.view(hkv, nseg, seg).argsort(dim=-1, descending=True, stable=True)
    return (order + torch.arange(nseg, device=k.device)[:, None] * seg).view(hkv, -1)[:, :npad]


def _choose_reps(probs: torch.Tensor, visible: torch.Tensor, forced: torch.Tensor, cfg: PBSConfig) -> torch.Tensor:
    """probs (Hq, reps, nqb, nkb) block probabilities of each pooled query -> keep (Hq, nqb, nkb): the union of each
    pooled query's threshold choice, or (budget, threshold 1) the choice by the largest probability per block."""
    if cfg.budget is not None or cfg.threshold >= 1.0 or probs.shape[1] == 1:
        return _choose(probs.amax(1), visible, forced, cfg)
    if cfg.rep_combine == "mean":
        return _choose(probs.mean(1), visible, forced, cfg)
    h, reps, nqb, nkb = probs.shape
    return _choose(probs.reshape(h * reps, nqb, nkb), visible, forced, cfg).view(h, reps, nqb, nkb).any(1)


def _choose(probs: torch.Tensor, visible: torch.Tensor, forced: torch.Tensor, cfg: PBSConfig) -> torch.Tensor:
    """probs (Hq, nqb, nkb) softmaxed block scores; visible/forced (nqb, nkb) -> keep (Hq, nqb, nkb) bool."""
    candidate = visible & ~forced
    n_cand = candidate.sum(-1)
    n_forced = forced.sum(-1)
    cand_p = probs.masked_fill(~candidate, -1.0)
    sorted_p = cand_p.sort(dim=-1, descending=True).values
    if cfg.budget is not None:
        n_sel = torch.ceil(cfg.budget * visible.sum(-1).double() - 1e-6).long() - n_forced  # as pbs_prefill_ref
    elif cfg.threshold >= 1.0:
        n_sel = n_cand
    else:
        mass = sorted_p.clamp(min=0)
        before = (probs * forced).sum(-1, keepdim=True) + mass.cumsum(-1) - mass  # mass kept before each candidate
        n_sel = ((before < cfg.threshold) & (sorted_p >= 0)).sum(-1)
    n_sel = torch.minimum(n_sel.expand(probs.shape[:2]).clamp(min=0), n_cand)
    cut = sorted_p.gather(-1, (n_sel - 1).clamp(min=0)[..., None])  # mass of the last candidate kept
    return forced | (candidate & (cand_p >= cut) & (n_sel > 0)[..., None])


def _compact(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keep (Hq, nqb, nkb) bool -> (ascending kept block indices padded to the longest list, counts)."""
    hq, nqb, nkb = keep.shape
    counts = keep.sum(-1)
    max_kept = int(counts.max())
    slot = torch.where(keep, keep.cumsum(-1) - 1, max_kept)  # position in the compact list; max_kept: discarded
    idx = torch.zeros(hq, nqb, max_kept + 1, dtype=torch.int32, device=keep.device)
    idx.scatter_(-1, slot, torch.arange(nkb, dtype=torch.int32, device=keep.device).expand(hq, nqb, nkb))
    return idx[..., :max_kept], counts


def block_lse_torch(qm: torch.Tensor, keys: torch.Tensor, key_pos: torch.Tensor, n_kv: int, cfg: PBSConfig,
                    scale: float) -> torch.Tensor:
    """The "lse" block score: qm (Hkv, group, nqb, D) float32 pooled queries (`group` per KV head: its query heads
    x query_reps), keys (Hkv, Npad, D) permuted -> (Hkv x group, nqb, nkb) log-sum-exp over each key block's real
    keys of qm . k * scale (padding keys excluded), so the softmax over blocks is exactly the pooled query's
    attention mass per block. Query-block chunks bound the (group x chunk x Npad) score buffer."""
    hkv, group, nqb, d = qm.shape
    npad = keys.shape[1]
    bs = cfg.block_size
    out = torch.empty(hkv, group, nqb, npad // bs, dtype=torch.float32, device=qm.device)
    chunk = max(1, (1 << 24) // (group * npad))
    for g in range(hkv):
        kg = keys[g].float()
        pad = key_pos[g] >= n_kv
        for m0 in range(0, nqb, chunk):
            s = torch.einsum("gmd,kd->gmk", qm[g, :, m0:m0 + chunk], kg) * scale
            s.masked_fill_(pad, float("-inf"))
            out[g, :, m0:m0 + chunk] = s.view(group, s.shape[1], -1, bs).logsumexp(-1)
    return out.view(hkv * group, nqb, -1)


@triton.jit
def _block_lse_kernel(QM, K, POS, FIRST, S, n_rows, n_kv, qk_scale, s_qh, s_qr, s_kh, s_kt, s_ph, s_sh, s_sm,
                      GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BS: tl.constexpr, BLOCK_R: tl.constexpr):
    # Program (KV head g, key block j): the key block stays in registers while the query-block means that can see
    # it (from query block FIRST[j] on) stream past, BLOCK_R rows at a time; row r of KV head g is query block
    # r // GROUP of query head g * GROUP + r % GROUP. Scores in log2 units; the log-sum-exp is stored in natural
    # units.
    g = tl.program_id(0)
    j = tl.program_id(1)
    offs_k = j * BS + tl.arange(0, BS)
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(K + g * s_kh + offs_k[:, None] * s_kt + offs_d[None, :])
    live = tl.load(POS + g * s_ph + offs_k) < n_kv
    for r0 in range(tl.load(FIRST + j) * GROUP, n_rows, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        qm = tl.load(QM + g * s_qh + rows[:, None] * s_qr + offs_d[None, :], mask=(rows < n_rows)[:, None],
                     other=0.0)
        s = tl.where(live[None, :], tl.dot(qm, tl.trans(k)) * qk_scale, float("-inf"))
        top = tl.max(s, 1)
        top = tl.where(top == float("-inf"), 0.0, top)
        lse = (top + tl.log2(tl.sum(tl.exp2(s - top[:, None]), 1))) * 0.6931471805599453
        tl.store(S + (g * GROUP + rows % GROUP) * s_sh + (rows // GROUP) * s_sm + j, lse, mask=rows < n_rows)


def block_lse_triton(qm: torch.Tensor, keys: torch.Tensor, key_pos: torch.Tensor, n_kv: int, cfg: PBSConfig,
                     scale: float, geo: BlockGeometry, tiles: tuple[int, int, int] | None = None) -> torch.Tensor:
    """`block_lse_torch` in one Triton kernel; blocks a query block cannot see (`geo.visible`) stay -inf. The
    pooled queries are cast to the keys' dtype once (the kernel's dot takes that dtype), halving what every program
    streams; `tiles` = (BLOCK_R, num_warps, num_stages) overrides the launch shape (benchmarks)."""
    hkv, group, nqb, d = qm.shape
    npad = keys.shape[1]
    nkb = npad // cfg.block_size
    # query-block major rows, so the query blocks that cannot see a key block are a prefix the kernel skips
    rows = qm.to(keys.dtype).permute(0, 2, 1, 3).reshape(hkv, nqb * group, d)
    first = geo.derived("first", lambda: geo.visible.to(torch.int8).argmax(0).to(torch.int32))  # the first query
    # block seeing each key block
    out = torch.full((hkv * group, nqb, nkb), float("-inf"), dtype=torch.float32, device=qm.device)
    block_r, warps, stages = tiles or ((64, 4, 2) if qm.device.type == "cuda" else (16, 1, 1))
    _block_lse_kernel[(hkv, nkb)](
        rows, keys, key_pos, first, out, nqb * group, n_kv, scale * 1.4426950408889634,
        rows.stride(0), rows.stride(1), keys.stride(0), keys.stride(1), key_pos.stride(0), out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=d, BS=cfg.block_size, BLOCK_R=block_r, num_warps=warps, num_stages=stages)
    return out


MAX_FUSED_BLOCKS = 4096  # longer rows (over 512K keys at block 128) take the torch path


@triton.jit
def _pooled_probs(S, row, m, j, real, soft, s_sh, s_sm):
    """Block probabilities of one pooled query of query block m: the softmax of score row `row` over `soft`."""
    s = tl.load(S + row * s_sh + m * s_sm + j, mask=real, other=float("-inf"))
    logits = tl.where(soft, s, float("-inf"))
    top = tl.max(logits, 0)
    e = tl.where(soft, tl.exp(logits - tl.where(top == float("-inf"), 0.0, top)), 0.0)
    total = tl.sum(e, 0)
    return e / tl.where(total == 0, 1.0, total)


@triton.jit
def _threshold_keep(probs, j, forced, candidate, n_sel, n_cand, threshold, MODE: tl.constexpr):
    """The candidates `_choose` keeps for one row of probabilities (MODE 0: reach the threshold; 1: the n_sel
    largest; 2: all)."""
    cand_p = tl.where(candidate, probs, -1.0)
    sorted_p = tl.sort(cand_p, descending=True)
    if MODE == 0:
        mass = tl.maximum(sorted_p, 0.0)
        before = tl.sum(tl.where(forced, probs, 0.0), 0) + tl.cumsum(mass, 0) - mass
        n_sel = tl.sum(((before < threshold) & (sorted_p >= 0)).to(tl.int32), 0)
    elif MODE == 2:
        n_sel = n_cand
    n_sel = tl.minimum(tl.maximum(n_sel, 0), n_cand)
    cut = tl.sum(tl.where(j == tl.maximum(n_sel - 1, 0), sorted_p, 0.0), 0)
    return candidate & (cand_p >= cut) & (n_sel > 0)


@triton.jit
def _choose_kernel(S, KIND, NSEL, IDX, CNT, nkb, threshold, s_sh, s_sm, s_km, s_ih, s_im, s_ch,
                   MODE: tl.constexpr, NKB: tl.constexpr, REPS: tl.constexpr, CANDIDATES_ONLY: tl.constexpr,
                   MEAN: tl.constexpr):
    # Program (query head h, query block m): the same decision as `_choose_reps` + `_compact` for one query block.
    # S (Hq x REPS, nqb, nkb) scores, row h x REPS + r for pooled query r; KIND (nqb, nkb) int8 block geometry:
    # 0 hidden, 1 candidate, 2 forced, 3 forced in the diagonal segment. Per pooled query the softmax of its
    # scores; the union of the pooled queries' threshold choices (MODE 0), or one choice by their largest
    # probability per block (MODE 1: budget, NSEL[m] selected blocks precomputed; 2: every candidate); MEAN (with
    # MODE 0): one threshold choice from their mean probabilities (rep_combine "mean"). Writes the
    # kept blocks ascending to IDX (Hq, nqb, >= nkb) and their number to CNT (Hq, nqb).
    h = tl.program_id(0)
    m = tl.program_id(1)
    j = tl.arange(0, NKB)
    real = j < nkb
    kind = tl.load(KIND + m * s_km + j, mask=real, other=0)
    visible = kind > 0
    forced = kind > 1
    if CANDIDATES_ONLY:  # "lse": the always-kept blocks (the first holds the attention sink) take no part
        soft = visible & (forced == 0)
    else:
        soft = visible & (kind < 3)
    candidate = visible & (forced == 0)
    n_cand = tl.sum(candidate.to(tl.int32), 0)
    n_sel = 0
    if MODE == 1:
        n_sel = tl.load(NSEL + m)
    chosen = tl.zeros([NKB], dtype=tl.int1)
    top = tl.zeros([NKB], dtype=tl.float32)
    for r in range(REPS):
        probs = _pooled_probs(S, h * REPS + r, m, j, real, soft, s_sh, s_sm)
        if MEAN:
            top += probs
        elif MODE == 0:
            chosen = chosen | _threshold_keep(probs, j, forced, candidate, n_sel, n_cand, threshold, MODE)
        else:  # the largest probability over pooled queries: the budget's ranking
            top = tl.maximum(top, probs)
    if MEAN:
        chosen = _threshold_keep(top / REPS, j, forced, candidate, n_sel, n_cand, threshold, MODE)
    elif MODE != 0:
        chosen = _threshold_keep(top, j, forced, candidate, n_sel, n_cand, threshold, MODE)
    keep = (forced | chosen).to(tl.int32)
    slot = tl.cumsum(keep, 0) - 1
    tl.store(IDX + h * s_ih + m * s_im + slot, j, mask=keep > 0)
    tl.store(CNT + h * s_ch + m, tl.sum(keep, 0))


def choose_triton(scores: torch.Tensor, geo: BlockGeometry, cfg: PBSConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (Hq x query_reps, nqb, nkb) scaled block scores (row h x reps + r: query head h, pooled query r) ->
    (kept block indices (Hq, nqb, nkb), counts (Hq, nqb))."""
    rows, nqb, nkb = scores.shape
    reps = cfg.query_reps
    hq = rows // reps
    scores = scores.contiguous()
    kind = geo.derived("kind", lambda: (geo.visible.to(torch.int8) + geo.forced.to(torch.int8)
                                        + geo.diag.to(torch.int8)).contiguous())
    idx = torch.zeros(hq, nqb, nkb, dtype=torch.int32, device=scores.device)
    counts = torch.empty(hq, nqb, dtype=torch.int32, device=scores.device)
    if cfg.budget is not None:
        mode = 1
        n_sel = geo.derived(("n_sel", cfg.budget), lambda: (
            torch.ceil(cfg.budget * geo.visible.sum(-1).double() - 1e-6).long() - geo.forced.sum(-1)).to(torch.int32))
    else:
        mode, n_sel = (2 if cfg.threshold >= 1.0 else 0), counts  # NSEL unused
    on_gpu = scores.device.type == "cuda"
    width = triton.next_power_of_2(nkb)
    _choose_kernel[(hq, nqb)](
        scores, kind, n_sel, idx, counts, nkb, cfg.threshold,
        scores.stride(0), scores.stride(1), kind.stride(0), idx.stride(0), idx.stride(1), counts.stride(0),
        MODE=mode, NKB=width, REPS=reps, CANDIDATES_ONLY=cfg.block_score == "lse",
        MEAN=mode == 0 and reps > 1 and cfg.rep_combine == "mean",
        num_warps=(8 if width >= 2048 else 4) if on_gpu else 1)
    return idx, counts


def pbs_select(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: PBSConfig, scale: float) -> PBSSelection:
    """Permute K/V and choose the key blocks each (query head, query block) attends to."""
    n, hq, d = q.shape
    n_kv, hkv, _ = k.shape
    group, bs = hq // hkv, cfg.block_size
    nkb, nqb = -(-n_kv // bs), -(-n // bs)
    npad = nkb * bs
    geo = block_geometry(cfg, n, n_kv, q.device)

    # PBS: 1. Permutation
    perm = _permutation(q, k, cfg, scale, npad)
    key_pos = perm.to(torch.int32).contiguous()
    gather = perm.clamp(max=n_kv - 1)[..., None].expand(hkv, npad, d)
    keys = k.transpose(0, 1).gather(1, gather)
    values = v.transpose(0, 1).gather(1, gather)

    # PBS: 2. Block scoring
    reps = cfg.query_reps  # score rows: (KV head, query head of its group, pooled query) major to minor
    qm = _rep_means(q, n, cfg).view(hkv, group, nqb, reps, d).transpose(2, 3).reshape(hkv, group * reps, nqb, d)
    if cfg.block_score == "lse" and use_triton(q):
        scores = block_lse_triton(qm, keys, key_pos, n_kv, cfg, scale, geo)
    elif cfg.block_score == "lse":
        scores = block_lse_torch(qm, keys, key_pos, n_kv, cfg, scale)
    else:
        km = _block_means(keys, n_kv, bs)  # the real keys fill slots [0, N_kv): padding sorts last in its segment
        scores = torch.einsum("hgmd,hjd->hgmj", qm, km).reshape(hq * reps, nqb, nkb) * scale

    # PBS: 3. Selection
    if use_triton(q) and triton.next_power_of_2(nkb) <= MAX_FUSED_BLOCKS:
        idx, counts = choose_triton(scores, geo, cfg)  # padded to nkb: no host sync
    else:
        soft = geo.visible & ~(geo.forced if cfg.block_score == "lse" else geo.diag)  # see PBSConfig.block_score
        probs = scores.masked_fill(~soft, float("-inf")).softmax(-1).nan_to_num_(0.0).view(hq, reps, nqb, nkb)
        idx, counts = _compact(_choose_reps(probs, geo.visible, geo.forced, cfg))
    return PBSSelection(keys=keys, values=values, key_pos=key_pos, q_offset=n_kv - n,
                        block_idx=idx, block_count=counts.to(torch.int32),
                        diag_count=geo.derived("diag_count", lambda: geo.diag.sum(-1).to(torch.int32)),
                        kept=counts.sum(-1), visible=geo.derived("visible", lambda: geo.visible.sum()).expand(hq))
