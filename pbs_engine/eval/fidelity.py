"""Language-model and attention fidelity of each method against dense attention, on one long real sequence."""
from __future__ import annotations

import time
from collections import defaultdict

import torch

from pbs_engine.kernels import PBSConfig, flash_prefill, pbs_select
from pbs_engine.kernels.pbs_prefill import pbs_attention
from pbs_engine.kernels.selection import PBSStats
from pbs_engine.models.layers.attention import Attention, AttentionMetadata


def _meta(n: int, device, attention: str, pbs: PBSConfig | None, stats: list | None) -> AttentionMetadata:
    cu = torch.tensor([0, n], dtype=torch.int32, device=device)
    return AttentionMetadata(is_prefill=True, slot_mapping=None,
                             cu_seqlens_q=cu, cu_seqlens_k=cu, seq_lens_q=[n], seq_lens_k=[n],
                             prefill_method=attention, pbs=pbs, pbs_stats=stats)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _predictions(model, hidden: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Greedy next-token prediction at every position but the last, a chunk of positions' logits at a time."""
    return torch.cat([model.compute_logits(hidden[i:min(i + chunk, len(hidden) - 1)]).argmax(-1)
                      for i in range(0, len(hidden) - 1, chunk)])


@torch.inference_mode()
def lm_fidelity(model, ids: list[int], methods: dict, last: int = 1024) -> list[dict]:
    """Next-token NLL on the last `last` tokens, top-1 agreement and KL(dense || method) there, top-1 agreement over
    every position of the sequence, block density by layer, and prefill time, for every method. `methods` must
    start with "dense"."""
    device = next(model.parameters()).device
    n = len(ids)
    x = torch.tensor(ids, device=device)
    positions = torch.arange(n, device=device)
    targets = x[n - last:]
    rows, dense_lp, dense_pred = [], None, None
    for name, (attention, pbs) in methods.items():
        stats: list = []
        meta = _meta(n, device, attention, pbs, stats)
        if device.type == "cuda":  # compile every kernel specialisation this length needs before timing
            model(x, positions, _meta(n, device, attention, pbs, None))
        _sync(device)
        start = time.perf_counter()
        hidden = model(x, positions, meta)
        _sync(device)
        seconds = time.perf_counter() - start
        lp = torch.log_softmax(model.compute_logits(hidden[n - last - 1:n - 1]), dim=-1)
        pred = _predictions(model, hidden)
        if dense_lp is None:
            dense_lp, dense_pred = lp, pred
        by_layer = defaultdict(list)
        for layer, _, s in stats:
            by_layer[layer].append(s.density)
        rows.append({
            "method": name, "tokens": n, "scored": last,
            "nll": -lp.gather(1, targets[:, None]).mean().item(),
            "top1_agreement": (lp.argmax(-1) == dense_lp.argmax(-1)).float().mean().item(),
            "kl_from_dense": (dense_lp.exp() * (dense_lp - lp)).sum(-1).mean().item(),
            "top1_agreement_all": (pred == dense_pred).float().mean().item(),
            "density": sum(sum(v) for v in by_layer.values()) / max(1, sum(len(v) for v in by_layer.values()))
            if by_layer else 1.0,
            "density_by_layer": [sum(by_layer[i]) / len(by_layer[i]) for i in sorted(by_layer)],
            "prefill_s": seconds,
        })
    return rows


def kept_mass(q: torch.Tensor, k: torch.Tensor, sel, cfg: PBSConfig, scale: float,
              chunk_blocks: int = 8) -> torch.Tensor:
    """The attention recall of a selection: per (query head, query), the share of its exact causal attention
    (softmax over every visible key, float32) that falls on the keys of the blocks `sel` (a PBSSelection of q, k)
    kept -> (Hq, N) float32 in [0, 1]. Query blocks are scored `chunk_blocks` at a time."""
    n, hq, _ = q.shape
    n_kv, hkv, _ = k.shape
    group, bs = hq // hkv, cfg.block_size
    nqb, nkb = sel.block_count.shape[1], sel.keys.shape[1] // bs
    device = q.device
    listed = torch.arange(sel.block_idx.shape[2], device=device) < sel.block_count[..., None]
    keep = torch.zeros(hq, nqb, nkb + 1, dtype=torch.bool, device=device)
    keep.scatter_(-1, torch.where(listed, sel.block_idx.long(), nkb), True)
    keep = keep[..., :nkb]
    key_pos = sel.key_pos.long().repeat_interleave(group, 0)  # (Hq, Npad): slot -> original position
    n_pos = int(key_pos.max()) + 1
    keys = k.transpose(0, 1).float().repeat_interleave(group, 0)  # (Hq, N_kv, D)
    q_pos = torch.arange(n, device=device) + n_kv - n
    out = torch.empty(hq, n, dtype=torch.float32, device=device)
    for m0 in range(0, nqb, chunk_blocks):
        m1 = min(nqb, m0 + chunk_blocks)
        r0, r1 = m0 * bs, min(n, m1 * bs)
        s = torch.einsum("rhd,hkd->hrk", q[r0:r1].float(), keys) * scale
        s.masked_fill_(torch.arange(n_kv, device=device)[None, None, :] > q_pos[None, r0:r1, None], float("-inf"))
        slots = keep[:, m0:m1].repeat_interleave(bs, -1)  # (Hq, blocks, Npad) kept slots
        by_pos = torch.zeros(hq, m1 - m0, n_pos, dtype=torch.bool, device=device)
        by_pos.scatter_(-1, key_pos[:, None, :].expand(-1, m1 - m0, -1), slots)
        rows = (torch.arange(r0, r1, device=device) - r0) // bs
        kept = by_pos[:, rows, :n_kv]  # (Hq, rows, N_kv)
        out[:, r0:r1] = (s.masked_fill(~kept, float("-inf")).logsumexp(-1) - s.logsumexp(-1)).exp()
        del s, kept, by_pos
    return out


@torch.inference_mode()
def attention_fidelity(model, ids: list[int], methods: dict) -> list[dict]:
    """Per layer, ||o_method - o_dense|| / ||o_dense|| on the real Q/K/V captured from a dense forward pass, and the
    attention recall of the selection (`kept_mass`: its mean over heads and queries, its 1st percentile, and the
    mean of the worst head)."""
    device = next(model.parameters()).device
    n = len(ids)
    captured: dict[int, tuple] = {}

    def capture(module: Attention, args):
        q, k, v, _ = args
        captured[module.layer_idx] = (q.clone(), k.clone(), v.clone(), module.scale)

    hooks = [attn.register_forward_pre_hook(capture) for attn in model.attention_layers()]
    try:
        model(torch.tensor(ids, device=device), torch.arange(n, device=device), _meta(n, device, "dense", None, None))
    finally:
        for h in hooks:
            h.remove()
    cu = torch.tensor([0, n], dtype=torch.int32, device=device)
    rows = []
    for layer in sorted(captured):
        q, k, v, scale = captured[layer]
        dense = flash_prefill(q, k, v, cu, cu, causal=True, sm_scale=scale).float()
        for name, (attention, pbs) in methods.items():
            if attention != "pbs":
                continue
            sel = pbs_select(q, k, v, pbs, scale)  # one selection for the output and the recall
            err = (pbs_attention(q, sel, pbs, scale).float() - dense).norm() / dense.norm()
            recall = kept_mass(q, k, sel, pbs, scale)  # what the selection kept of the true attention
            rows.append({"method": name, "layer": layer, "tokens": n, "rel_error": err.item(),
                         "density": PBSStats(kept=sel.kept, visible=sel.visible).density,
                         "recall_mean": recall.mean().item(), "recall_worst_head": recall.mean(1).min().item(),
                         "recall_p01": torch.quantile(recall.flatten()[::max(1, recall.numel() >> 24)], 0.01).item()})
    return rows
