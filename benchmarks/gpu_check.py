"""Kernel checks and tuning on one GPU, one command: every kernel in bf16 (PBS in fp32) at realistic sizes against
its reference, then timings of tile variants of the dense kernel, PBS split into selection and attention, and
decode against a device copy. Prints tables; `--quick` skips the timings."""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import torch
import triton

from pbs_engine.kernels import (PBSConfig, apply_rope_ref, paged_decode_ref, pbs_prefill_ref, rms_norm_ref,
                                silu_and_mul_ref)
from pbs_engine.kernels.flash_prefill import flash_prefill_triton
from pbs_engine.kernels.fused import rms_norm_triton, silu_and_mul_triton
from pbs_engine.kernels.paged_decode import paged_decode_triton
from pbs_engine.kernels.pbs_prefill import pbs_attention_triton, pbs_prefill_triton
from pbs_engine.kernels.pbs_select import pbs_select
from pbs_engine.kernels.importance import key_importance_ref, key_importance_triton
from pbs_engine.kernels.rope import apply_rope_triton, build_cos_sin_cache, rope_inv_freq


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def graph_ms(fn) -> float:
    """GPU time without launch overhead (the engine replays decode from CUDA graphs)."""
    fn()
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def sdpa_ref(q, k, v, prefix):
    group = q.shape[1] // k.shape[1]
    qt, kt, vt = (x.float().transpose(0, 1) for x in (q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)))
    mask = torch.arange(len(k), device=q.device)[None] <= torch.arange(len(q), device=q.device)[:, None] + prefix
    return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).transpose(0, 1)


def checks() -> None:
    dev, bf = "cuda", torch.bfloat16
    for hq, hkv, d in ((28, 4, 128), (14, 2, 64), (32, 8, 128), (8, 8, 32)):
        lens_q, lens_k = [3000, 1, 517], [7777, 300, 517]
        cq = torch.tensor([0, *lens_q], device=dev).cumsum(0).int()
        ck = torch.tensor([0, *lens_k], device=dev).cumsum(0).int()
        q, k, v = (torch.randn(sum(n), h, d, device=dev, dtype=bf) for n, h in ((lens_q, hq), (lens_k, hkv), (lens_k, hkv)))
        out = flash_prefill_triton(q, k, v, cq, ck)
        errs = [rel(out[cq[i]:cq[i + 1]], sdpa_ref(q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]],
                                                     lens_k[i] - lens_q[i])) for i in range(3)]
        print(f"flash_prefill {hq}/{hkv} d{d} varlen rel err {max(errs):.2e}", "OK" if max(errs) < 1e-2 else "FAIL")
    for n, n_kv in ((2000, 2000), (1500, 2600)):
        q, k, v = torch.randn(n, 28, 128, device=dev), torch.randn(n_kv, 4, 128, device=dev), torch.randn(n_kv, 4, 128, device=dev)
        for cfg in (PBSConfig(threshold=0.9), PBSConfig(budget=0.3, permute=False), PBSConfig(threshold=1.0)):
            out, st = pbs_prefill_triton(q, k, v, cfg)
            ref, rst = pbs_prefill_ref(q, k, v, cfg)
            e = rel(out, ref)
            same = st.kept.tolist() == rst.kept.tolist()
            print(f"pbs fp32 {n}/{n_kv} {cfg.threshold} {cfg.budget} perm={cfg.permute} density {st.density:.3f} "
                  f"rel err {e:.2e} same selection {same}", "OK" if e < 1e-2 and same else "FAIL")
        qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
        out, st = pbs_prefill_triton(qb, kb, vb, PBSConfig(threshold=1.0))
        e = rel(out, sdpa_ref(qb, kb, vb, n_kv - n))
        print(f"pbs bf16 threshold 1 vs dense rel err {e:.2e} density {st.density}", "OK" if e < 1e-2 else "FAIL")
    for page in (16, 256):
        kc = torch.randn(400, page, 4, 128, device=dev, dtype=bf)
        vc = torch.randn_like(kc)
        tables = torch.randperm(400, device=dev)[:360].int().view(3, 120)
        lens = torch.tensor([1, 1000, 120 * page], device=dev, dtype=torch.int32)
        q = torch.randn(3, 28, 128, device=dev, dtype=bf)
        e = rel(paged_decode_triton(q, kc, vc, tables, lens), paged_decode_ref(q, kc, vc, tables, lens))
        print(f"paged_decode page {page} rel err {e:.2e}", "OK" if e < 1e-2 else "FAIL")
    for n, hq, hkv, d in ((5000, 28, 4, 128), (3000, 14, 2, 64)):
        q, k = torch.randn(n, hq, d, device=dev, dtype=bf), torch.randn(n + 700, hkv, d, device=dev, dtype=bf)
        a, b = key_importance_triton(q, k, 128, d ** -0.5), key_importance_ref(q, k, 128, d ** -0.5)
        print(f"key_importance {hq}/{hkv} d{d} rel err {rel(a, b):.2e}", "OK" if rel(a, b) < 2e-2 else "FAIL")
    x, r, w = (torch.randn(*shape, device=dev, dtype=bf) for shape in ((1000, 3584), (1000, 3584), (3584,)))
    a, b = rms_norm_triton(x, w, 1e-6, r), rms_norm_ref(x, w, 1e-6, r)
    print(f"rms_norm+residual rel err {rel(a[0], b[0]):.2e} residual equal {torch.equal(a[1], b[1])}")
    g = torch.randn(1000, 2 * 18944, device=dev, dtype=bf)
    print(f"silu_and_mul rel err {rel(silu_and_mul_triton(g), silu_and_mul_ref(g)):.2e}")
    cache = build_cos_sin_cache(rope_inv_freq(128, 1e6), 40000).float().to(dev)
    pos = torch.randint(0, 40000, (1000,), device=dev)
    q, k = torch.randn(1000, 28, 128, device=dev, dtype=bf), torch.randn(1000, 4, 128, device=dev, dtype=bf)
    ours, ref = apply_rope_triton(q, k, pos, cache), apply_rope_ref(q, k, pos, cache)
    print(f"rope rel err q {rel(ours[0], ref[0]):.2e} k {rel(ours[1], ref[1]):.2e}")


