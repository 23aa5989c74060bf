"""`pbs-engine bench check`: every Triton kernel against its reference at realistic sizes on the GPU (bf16; PBS
also in fp32 with its selection compared exactly). `pbs-engine bench tiles`: launch shapes of the dense, sparse
and decode kernels swept, each timed against its peer in the same run."""
from __future__ import annotations

import argparse

import torch

from pbs_engine.bench.common import device_name, gpu_ms, graph_ms, numbers, print_table, versions
from pbs_engine.kernels import (PBSConfig, apply_rope_ref, paged_decode_ref, pbs_prefill_ref, rms_norm_ref,
                                silu_and_mul_ref)
from pbs_engine.kernels.flash_prefill import flash_prefill_triton
from pbs_engine.kernels.fused import rms_norm_triton, silu_and_mul_triton
from pbs_engine.kernels.importance import key_importance_ref, key_importance_triton
from pbs_engine.kernels.paged_decode import paged_decode_triton
from pbs_engine.kernels.pbs_prefill import pbs_attention_triton, pbs_prefill_triton
from pbs_engine.kernels.selection import pbs_select
from pbs_engine.kernels.rope import (apply_rope_triton, build_cos_sin_cache, rope_and_cache_ref,
                                     rope_and_cache_triton, rope_inv_freq)

HEADS = (28, 4, 128)  # Qwen2.5-7B: query heads, KV heads, head dim
DENSE_TILES = [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (128, 128, 8, 2)]
SPARSE_TILES = [(128, 8, 2), (128, 8, 3), (64, 8, 3), (64, 4, 3), (128, 4, 2)]
DECODE_TILES = [(64, 4, 3, 4), (64, 4, 3, 8), (64, 4, 3, 16), (32, 4, 3, 8), (128, 8, 2, 8), (64, 4, 2, 2)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _sdpa_ref(q, k, v, prefix):
    group = q.shape[1] // k.shape[1]
    qt, kt, vt = (x.float().transpose(0, 1) for x in (q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)))
    mask = torch.arange(len(k), device=q.device)[None] <= torch.arange(len(q), device=q.device)[:, None] + prefix
    return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).transpose(0, 1)


