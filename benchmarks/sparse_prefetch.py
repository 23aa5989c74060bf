"""Sparse PBS kernel cost per kept block against the dense kernel: block index prefetched or not, per-head or
per-KV-group (shared) lists, mean or lse block scores; selection time. Qwen2.5-7B heads, random Q/K/V, 32K and 128K.
Run on a GPU: PYTHONPATH=. python benchmarks/sparse_prefetch.py (what it showed: docs/history.md, Kernels)."""
from dataclasses import replace

import torch
import triton

from pbs_engine.kernels import PBSConfig, flash_prefill
from pbs_engine.kernels.pbs_select import pbs_select
from pbs_engine.kernels.pbs_prefill import pbs_attention_triton


def ms(f):
    return triton.testing.do_bench(f, warmup=5, rep=30, return_mode="median")


torch.manual_seed(0)
for n in (32768, 131072):
    hq, hkv, d = 28, 4, 128
    q = torch.randn(n, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(n, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(n, hkv, d, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    dense = ms(lambda: flash_prefill(q, k, v, cu, cu))
    print(f"n={n} dense {dense:.3f} ms", flush=True)
    s = d ** -0.5
    for label, cfg in [("budget0.1", PBSConfig(budget=0.1)), ("budget0.2", PBSConfig(budget=0.2)),
                       ("t1.0", PBSConfig(threshold=1.0)), ("t0.9", PBSConfig(threshold=0.9))]:
        for score in ("mean", "lse"):
            if score == "lse" and label.startswith("t1"):
                continue
            for shared in (False, True):
                c = replace(cfg, block_score=score, shared_selection=shared)
                sel = pbs_select(q, k, v, c, s)
                dens = (sel.kept.sum() / sel.visible.sum()).item()
                sel_ms = ms(lambda: pbs_select(q, k, v, c, s))
                a_pf = ms(lambda: pbs_attention_triton(q, sel, c, s, prefetch=True))
                a_np = ms(lambda: pbs_attention_triton(q, sel, c, s, prefetch=False))
                print(f"n={n} {label:10s} score={score} shared={shared!s:5s} density={dens:.3f} select={sel_ms:.3f} "
                      f"attend_prefetch={a_pf:.3f} attend_noprefetch={a_np:.3f} per_block_vs_dense="
                      f"{min(a_pf, a_np) / (dens * dense):.3f} total/dense={(sel_ms + min(a_pf, a_np)) / dense:.3f}",
                      flush=True)
    del q, k, v
    torch.cuda.empty_cache()
