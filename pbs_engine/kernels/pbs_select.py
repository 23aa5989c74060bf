"""PBS-Attn block selection, batched over heads and blocks on the device (no per-segment Python loop).

1. Importance of each key: attention mass from the last query block (softmax, mean over those queries and over the
   query heads of its KV group, so one permutation serves one KV head).
2. Permutation: inside each segment, keys sorted by importance, so the keys that matter cluster into few blocks.
3. Block scores: mean-pooled query blocks against mean-pooled (permuted) key blocks, softmaxed over the visible
   blocks. Per query block keep the first key block and every block of its diagonal segment(s), then the fewest
   other blocks whose mass, added to theirs, reaches the threshold (or a fixed fraction in budget mode), clamped
   to [min_blocks, max_blocks].
4. The kept blocks become a compact list per (query head, query block), ascending, padded to the longest list;
   the diagonal-segment blocks, which need the causal mask, are the last `diag_count` entries of each list.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pbs_engine.kernels.config import PBSConfig


@dataclass
class PBSSelection:
    keys: torch.Tensor  # (Hkv, Npad, D) permuted keys, Npad = key blocks x block_size
    values: torch.Tensor  # (Hkv, Npad, D) permuted values
    key_pos: torch.Tensor  # (Hkv, Npad) int32 original position of each permuted key (>= N_kv: padding)
    q_offset: int  # position of query 0 (= N_kv - N); padding keys lie past every query, so causality hides them
    block_idx: torch.Tensor  # (Hq, num_q_blocks, max_kept) int32 kept key blocks, ascending
    block_count: torch.Tensor  # (Hq, num_q_blocks) int32 how many entries of block_idx are real
    diag_count: torch.Tensor  # (num_q_blocks,) int32 how many of them (the last ones) lie in the diagonal segment
    kept: torch.Tensor  # (Hq,) kept (query block, key block) pairs per head
    visible: torch.Tensor  # (Hq,) causally visible pairs per head


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


def key_importance(q: torch.Tensor, k: torch.Tensor, block: int, scale: float) -> torch.Tensor:
    """(Hkv, N_kv): mean attention probability from the last query block, pooled over each KV group's heads."""
    n, hq, d = q.shape
    n_kv, hkv, _ = k.shape
    group = hq // hkv
    last = q[max(0, n - block):]
    rows = last.shape[0]
    future = torch.ones(rows, rows, dtype=torch.bool, device=q.device).triu_(1)  # among the last `rows` keys
    out = torch.empty(hkv, n_kv, dtype=torch.float32, device=q.device)
    for h in range(hkv):  # one KV head at a time bounds the (group x rows x N_kv) score buffer
        ql = (last[:, h * group:(h + 1) * group].transpose(0, 1) * scale).reshape(group * rows, d)
        scores = (ql @ k[:, h].T).view(group, rows, n_kv)
        scores[..., n_kv - rows:].masked_fill_(future, float("-inf"))
        out[h] = torch.softmax(scores, -1).mean((0, 1), dtype=torch.float32)  # probabilities in q's dtype
    return out


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


def pbs_select(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: PBSConfig, scale: float) -> PBSSelection:
    """Permute K/V and choose the key blocks each (query head, query block) attends to."""
    n, hq, d = q.shape
    n_kv, hkv, _ = k.shape
    group, bs, seg = hq // hkv, cfg.block_size, cfg.segment_size
    dev = q.device
    prefix = n_kv - n
    nkb, nqb = -(-n_kv // bs), -(-n // bs)
    npad = nkb * bs
    perm = _permutation(q, k, cfg, scale, npad)
    gather = perm.clamp(max=n_kv - 1)[..., None].expand(hkv, npad, d)
    keys = k.transpose(0, 1).gather(1, gather)
    values = v.transpose(0, 1).gather(1, gather)

    qm = _block_means(q.transpose(0, 1), n, bs).view(hkv, group, nqb, d)
    km = _block_means(keys, n_kv, bs)  # the real keys fill slots [0, N_kv): padding sorts last in its segment
    scores = torch.einsum("hgmd,hjd->hgmj", qm, km).reshape(hq, nqb, nkb) * scale

    # a key block is visible when its earliest possible key (its segment's start if permuted) is <= the block's
    # last query; the diagonal segment(s) start at the segment of the block's first query
    m = torch.arange(nqb, device=dev)
    q_first = prefix + m * bs
    q_last = prefix + torch.clamp((m + 1) * bs, max=n) - 1
    j = torch.arange(nkb, device=dev)
    block_seg = j * bs // seg * seg
    earliest = block_seg if cfg.permute else j * bs
    visible = earliest[None, :] <= q_last[:, None]
    diag = visible & (block_seg[None, :] >= (q_first // seg * seg)[:, None])
    forced = diag | (visible & (j == 0)[None, :])
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    keep = _choose(probs, visible, forced, cfg)

    counts = keep.sum(-1)
    max_kept = int(counts.max())
    slot = torch.where(keep, keep.cumsum(-1) - 1, max_kept)  # position in the compact list; max_kept: discarded
    idx = torch.zeros(hq, nqb, max_kept + 1, dtype=torch.int32, device=dev)
    idx.scatter_(-1, slot, j.to(torch.int32).expand(hq, nqb, nkb))
    return PBSSelection(keys=keys, values=values, key_pos=perm.to(torch.int32).contiguous(), q_offset=prefix,
                        block_idx=idx[..., :max_kept].contiguous(), block_count=counts.to(torch.int32),
                        diag_count=diag.sum(-1).to(torch.int32), kept=counts.sum(-1),
                        visible=visible.sum().expand(hq))