def check_rows() -> list[dict]:
    """One row per (kernel, case): the relative error against the reference and whether it is within bounds."""
    dev, bf, rows = "cuda", torch.bfloat16, []

    def row(kernel: str, case: str, err: float, bound: float, **extra) -> None:
        rows.append({"kernel": kernel, "case": case, "rel_err": err, "ok": err < bound, **extra})

    for hq, hkv, d in ((28, 4, 128), (14, 2, 64), (32, 8, 128), (8, 8, 32)):
        lens_q, lens_k = [3000, 1, 517], [7777, 300, 517]
        cq = torch.tensor([0, *lens_q], device=dev).cumsum(0).int()
        ck = torch.tensor([0, *lens_k], device=dev).cumsum(0).int()
        q, k, v = (torch.randn(sum(n), h, d, device=dev, dtype=bf)
                   for n, h in ((lens_q, hq), (lens_k, hkv), (lens_k, hkv)))
        out = flash_prefill_triton(q, k, v, cq, ck)
        errs = [rel(out[cq[i]:cq[i + 1]], _sdpa_ref(q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]],
                                                      lens_k[i] - lens_q[i])) for i in range(3)]
        row("flash_prefill", f"{hq}/{hkv} d{d} varlen with prefix", max(errs), 1e-2)
    for n, n_kv in ((2000, 2000), (1500, 2600)):
        q, k, v = (torch.randn(m, h, 128, device=dev) for m, h in ((n, 28), (n_kv, 4), (n_kv, 4)))
        for cfg in (PBSConfig(), PBSConfig(threshold=0.9), PBSConfig(budget=0.3), PBSConfig(threshold=1.0)):
            out, st = pbs_prefill_triton(q, k, v, cfg)
            ref, rst = pbs_prefill_ref(q, k, v, cfg)
            same = st.kept.tolist() == rst.kept.tolist()
            row("pbs_prefill fp32", f"{n}/{n_kv} threshold {cfg.threshold} budget {cfg.budget}",
                rel(out, ref) if same else float("inf"), 1e-2, density=st.density, same_selection=same)
        qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
        out, st = pbs_prefill_triton(qb, kb, vb, PBSConfig(threshold=1.0))
        row("pbs_prefill bf16", f"{n}/{n_kv} threshold 1 vs dense", rel(out, _sdpa_ref(qb, kb, vb, n_kv - n)), 1e-2)
    for page in (16, 256):
        kc = torch.randn(400, page, 4, 128, device=dev, dtype=bf)
        vc = torch.randn_like(kc)
        tables = torch.randperm(400, device=dev)[:360].int().view(3, 120)
        lens = torch.tensor([1, 1000, 120 * page], device=dev, dtype=torch.int32)
        q = torch.randn(3, 28, 128, device=dev, dtype=bf)
        row("paged_decode", f"page {page}",
            rel(paged_decode_triton(q, kc, vc, tables, lens), paged_decode_ref(q, kc, vc, tables, lens)), 1e-2)
    for n, hq, hkv, d in ((5000, 28, 4, 128), (3000, 14, 2, 64)):
        q, k = torch.randn(n, hq, d, device=dev, dtype=bf), torch.randn(n + 700, hkv, d, device=dev, dtype=bf)
        row("key_importance", f"{hq}/{hkv} d{d}",
            rel(key_importance_triton(q, k, 128, d ** -0.5), key_importance_ref(q, k, 128, d ** -0.5)), 2e-2)
    x, r, w = (torch.randn(*shape, device=dev, dtype=bf) for shape in ((1000, 3584), (1000, 3584), (3584,)))
    a, b = rms_norm_triton(x, w, 1e-6, r), rms_norm_ref(x, w, 1e-6, r)
    row("rms_norm", "with residual", max(rel(a[0], b[0]), rel(a[1], b[1])), 1e-2)
    g = torch.randn(1000, 2 * 18944, device=dev, dtype=bf)
    row("silu_and_mul", "7B MLP width", rel(silu_and_mul_triton(g), silu_and_mul_ref(g)), 1e-2)
    cache = build_cos_sin_cache(rope_inv_freq(128, 1e6), 40000).float().to(dev)
    pos = torch.randint(0, 40000, (1000,), device=dev)
    q, k = torch.randn(1000, 28, 128, device=dev, dtype=bf), torch.randn(1000, 4, 128, device=dev, dtype=bf)
    ours, ref = apply_rope_triton(q, k, pos, cache), apply_rope_ref(q, k, pos, cache)
    row("rope", "positions up to 40K", max(rel(ours[0], ref[0]), rel(ours[1], ref[1])), 1e-2)
    v, slots = torch.randn_like(k), torch.randperm(4000, device=dev)[:1000]
    caches = [torch.randn(4000, 4, 128, device=dev, dtype=bf) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    ours = rope_and_cache_triton(q, k, v, pos, cache, slots, *caches)
    ref = rope_and_cache_ref(q, k, v, pos, cache, slots, *ref_caches)
    row("rope_and_cache", "1000 tokens into a 4000-slot cache",
        max(rel(a, b) for a, b in zip((*ours, *caches), (*ref, *ref_caches))), 1e-2)
    return rows


def _qkv(n: int) -> tuple[torch.Tensor, ...]:
    hq, hkv, d = HEADS
    return tuple(torch.randn(n, h, d, device="cuda", dtype=torch.bfloat16) for h in (hq, hkv, hkv))


def dense_tile_rows(lengths: list[int]) -> list[dict]:
    """The dense kernel under each launch shape, pointers and TMA, against cuDNN SDPA in TFLOP/s."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    hq, hkv, d = HEADS
    rows = []
    for n in lengths:
        q, k, v = _qkv(n)
        cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
        flops = 2 * n * n * d * hq
        qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k.repeat_interleave(hq // hkv, 1),
                                                         v.repeat_interleave(hq // hkv, 1)))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn = gpu_ms(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True))
        for tiles in DENSE_TILES:
            for tma in (False, True):
                try:
                    t = gpu_ms(lambda: flash_prefill_triton(q, k, v, cu, cu, tma=tma, tiles=tiles))
                except Exception as e:  # a shape the chip cannot hold (shared memory)
                    print(f"dense {n} {tiles} tma={tma}: {type(e).__name__}: {str(e)[:100]}")
                    continue
                rows.append({"tokens": n, "tiles": str(tiles), "tma": tma, "ms": t, "tflops": flops / t / 1e9,
                             "cudnn_tflops": flops / cudnn / 1e9, "vs_cudnn": cudnn / t})
    return rows


def sparse_tile_rows(n: int, budgets: list[float]) -> list[dict]:
    """The sparse kernel under each launch shape at fixed budgets, against our dense kernel."""
    q, k, v = _qkv(n)
    scale = HEADS[2] ** -0.5
    cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    dense = gpu_ms(lambda: flash_prefill_triton(q, k, v, cu, cu))
    rows = []
    for budget in budgets:
        cfg = PBSConfig(budget=budget)
        sel = pbs_select(q, k, v, cfg, scale)
        for tiles in SPARSE_TILES:
            try:
                t = gpu_ms(lambda: pbs_attention_triton(q, sel, cfg, scale, tiles=tiles))
            except Exception as e:
                print(f"sparse {tiles}: {type(e).__name__}: {str(e)[:100]}")
                continue
            rows.append({"tokens": n, "budget": budget, "tiles": str(tiles), "attend_ms": t, "dense_ms": dense,
                         "over_dense": t / dense})
    return rows


def decode_tile_rows(contexts: list[int], batch: int) -> list[dict]:
    """The decode kernel under each launch shape, replayed from CUDA graphs, against a device copy's bandwidth."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    copy_bw = 2 * src.numel() / (gpu_ms(lambda: src.clone()) * 1e-3)
    del src
    hq, hkv, d = HEADS
    rows = []
    for ctx in contexts:
        pages = ctx // 256
        kc = torch.randn(batch * pages, 256, hkv, d, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        tables = torch.randperm(batch * pages, device="cuda", dtype=torch.int32).view(batch, pages)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16)
        for tiles in DECODE_TILES:
            t = graph_ms(lambda: paged_decode_triton(q, kc, vc, tables, lens, tiles=tiles))
            bw = 2 * kc.numel() * 2 / (t * 1e-3)
            rows.append({"batch": batch, "context": ctx, "tiles": str(tiles), "us": t * 1e3,
                         "TB_per_s": bw / 1e12, "of_copy": bw / copy_bw})
        del kc, vc
    return rows



SKINNY_SHAPES = {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944),
                 "lm_head": (152064, 3584)}  # Qwen2.5-7B decode projections (N, K)