def tile_sweep(n: int, variants: list[tuple[int, int, int, int]]) -> None:
    hq, hkv, d = 28, 4, 128
    q = torch.randn(n, hq, d, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(n, hkv, d, device="cuda", dtype=torch.bfloat16), torch.randn(n, hkv, d, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    flops = 2 * n * n * d * hq
    from torch.nn.attention import SDPBackend, sdpa_kernel
    qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k.repeat_interleave(7, 1), v.repeat_interleave(7, 1)))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        t = ms(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True))
    print(f"{n} cudnn {t:.2f} ms {flops / t / 1e9:.0f} TFLOP/s")
    fp = sys.modules["pbs_engine.kernels.flash_prefill"]  # the package's `flash_prefill` is the function
    default = fp.prefill_tiles
    for tiles in variants:
        fp.prefill_tiles = lambda *_: tiles
        for tma in (False, True):
            try:
                t = ms(lambda: flash_prefill_triton(q, k, v, cu, cu, tma=tma))
                print(f"{n} tiles {tiles} tma={tma}: {t:.2f} ms {flops / t / 1e9:.0f} TFLOP/s")
            except Exception as e:  # out of shared memory etc.
                print(f"{n} tiles {tiles} tma={tma}: failed {type(e).__name__}: {str(e)[:100]}")
    fp.prefill_tiles = default


