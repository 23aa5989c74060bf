"""What `PBSConfig.query_reps` (pooled queries per query block) costs: selection time and sparse attention time
against the dense kernel, threshold and budget modes. Qwen2.5-7B heads (28/4, d=128); random Q/K/V have diffuse
attention, so the threshold rows keep many blocks: their selection time is the point, not their density.
Run on a GPU: PYTHONPATH=. python benchmarks/query_reps.py [lengths, default 32768,131072]
(docs/results/h100/query-reps.json)."""
import sys
from dataclasses import replace

import torch
import triton

from pbs_engine.kernels import PBSConfig, flash_prefill
from pbs_engine.kernels.pbs_prefill import pbs_attention_triton
from pbs_engine.kernels.pbs_select import pbs_select


def ms(f):
    return triton.testing.do_bench(f, warmup=5, rep=30, return_mode="median")


def main(lengths: list[int]) -> None:
    torch.manual_seed(0)
    hq, hkv, d = 28, 4, 128
    for n in lengths:
        q, k, v = (torch.randn(n, h, d, device="cuda", dtype=torch.bfloat16) for h in (hq, hkv, hkv))
        cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
        dense = ms(lambda: flash_prefill(q, k, v, cu, cu))
        print(f"n={n} dense {dense:.3f} ms", flush=True)
        for label, base in (("budget0.1", PBSConfig(budget=0.1)), ("t0.6", PBSConfig(threshold=0.6))):
            for reps in (1, 2, 4, 8, 16):
                cfg = replace(base, query_reps=reps)
                sel = pbs_select(q, k, v, cfg, d ** -0.5)
                density = (sel.kept.sum() / sel.visible.sum()).item()
                select = ms(lambda: pbs_select(q, k, v, cfg, d ** -0.5))
                attend = ms(lambda: pbs_attention_triton(q, sel, cfg, d ** -0.5))
                print(f"n={n} {label:9s} query_reps={reps:2d} density={density:.3f} select={select:.3f} ms "
                      f"({select / dense:.3f} of dense) attend={attend:.3f} ms total/dense="
                      f"{(select + attend) / dense:.3f}", flush=True)
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main([int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "32768,131072").split(",")])
