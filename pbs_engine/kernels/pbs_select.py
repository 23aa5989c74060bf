"""PBS-Attn block selection, batched over heads on the device (no per-segment Python loop).

1. Importance of each key: attention mass from the last query block (softmax, mean over those queries and over the
   query heads of its KV group, so one permutation serves one KV head).
2. Permutation: inside each segment, keys sorted by importance, so the keys that matter cluster into few blocks.
3. Block scores: mean-pooled query blocks against mean-pooled (permuted) key blocks, softmaxed over the visible
   blocks. Per query block keep the first key block and every block of its diagonal segment(s), then the fewest
   other blocks whose mass, added to theirs, reaches the threshold (or a fixed fraction in budget mode).
4. The kept blocks become a compact list per (query head, query block), ascending, padded to the longest list.
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
    kept: torch.Tensor  # (Hq,) kept (query block, key block) pairs per head
    visible: torch.Tensor  # (Hq,) causally visible pairs per head


@dataclass
class PBSStats:
    kept: torch.Tensor
    visible: torch.Tensor

    @property
    def density(self) -> float:
        """Kept block pairs over causally visible block pairs, all heads."""
        return (self.kept.sum() / self.visible.sum()).item()

    @property
    def density_per_head(self) -> list[float]:
        return (self.kept / self.visible).tolist()


def _block_means(x: torch.Tensor, valid: torch.Tensor, block: int) -> torch.Tensor:
    """x (H, Npad, D), valid (H or 1, Npad) -> (H, Npad / block, D) means over the valid rows of each block."""
    h, n, d = x.shape
    w = valid.to(torch.float32).reshape(valid.shape[0], n // block, block, 1)
    s = (x.float().reshape(h, n // block, block, d) * w).sum(2)
    return s / w.sum(2).clamp(min=1)


def key_importance(q: torch.Tensor, k: torch.Tensor, block: int, scale: float) -> torch.Tensor:
    """(Hkv, N_kv): mean attention probability from the last query block, pooled over each KV group's heads."""
    n, hq, d = q.shape
    n_kv, hkv, _ = k.shape
    group = hq // hkv
    last = q[max(0, n - block):]
    q_pos = torch.arange(n_kv - last.shape[0], n_kv, device=q.device)
    future = torch.arange(n_kv, device=q.device)[None, :] > q_pos[:, None]
    out = torch.empty(hkv, n_kv, dtype=torch.float32, device=q.device)
    for h in range(hkv):  # one KV head at a time bounds the (group x L x N_kv) score buffer
        ql = last[:, h * group:(h + 1) * group].transpose(0, 1)  # (G, L, D)
        scores = (ql @ k[:, h].T).float() * scale
        out[h] = scores.masked_fill_(future, float("-inf")).softmax(-1).mean((0, 1))
    return out


def pbs_select(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: PBSConfig, scale: float) -> PBSSelection:
    n, hq, d = q.shape
    n_kv, hkv, _ = k.shape
    group, bs, seg = hq // hkv, cfg.block_size, cfg.segment_size
    dev = q.device
    prefix = n_kv - n
    nkb = -(-n_kv // bs)
    npad = nkb * bs
    if cfg.permute:
        nseg = -(-n_kv // seg)
        imp = torch.full((hkv, nseg * seg), float("-inf"), device=dev)
        imp[:, :n_kv] = key_importance(q, k, bs, scale)
        order = imp.view(hkv, nseg, seg).argsort(dim=-1, descending=True, stable=True)
        perm = (order + torch.arange(nseg, device=dev)[:, None] * seg).view(hkv, -1)[:, :npad]
    else:
        perm = torch.arange(npad, device=dev).expand(hkv, npad)
    gather = perm.clamp(max=n_kv - 1)[..., None].expand(hkv, npad, d)
    keys = k.transpose(0, 1).gather(1, gather)
    values = v.transpose(0, 1).gather(1, gather)
    key_valid = perm < n_kv

    # mean-pooled blocks and their scores
    nqb = -(-n // bs)
    q_rows = torch.zeros(hq, nqb * bs, d, dtype=q.dtype, device=dev)
    q_rows[:, :n] = q.transpose(0, 1)
    q_valid = (torch.arange(nqb * bs, device=dev) < n)[None]
    qm = _block_means(q_rows, q_valid, bs).view(hkv, group, nqb, d)
    km = _block_means(keys, key_valid, bs)
    scores = torch.einsum("hgmd,hjd->hgmj", qm, km).reshape(hq, nqb, nkb) * scale

    # which key blocks each query block sees, must keep, and may choose
    m = torch.arange(nqb, device=dev)
    q_first = prefix + m * bs
    q_last = prefix + torch.clamp((m + 1) * bs, max=n) - 1
    diag_start = q_first // seg * seg
    block_seg = torch.arange(nkb, device=dev) * bs // seg * seg
    visible = block_seg[None, :] <= q_last[:, None]  # (nqb, nkb)
    forced = visible & ((block_seg[None, :] >= diag_start[:, None]) | (torch.arange(nkb, device=dev) == 0)[None])
    candidate = visible & ~forced
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    cand = probs.masked_fill(~candidate, -1.0)
    sorted_p, order = cand.sort(dim=-1, descending=True)
    n_cand = candidate.sum(-1).expand(hq, nqb)
    n_forced = forced.sum(-1).expand(hq, nqb)
    if cfg.budget is not None:
        n_keep = torch.ceil(cfg.budget * visible.sum(-1).float()).long().expand(hq, nqb) - n_forced
    elif cfg.threshold >= 1.0:
        n_keep = n_cand
    else:
        forced_mass = (probs * forced).sum(-1, keepdim=True)
        before = forced_mass + sorted_p.clamp(min=0).cumsum(-1) - sorted_p.clamp(min=0)
        n_keep = ((before < cfg.threshold) & (sorted_p >= 0)).sum(-1)
    n_keep = torch.minimum(torch.clamp(n_keep, min=cfg.min_blocks - n_forced), n_cand)
    if cfg.max_blocks is not None:
        n_keep = torch.minimum(n_keep, (cfg.max_blocks - n_forced).clamp(min=0))
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(nkb, device=dev).expand_as(order))
    keep = forced | (candidate & (rank < n_keep.clamp(min=0)[..., None]))

    counts = keep.sum(-1)
    max_kept = int(counts.max())
    idx = keep.to(torch.int8).sort(dim=-1, descending=True, stable=True).indices[..., :max_kept]
    return PBSSelection(keys=keys, values=values, key_pos=perm.to(torch.int32).contiguous(), q_offset=prefix,
                        block_idx=idx.to(torch.int32).contiguous(), block_count=counts.to(torch.int32),
                        kept=keep.sum((1, 2)), visible=visible.sum().expand(hq))
