"""PBS-Attn block selection, batched over heads and blocks on the device (no per-segment Python loop).

1. Importance of each key: attention mass from the last query block (softmax, mean over those queries and over the
   query heads of its KV group, so one permutation serves one KV head).
2. Permutation: inside each segment, keys sorted by importance, so the keys that matter cluster into few blocks.
3. Block scores: mean-pooled query blocks against mean-pooled (permuted) key blocks (`block_score="mean"`), or
   the log-sum-exp over each key block's keys of the mean-pooled query's scores (`"lse"`: the share of that
   query's attention in the block, which a single heavy key can carry). They are softmaxed over the visible blocks
   outside the diagonal segment, as the paper does (the diagonal segment is kept whatever its score); with "lse"
   over the blocks not kept anyway, so the attention sink in the first block does not use up the threshold. Per
   query block keep the first key block, every block of its diagonal segment(s) and of the `local_segments`
   segments before them (the last `dense_last_blocks` query blocks: every visible block), then the fewest other
   blocks whose mass, added to the kept blocks' mass, reaches the threshold (or a fixed fraction of the visible
   blocks in budget mode), clamped to [min_blocks, max_blocks].
   With `query_reps` > 1 each query block is pooled into that many means, each chooses as above, and the block
   keeps the union of their choices (budget mode: one choice by each block's largest probability over them).
4. The kept blocks become a compact list per (query head, query block), ascending, padded to the longest list
   (with `shared_selection`, one list per (KV head, query block) from the mean of its query heads' probabilities);
   the diagonal-segment blocks, which need the causal mask, are the last `diag_count` entries of each list.

Steps 1 and 3-4 have Triton kernels on CUDA (importance.py; below, `_block_lse_kernel` for the "lse" scores and
`_choose_kernel`, which fuses the softmax, the sort, the threshold or budget cut and the compaction, one program per
(list head, query block)); the torch code is the CPU path and the kernels' reference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pbs_engine.kernels.config import PBSConfig
from pbs_engine.kernels.dispatch import use_triton
from pbs_engine.kernels.importance import key_importance


@dataclass
class PBSSelection:
    keys: torch.Tensor  # (Hkv, Npad, D) permuted keys, Npad = key blocks x block_size
    values: torch.Tensor  # (Hkv, Npad, D) permuted values
    key_pos: torch.Tensor  # (Hkv, Npad) int32 original position of each permuted key (>= N_kv: padding)
    q_offset: int  # position of query 0 (= N_kv - N); padding keys lie past every query, so causality hides them
    block_idx: torch.Tensor  # (Hl, num_q_blocks, width >= longest list) int32 kept key blocks, ascending; Hl list
    # heads: Hq, or Hkv with shared_selection (query head h reads list h // list_group)
    block_count: torch.Tensor  # (Hl, num_q_blocks) int32 how many entries of block_idx are real
    diag_count: torch.Tensor  # (num_q_blocks,) int32 how many of them (the last ones) lie in the diagonal segment
    kept: torch.Tensor  # (Hq,) kept (query block, key block) pairs per head
    visible: torch.Tensor  # (Hq,) causally visible pairs per head
    list_group: int = 1  # query heads per block list


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
    """q (N, Hq, D) -> (Hq, nqb, reps, D) float32 means of each query block's `query_reps` consecutive groups of
    block_size / query_reps queries; a last query block too short for all its groups repeats its last mean (the
    union or maximum over groups is unchanged by that)."""
    reps, nqb = cfg.query_reps, -(-n // cfg.block_size)
    means = _block_means(q.transpose(0, 1), n, cfg.block_size // reps)
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
    """probs (H, reps, nqb, nkb) block probabilities of each pooled query -> keep (H, nqb, nkb): the union of each
    pooled query's threshold choice, at most `max_blocks` of it (those with the largest probability over the pooled
    queries), or (budget, threshold 1) the choice by the largest probability per block."""
    top = probs.amax(1)
    if cfg.budget is not None or cfg.threshold >= 1.0 or probs.shape[1] == 1:
        return _choose(top, visible, forced, cfg)
    h, reps, nqb, nkb = probs.shape
    keep = _choose(probs.reshape(h * reps, nqb, nkb), visible, forced, cfg).view(h, reps, nqb, nkb).any(1)
    if cfg.max_blocks is None:
        return keep
    chosen = keep & ~forced
    ranked = top.masked_fill(~chosen, -1.0)
    cut = ranked.sort(dim=-1, descending=True).values[..., max(cfg.max_blocks - 1, 0):max(cfg.max_blocks, 1)]
    over = chosen.sum(-1, keepdim=True) > cfg.max_blocks
    return forced | (chosen & ~(over & ((ranked < cut) | (cfg.max_blocks == 0))))


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
    n_sel = n_sel.expand(probs.shape[:2]).clamp(min=cfg.min_blocks or 0)
    if cfg.max_blocks is not None:
        n_sel = n_sel.clamp(max=cfg.max_blocks)
    n_sel = torch.minimum(n_sel, n_cand)
    cut = sorted_p.gather(-1, (n_sel - 1).clamp(min=0)[..., None])  # mass of the last candidate kept
    return forced | (candidate & (cand_p >= cut) & (n_sel > 0)[..., None])


def per_head_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: PBSConfig
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V repeated for every query head when each query head gets its own permutation, else unchanged."""
    group = q.shape[1] // k.shape[1]
    if cfg.permute and not cfg.shared_permutation and group > 1:
        return k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return k, v