SKINNY_TILES = [(32, 256, 1, 4, 4), (32, 256, 2, 4, 4), (32, 256, 4, 4, 4), (64, 256, 1, 4, 4),
                (64, 128, 2, 4, 4), (32, 512, 2, 4, 3), (32, 128, 4, 4, 4), (32, 512, 4, 8, 4), (32, 512, 8, 8, 3),
                (16, 512, 8, 4, 4), (64, 512, 2, 8, 4)]  # (BLOCK_N, BLOCK_K, SPLIT, num_warps, num_stages)


def skinny_tile_rows(row_counts: list[int]) -> list[dict]:
    """Decode-sized projections of the 7B shape: cuBLAS (bf16), torch._scaled_mm (e4m3) and the skinny kernel
    under each launch shape, in weight bytes read per second and as a share of a device copy's bandwidth."""
    from pbs_engine.bench.runtime import copy_bandwidth
    from pbs_engine.kernels.fp8 import fp8_linear_scaled_mm, quantize_per_token, quantize_weight
    from pbs_engine.kernels.skinny import skinny_linear, skinny_tiles

    copy_bw = copy_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for name, (n, k) in SKINNY_SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        w8, ws = quantize_weight(w)
        for m in row_counts:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            x8, xs = quantize_per_token(x)

            def add(kernel: str, tiles, fn, nbytes: int) -> None:
                try:
                    t = graph_ms(fn)
                except Exception as e:  # a launch shape the chip cannot hold
                    print(f"skinny {name} {kernel} {tiles}: {type(e).__name__}: {str(e)[:100]}")
                    return
                rows.append({"proj": name, "N": n, "K": k, "rows": m, "kernel": kernel, "tiles": str(tiles),
                             "us": t * 1e3, "TB_per_s": nbytes / (t * 1e-3) / 1e12,
                             "of_copy": nbytes / (t * 1e-3) / copy_bw})

            add("cublas-bf16", "-", lambda: torch.nn.functional.linear(x, w), w.numel() * 2)
            add("scaled_mm-fp8", "-", lambda: fp8_linear_scaled_mm(x8, xs, w8, ws), w.numel())
            # bf16; W8A16 (bf16 rows, e4m3 weight widened in the kernel); W8A8 (e4m3 rows: fp8 tensor-core products)
            variants = (("bf16", x, w, 2, {}), ("w8a16", x, w8, 1, {"w_scale": ws, "out_dtype": torch.bfloat16}),
                        ("w8a8", x8, w8, 1, {"x_scale": xs, "w_scale": ws, "out_dtype": torch.bfloat16}))
            for dtype, xin, weight, nbytes, scales in variants:
                default = skinny_tiles(n, k, m, nbytes, sms)
                for tiles in [default, *SKINNY_TILES]:
                    add(f"skinny-{dtype}" + ("*" if tiles == default else ""), tiles,
                        lambda xin=xin, weight=weight, tiles=tiles, scales=scales: skinny_linear(
                            xin, weight, tiles=tiles, **scales), w.numel() * nbytes)
        del w, w8
    return rows


