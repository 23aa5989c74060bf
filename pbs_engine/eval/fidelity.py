"""Language-model and attention fidelity of each method against dense attention, on one long real sequence."""
from __future__ import annotations

import time
from collections import defaultdict

import torch

from pbs_engine.kernels import PBSConfig, flash_prefill, pbs_prefill
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


@torch.inference_mode()
def attention_fidelity(model, ids: list[int], methods: dict) -> list[dict]:
    """Per layer, ||o_method - o_dense|| / ||o_dense|| on the real Q/K/V captured from a dense forward pass."""
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
            out, stats = pbs_prefill(q, k, v, pbs, sm_scale=scale)
            err = (out.float() - dense).norm() / dense.norm()
            rows.append({"method": name, "layer": layer, "tokens": n, "rel_error": err.item(),
                         "density": stats.density})
    return rows