def _compact(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keep (Hq, nqb, nkb) bool -> (ascending kept block indices padded to the longest list, counts)."""
    hq, nqb, nkb = keep.shape
    counts = keep.sum(-1)
    max_kept = int(counts.max())
    slot = torch.where(keep, keep.cumsum(-1) - 1, max_kept)  # position in the compact list; max_kept: discarded
    idx = torch.zeros(hq, nqb, max_kept + 1, dtype=torch.int32, device=keep.device)
    idx.scatter_(-1, slot, torch.arange(nkb, dtype=torch.int32, device=keep.device).expand(hq, nqb, nkb))
    return idx[..., :max_kept], counts


def block_lse_torch(qm: torch.Tensor, keys: torch.Tensor, key_pos: torch.Tensor, n_kv: int, prefix: int,
                    cfg: PBSConfig, scale: float) -> torch.Tensor:
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
def _block_lse_kernel(QM, K, POS, S, n_rows, n_kv, prefix, qk_scale, s_qh, s_qr, s_kh, s_kt, s_ph, s_sh, s_sm,
                      GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BS: tl.constexpr, SEG: tl.constexpr,
                      PERMUTE: tl.constexpr, BLOCK_R: tl.constexpr):
    # Program (KV head g, key block j): the key block stays in registers while the query-block means that can see
    # it stream past, BLOCK_R rows at a time; row r of KV head g is query block r // GROUP of query head
    # g * GROUP + r % GROUP. Scores in log2 units; the log-sum-exp is stored in natural units.
    g = tl.program_id(0)
    j = tl.program_id(1)
    offs_k = j * BS + tl.arange(0, BS)
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(K + g * s_kh + offs_k[:, None] * s_kt + offs_d[None, :])
    live = tl.load(POS + g * s_ph + offs_k) < n_kv
    if PERMUTE:
        earliest = j * BS // SEG * SEG
    else:
        earliest = j * BS
    first_row = tl.maximum(earliest - prefix, 0) // BS * GROUP  # earlier query blocks cannot see block j
    for r0 in range(first_row, n_rows, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        qm = tl.load(QM + g * s_qh + rows[:, None] * s_qr + offs_d[None, :], mask=(rows < n_rows)[:, None],
                     other=0.0)
        s = tl.where(live[None, :], tl.dot(qm, tl.trans(k)) * qk_scale, float("-inf"))
        top = tl.max(s, 1)
        top = tl.where(top == float("-inf"), 0.0, top)
        lse = (top + tl.log2(tl.sum(tl.exp2(s - top[:, None]), 1))) * 0.6931471805599453
        tl.store(S + (g * GROUP + rows % GROUP) * s_sh + (rows // GROUP) * s_sm + j, lse, mask=rows < n_rows)


def block_lse_triton(qm: torch.Tensor, keys: torch.Tensor, key_pos: torch.Tensor, n_kv: int, prefix: int,
                     cfg: PBSConfig, scale: float, tiles: tuple[int, int, int] | None = None) -> torch.Tensor:
    """`block_lse_torch` in one Triton kernel; blocks a query block cannot see stay -inf. The pooled queries are
    cast to the keys' dtype once (the kernel's dot takes that dtype), halving what every program streams; `tiles`
    = (BLOCK_R, num_warps, num_stages) overrides the launch shape (benchmarks)."""
    hkv, group, nqb, d = qm.shape
    npad = keys.shape[1]
    nkb = npad // cfg.block_size
    # query-block major rows, so the query blocks that cannot see a key block are a prefix the kernel skips
    rows = qm.to(keys.dtype).permute(0, 2, 1, 3).reshape(hkv, nqb * group, d)
    out = torch.full((hkv * group, nqb, nkb), float("-inf"), dtype=torch.float32, device=qm.device)
    block_r, warps, stages = tiles or ((64, 4, 2) if qm.device.type == "cuda" else (16, 1, 1))
    _block_lse_kernel[(hkv, nkb)](
        rows, keys, key_pos, out, nqb * group, n_kv, prefix, scale * 1.4426950408889634,
        rows.stride(0), rows.stride(1), keys.stride(0), keys.stride(1), key_pos.stride(0), out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=d, BS=cfg.block_size, SEG=cfg.segment_size, PERMUTE=cfg.permute,
        BLOCK_R=block_r, num_warps=warps, num_stages=stages)
    return out


MAX_FUSED_BLOCKS = 4096  # longer rows (over 512K keys at block 128) take the torch path


@triton.jit
def _pooled_probs(S, row0, m, j, real, soft, s_sh, s_sm, GROUP: tl.constexpr, REPS: tl.constexpr):
    """Block probabilities of one pooled query of query block m: the softmax over the `soft` blocks of score rows
    row0, row0 + REPS, ... (one per query head of a shared list), averaged over those GROUP heads."""
    probs = tl.zeros(j.shape, dtype=tl.float32)
    for gh in range(GROUP):
        s = tl.load(S + (row0 + gh * REPS) * s_sh + m * s_sm + j, mask=real, other=float("-inf"))
        logits = tl.where(soft, s, float("-inf"))
        top = tl.max(logits, 0)
        e = tl.where(soft, tl.exp(logits - tl.where(top == float("-inf"), 0.0, top)), 0.0)
        total = tl.sum(e, 0)
        probs += e / tl.where(total == 0, 1.0, total)
    return probs / GROUP


@triton.jit
def _threshold_keep(probs, j, forced, candidate, n_sel, n_cand, threshold, min_sel, max_sel, MODE: tl.constexpr):
    """The candidates `_choose` keeps for one row of probabilities (MODE 0: reach the threshold; 1: the n_sel
    largest; 2: all), clamped to [min_sel, max_sel]."""
    cand_p = tl.where(candidate, probs, -1.0)
    sorted_p = tl.sort(cand_p, descending=True)
    if MODE == 0:
        mass = tl.maximum(sorted_p, 0.0)
        before = tl.sum(tl.where(forced, probs, 0.0), 0) + tl.cumsum(mass, 0) - mass
        n_sel = tl.sum(((before < threshold) & (sorted_p >= 0)).to(tl.int32), 0)
    elif MODE == 2:
        n_sel = n_cand
    n_sel = tl.minimum(tl.minimum(tl.maximum(n_sel, min_sel), max_sel), n_cand)
    cut = tl.sum(tl.where(j == tl.maximum(n_sel - 1, 0), sorted_p, 0.0), 0)
    return candidate & (cand_p >= cut) & (n_sel > 0)


@triton.jit
def _choose_kernel(S, NSEL, IDX, CNT, n_q, prefix, nkb, dense_from, threshold, min_sel, max_sel,
                   s_sh, s_sm, s_ih, s_im, s_ch,
                   BS: tl.constexpr, SEG: tl.constexpr, LOCAL: tl.constexpr, PERMUTE: tl.constexpr,
                   MODE: tl.constexpr, NKB: tl.constexpr, GROUP: tl.constexpr, REPS: tl.constexpr,
                   CAP: tl.constexpr, CANDIDATES_ONLY: tl.constexpr):
    # Program (list head h, query block m): the same decision as `_choose_reps` + `_compact` for one query block:
    # per pooled query (REPS of them) the softmax of one query head's scores, or the mean of the GROUP query heads'
    # softmaxes (shared selection); the union of the pooled queries' threshold choices (MODE 0), or one choice by
    # their largest probability per block (MODE 1: budget, NSEL[m] selected blocks precomputed; 2: every candidate).
    # CAP: max_blocks is set, so a union of several pooled queries' choices may need cutting back to max_sel.
    h = tl.program_id(0)
    m = tl.program_id(1)
    j = tl.arange(0, NKB)
    real = j < nkb
    q_first = prefix + m * BS
    q_last = prefix + tl.minimum((m + 1) * BS, n_q) - 1
    block_seg = j * BS // SEG * SEG
    if PERMUTE:
        earliest = block_seg
    else:
        earliest = j * BS
    visible = real & (earliest <= q_last)
    diag_start = q_first // SEG * SEG
    diag = visible & (block_seg >= diag_start)
    forced = visible & ((block_seg >= diag_start - LOCAL * SEG) | (j == 0) | (m >= dense_from))
    if CANDIDATES_ONLY:  # "lse": the always-kept blocks (the first holds the attention sink) take no part
        soft = visible & (forced == 0)
    else:
        soft = visible & (diag == 0)
    candidate = visible & (forced == 0)
    n_cand = tl.sum(candidate.to(tl.int32), 0)
    n_sel = 0
    if MODE == 1:
        n_sel = tl.load(NSEL + m)
    chosen = tl.zeros([NKB], dtype=tl.int1)
    top = tl.zeros([NKB], dtype=tl.float32)
    for r in range(REPS):
        probs = _pooled_probs(S, h * GROUP * REPS + r, m, j, real, soft, s_sh, s_sm, GROUP, REPS)
        if MODE == 0:
            chosen = chosen | _threshold_keep(probs, j, forced, candidate, n_sel, n_cand, threshold, min_sel,
                                              max_sel, MODE)
        if MODE != 0 or CAP:  # the largest probability over pooled queries: the budget's ranking, the union's cap
            top = tl.maximum(top, probs)
    if MODE != 0:
        chosen = _threshold_keep(top, j, forced, candidate, n_sel, n_cand, threshold, min_sel, max_sel, MODE)
    elif CAP and REPS > 1:  # the union may hold more than max_sel blocks: keep those with the largest probability
        ranked = tl.where(chosen, top, -1.0)
        cut = tl.sum(tl.where(j == tl.maximum(max_sel - 1, 0), tl.sort(ranked, descending=True), 0.0), 0)
        over = tl.sum(chosen.to(tl.int32), 0) > max_sel
        chosen = chosen & ((over == 0) | ((ranked >= cut) & (max_sel > 0)))
    keep = (forced | chosen).to(tl.int32)
    slot = tl.cumsum(keep, 0) - 1
    tl.store(IDX + h * s_ih + m * s_im + slot, j, mask=keep > 0)
    tl.store(CNT + h * s_ch + m, tl.sum(keep, 0))


def choose_triton(scores: torch.Tensor, forced: torch.Tensor, visible: torch.Tensor, cfg: PBSConfig, n_q: int,
                  prefix: int, group: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (Hq x query_reps, nqb, nkb) scaled block scores (row h x reps + r: query head h, pooled query r) ->
    (kept block indices (Hq / group, nqb, nkb), counts (Hq / group, nqb)), one list per `group` consecutive query
    heads (their mean block probabilities); the geometry (visible, diagonal, forced blocks) is recomputed in the
    kernel, `forced`/`visible` only size the budget."""
    rows, nqb, nkb = scores.shape
    reps = cfg.query_reps
    hq = rows // reps
    scores = scores.contiguous()
    idx = torch.zeros(hq // group, nqb, nkb, dtype=torch.int32, device=scores.device)
    counts = torch.empty(hq // group, nqb, dtype=torch.int32, device=scores.device)
    if cfg.budget is not None:
        mode = 1
        n_sel = (torch.ceil(cfg.budget * visible.sum(-1).double() - 1e-6).long() - forced.sum(-1)).to(torch.int32)
    else:
        mode, n_sel = (2 if cfg.threshold >= 1.0 else 0), counts  # NSEL unused
    on_gpu = scores.device.type == "cuda"
    width = triton.next_power_of_2(nkb)
    _choose_kernel[(hq // group, nqb)](
        scores, n_sel, idx, counts, n_q, prefix, nkb, nqb - cfg.dense_last_blocks, cfg.threshold, cfg.min_blocks or 0,
        cfg.max_blocks if cfg.max_blocks is not None else nkb,
        scores.stride(0), scores.stride(1), idx.stride(0), idx.stride(1), counts.stride(0),
        BS=cfg.block_size, SEG=cfg.segment_size, LOCAL=cfg.local_segments, PERMUTE=cfg.permute, MODE=mode,
        NKB=width, GROUP=group, REPS=reps, CAP=cfg.max_blocks is not None, CANDIDATES_ONLY=cfg.block_score == "lse",
        num_warps=(8 if width >= 2048 else 4) if on_gpu else 1)
    return idx, counts


def pbs_select(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: PBSConfig, scale: float) -> PBSSelection:
    """Permute K/V and choose the key blocks each (query head, query block) attends to."""
    k, v = per_head_kv(q, k, v, cfg)
    n, hq, d = q.shape
    n_kv, hkv, _ = k.shape
    group, bs, seg = hq // hkv, cfg.block_size, cfg.segment_size
    dev = q.device
    prefix = n_kv - n
    nkb, nqb = -(-n_kv // bs), -(-n // bs)
    npad = nkb * bs
    perm = _permutation(q, k, cfg, scale, npad)
    key_pos = perm.to(torch.int32).contiguous()
    gather = perm.clamp(max=n_kv - 1)[..., None].expand(hkv, npad, d)
    keys = k.transpose(0, 1).gather(1, gather)
    values = v.transpose(0, 1).gather(1, gather)

    reps = cfg.query_reps  # score rows: (KV head, query head of its group, pooled query) major to minor
    qm = _rep_means(q, n, cfg).view(hkv, group, nqb, reps, d).transpose(2, 3).reshape(hkv, group * reps, nqb, d)
    if cfg.block_score == "lse":
        lse = block_lse_triton if use_triton(q) else block_lse_torch
        scores = lse(qm, keys, key_pos, n_kv, prefix, cfg, scale)
    else:
        km = _block_means(keys, n_kv, bs)  # the real keys fill slots [0, N_kv): padding sorts last in its segment
        scores = torch.einsum("hgmd,hjd->hgmj", qm, km).reshape(hq * reps, nqb, nkb) * scale

    # a key block is visible when its earliest possible key (its segment's start if permuted) is <= the block's
    # last query; the diagonal segment(s) start at the segment of the block's first query
    m = torch.arange(nqb, device=dev)
    q_first = prefix + m * bs
    q_last = prefix + torch.clamp((m + 1) * bs, max=n) - 1
    j = torch.arange(nkb, device=dev)
    block_seg = j * bs // seg * seg
    earliest = block_seg if cfg.permute else j * bs
    visible = earliest[None, :] <= q_last[:, None]
    diag_start = q_first // seg * seg
    diag = visible & (block_seg[None, :] >= diag_start[:, None])
    local = visible & (block_seg[None, :] >= (diag_start - cfg.local_segments * seg)[:, None])
    forced = local | (visible & ((j == 0)[None, :] | (m >= nqb - cfg.dense_last_blocks)[:, None]))
    shared = group if cfg.shared_selection else 1  # query heads per list
    if use_triton(q) and triton.next_power_of_2(nkb) <= MAX_FUSED_BLOCKS:
        idx, counts = choose_triton(scores, forced, visible, cfg, n, prefix, shared)  # padded to nkb: no host sync
    else:
        soft = visible & ~(forced if cfg.block_score == "lse" else diag)  # see PBSConfig.block_score
        probs = scores.masked_fill(~soft, float("-inf")).softmax(-1).nan_to_num_(0.0)
        probs = probs.view(hq // shared, shared, reps, nqb, nkb).mean(1)
        idx, counts = _compact(_choose_reps(probs, visible, forced, cfg))
    return PBSSelection(keys=keys, values=values, key_pos=key_pos, q_offset=prefix,
                        block_idx=idx, block_count=counts.to(torch.int32),
                        diag_count=diag.sum(-1).to(torch.int32), kept=counts.sum(-1).repeat_interleave(shared),
                        visible=visible.sum().expand(hq), list_group=shared)