def add_tile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", default="32768,131072", help="dense and sparse sweep lengths")
    p.add_argument("--budgets", default="0.1,0.2", help="block budgets of the sparse sweep")
    p.add_argument("--decode-contexts", default="4096,65536,131072")
    p.add_argument("--decode-batch", type=int, default=1)
    p.add_argument("--skinny-rows", default="1,4,16", help="rows of the skinny linear sweep (decode batch sizes)")
    p.add_argument("--only", default=None, help="comma-separated subset of dense,sparse,decode,skinny")


def run_check(args: argparse.Namespace) -> int:
    print(f"device: {device_name()}, {versions()}")
    rows = check_rows()
    print_table("kernels against their references", rows)
    return 0 if all(r["ok"] for r in rows) else 1


def run_tiles(args: argparse.Namespace) -> int:
    print(f"device: {device_name()}, {versions()}")
    lengths = numbers(args.lengths, "--lengths")
    only = set((args.only or "dense,sparse,decode,skinny").split(","))
    if "dense" in only:
        print_table("dense kernel launch shapes (vs_cudnn > 1: we are faster)", dense_tile_rows(lengths))
    if "sparse" in only:
        budgets = numbers(args.budgets, "--budgets", float)
        print_table("sparse kernel launch shapes", sparse_tile_rows(max(lengths), budgets))
    if "decode" in only:
        print_table("decode kernel launch shapes", decode_tile_rows(
            numbers(args.decode_contexts, "--decode-contexts"), args.decode_batch))
    if "skinny" in only:
        print_table("skinny linear launch shapes, 7B decode projections (* = the default tiles)",
                    skinny_tile_rows(numbers(args.skinny_rows, "--skinny-rows")))
    return 0