def pbs_timing(n: int, budgets: list[float]) -> None:
    hq, hkv, d = 28, 4, 128
    q = torch.randn(n, hq, d, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(n, hkv, d, device="cuda", dtype=torch.bfloat16), torch.randn(n, hkv, d, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    dense = ms(lambda: flash_prefill_triton(q, k, v, cu, cu))
    print(f"pbs {n}: dense {dense:.2f} ms")
    for cfg in [PBSConfig(budget=b) for b in budgets] + [PBSConfig(), PBSConfig(permute=False)]:
        sel = pbs_select(q, k, v, cfg, d ** -0.5)
        density = (sel.kept.sum() / sel.visible.sum()).item()
        total = ms(lambda: pbs_prefill_triton(q, k, v, cfg))
        select = ms(lambda: pbs_select(q, k, v, cfg, d ** -0.5))
        attend = ms(lambda: pbs_attention_triton(q, sel, cfg, d ** -0.5))
        print(f"  budget {cfg.budget} thr {cfg.threshold} perm {cfg.permute}: density {density:.3f} total {total:.2f} "
              f"select {select:.2f} attend {attend:.2f} ms; total/dense {total / dense:.3f} target {density + 0.05:.3f}")
    t_ref = ms(lambda: key_importance_ref(q, k, 128, d ** -0.5))
    t_tri = ms(lambda: key_importance_triton(q, k, 128, d ** -0.5))
    print(f"  key importance: torch {t_ref:.2f} ms, triton {t_tri:.2f} ms")
    pp = sys.modules["pbs_engine.kernels.pbs_prefill"]
    default = pp.sparse_tiles
    for budget in (0.1, 0.2):
        cfg = PBSConfig(budget=budget)
        sel = pbs_select(q, k, v, cfg, d ** -0.5)
        for tiles in [(128, 8, 2), (128, 8, 3), (64, 8, 3), (64, 4, 3), (128, 4, 2)]:
            pp.sparse_tiles = lambda *_: tiles
            try:
                t = ms(lambda: pbs_attention_triton(q, sel, cfg, d ** -0.5))
                print(f"  budget {budget} sparse tiles {tiles}: attend {t:.2f} ms = {t / dense:.3f} of dense")
            except Exception as e:
                print(f"  sparse tiles {tiles}: failed {type(e).__name__}: {str(e)[:100]}")
        pp.sparse_tiles = default


def select_profile(n: int) -> None:
    """Where the selection's time goes, by CUDA kernel."""
    q = torch.randn(n, 28, 128, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(n, 4, 128, device="cuda", dtype=torch.bfloat16), torch.randn(n, 4, 128, device="cuda", dtype=torch.bfloat16)
    cfg = PBSConfig(budget=0.1)
    pbs_select(q, k, v, cfg, 128 ** -0.5)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        pbs_select(q, k, v, cfg, 128 ** -0.5)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))


def decode_timing(batches: list[int], contexts: list[int], variants: list[tuple[int, int, int, int]]) -> None:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    copy_bw = 2 * src.numel() / (ms(lambda: src.clone()) * 1e-3)
    print(f"copy {copy_bw / 1e12:.2f} TB/s")
    del src
    for b in batches:
        for ctx in contexts:
            pages = ctx // 256
            kc = torch.randn(b * pages, 256, 4, 128, device="cuda", dtype=torch.bfloat16)
            vc = torch.randn_like(kc)
            tables = torch.randperm(b * pages, device="cuda", dtype=torch.int32).view(b, pages)
            lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
            q = torch.randn(b, 28, 128, device="cuda", dtype=torch.bfloat16)
            pd = sys.modules["pbs_engine.kernels.paged_decode"]
            default = pd.decode_tiles
            for tiles in variants:
                pd.decode_tiles = lambda *_: tiles
                t = graph_ms(lambda: paged_decode_triton(q, kc, vc, tables, lens))
                bw = 2 * kc.numel() * 2 / (t * 1e-3)
                print(f"decode b{b} ctx {ctx} {tiles}: {t * 1e3:.1f} us {bw / 1e12:.2f} TB/s = {bw / copy_bw:.2f} of copy")
            pd.decode_tiles = default
            del kc, vc


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--parts", default="checks,tiles,pbs,decode")
    args = p.parse_args(argv)
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    parts = args.parts.split(",")
    if "checks" in parts:
        checks()
    if args.quick:
        return 0
    if "tiles" in parts:
        variants = [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (128, 128, 8, 2)]
        tile_sweep(32768, variants)
        tile_sweep(131072, variants)
    if "pbs" in parts:
        pbs_timing(131072, [0.05, 0.1, 0.2])
    if "profile" in parts:
        select_profile(131072)
    if "decode" in parts:
        decode_timing([1], [4096, 65536, 131072], [(64, 4, 3, 4), (64, 4, 3, 8), (64, 4, 3, 16), (32, 4, 3, 8),
                                                   (128, 8, 2, 8), (64, 4, 2, 2)])
        decode_timing([64], [65536], [(64, 4, 3, 4), (64, 4, 3, 1)])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
