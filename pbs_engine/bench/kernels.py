"""`pbs-engine bench kernels`: our attention kernels against torch SDPA (cuDNN, flash), FlexAttention and the
unpermuted block-sparse baseline, in the Qwen2.5-7B and Llama-3.1-8B attention shapes, on one GPU, one run."""
from __future__ import annotations

import argparse
from dataclasses import replace

import torch
import torch.nn.functional as F

from pbs_engine.bench.common import gpu_ms, graph_ms, numbers, print_table, versions, write_json
from pbs_engine.kernels import PBSConfig, flash_prefill, paged_decode, pbs_prefill, pbs_select
from pbs_engine.kernels.pbs_prefill import pbs_attention_triton

SHAPES = {"qwen2.5-7b": (28, 4, 128), "llama-3.1-8b": (32, 8, 128)}


def _tflops(n: int, hq: int, d: int, ms: float, density: float = 1.0) -> float:
    return 4 * n * n / 2 * d * hq * density / (ms * 1e-3) / 1e12


def _qkv(n, hq, hkv, d, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda h: torch.randn(n, h, d, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    return mk(hq), mk(hkv), mk(hkv)


def dense_rows(lengths: list[int]) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    for shape, (hq, hkv, d) in SHAPES.items():
        for n in lengths:
            q, k, v = _qkv(n, hq, hkv, d)
            cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
            ours = gpu_ms(lambda: flash_prefill(q, k, v, cu, cu))
            qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k, v))
            kr, vr = (x.repeat_interleave(hq // hkv, 1) for x in (kt, vt))
            row = {"shape": shape, "tokens": n, "ours_ms": ours, "ours_tflops": _tflops(n, hq, d, ours)}
            for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
                try:
                    with sdpa_kernel(backend):
                        row[f"{name}_ms"] = gpu_ms(lambda: F.scaled_dot_product_attention(qt, kr, vr, is_causal=True))
                except RuntimeError as e:
                    row[f"{name}_ms"] = None
                    print(f"sdpa {name} failed: {e}")
            mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, n, n, _compile=True)
            row["flex_ms"] = gpu_ms(lambda: flex(qt, kt, vt, block_mask=mask, enable_gqa=True))
            for peer in ("cudnn", "flash", "flex"):
                if row.get(f"{peer}_ms"):
                    row[f"vs_{peer}"] = row[f"{peer}_ms"] / ours
            rows.append(row)
            del q, k, v, qt, kt, vt, kr, vr
            torch.cuda.empty_cache()
    return rows


def pbs_rows(lengths: list[int], budgets: list[float], captured: str | None) -> list[dict]:
    """PBS at fixed budgets (and threshold 0.9, the paper's setting) vs our dense kernel and FlexAttention with
    the same block mask."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    hq, hkv, d = SHAPES["qwen2.5-7b"]
    rows = []
    inputs = [(n, *_qkv(n, hq, hkv, d, seed=1), "random") for n in lengths]
    if captured:
        data = torch.load(captured) if isinstance(captured, str) else captured
        for n, (q, k, v) in sorted(data.items()):
            inputs.append((n, q.cuda(), k.cuda(), v.cuda(), "captured"))
    for n, q, k, v, source in inputs:
        hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
        cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
        dense_ms = gpu_ms(lambda: flash_prefill(q, k, v, cu, cu))
        configs = [(f"budget {b:.2f}", PBSConfig(budget=b)) for b in budgets]
        configs.append(("threshold 0.9", PBSConfig(threshold=0.9)))
        reps = PBSConfig().query_reps  # the default selection permuted and not; one pooled query (paper's)
        variants = ((True, reps), (False, reps), (False, 1))
        for label, cfg in configs:
            for permute, r in variants:
                c = replace(cfg, permute=permute, query_reps=r)
                sel = pbs_select(q, k, v, c, d ** -0.5)
                density = (sel.kept.sum() / sel.visible.sum()).item()
                total = gpu_ms(lambda: pbs_prefill(q, k, v, c))
                select = gpu_ms(lambda: pbs_select(q, k, v, c, d ** -0.5))
                attend = gpu_ms(lambda: pbs_attention_triton(q, sel, c, d ** -0.5))
                row = {"source": source, "tokens": n, "heads": f"{hq}/{hkv}", "config": label,
                       "permute": permute, "query_reps": r, "density": density, "pbs_ms": total,
                       "select_ms": select, "attend_ms": attend, "dense_ms": dense_ms,
                       "pbs_over_dense": total / dense_ms, "target": density + 0.05}
                if permute and source == "random":
                    row["flex_sparse_ms"] = _flex_sparsegpu_ms(flex, BlockMask, q, k, v, sel, c)
                rows.append(row)
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def _flex_sparsegpu_ms(flex, BlockMask, q, k, v, sel, cfg) -> float:
    """FlexAttention's block-sparse kernel alone, with our kept-block list precomputed as its mask (per KV group
    head 0's pattern shared across the group is not assumed: one mask row per query head)."""
    n, hq, _ = q.shape
    group = hq // k.shape[1]
    kp = sel.keys.repeat_interleave(group, 0)[None]  # (1, Hq, Npad, D)
    vp = sel.values.repeat_interleave(group, 0)[None]
    pos = sel.key_pos.repeat_interleave(group, 0)
    npad = kp.shape[2]
    qt = torch.zeros(1, hq, npad, q.shape[2], device="cuda", dtype=q.dtype)
    qt[0, :, :n] = q.transpose(0, 1)
    nqb = sel.block_count.shape[1]
    counts = torch.zeros(1, hq, npad // cfg.block_size, dtype=torch.int32, device="cuda")
    counts[0, :, :nqb] = sel.block_count
    idx = torch.zeros(1, hq, npad // cfg.block_size, npad // cfg.block_size, dtype=torch.int32, device="cuda")
    idx[0, :, :nqb, : sel.block_idx.shape[2]] = sel.block_idx

    def mask_mod(b, h, qi, ki):
        return pos[h, ki] <= qi + sel.q_offset

    mask = BlockMask.from_kv_blocks(counts, idx, BLOCK_SIZE=cfg.block_size, mask_mod=mask_mod, seq_lengths=(npad, npad))
    return gpu_ms(lambda: flex(qt, kp, vp, block_mask=mask))


def capture_qkv(model: str, lengths: list[int], layer: int | None) -> dict:
    """{tokens: (q, k, v)} of one attention layer of a real model, from a dense pass over Python stdlib source."""
    from pbs_engine import LLM
    from pbs_engine.eval.text import stdlib_text
    from pbs_engine.models.layers.attention import AttentionMetadata

    llm = LLM(model=model, attention="dense", max_model_len=max(lengths), num_kv_blocks=max(lengths) // 256 + 1,
              enforce_eager=True)
    net = llm.model
    layers = net.attention_layers()
    target = layers[len(layers) // 2 if layer is None else layer]
    ids = llm.get_tokenizer().encode(stdlib_text(min_chars=5 * max(lengths)), add_special_tokens=False)
    out, grabbed = {}, []
    hook = target.register_forward_pre_hook(lambda mod, args: grabbed.append(tuple(a.clone() for a in args[:3])))
    try:
        for n in lengths:
            x = torch.tensor(ids[:n], device="cuda")
            cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
            meta = AttentionMetadata(is_prefill=True, slot_mapping=None, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                     seq_lens_q=[n], seq_lens_k=[n])
            with torch.inference_mode():
                net(x, torch.arange(n, device="cuda"), meta)
            out[n] = grabbed.pop()
            grabbed.clear()
    finally:
        hook.remove()
    print(f"captured layer {target.layer_idx} of {model} at {lengths} tokens")
    del llm, net
    torch.cuda.empty_cache()
    return out


def decode_rows(contexts: list[int], batches: list[int]) -> list[dict]:
    hq, hkv, d = SHAPES["qwen2.5-7b"]
    page = 256
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_bw = 2 * src.numel() / (gpu_ms(lambda: dst.copy_(src)) * 1e-3)
    del src, dst
    rows = []
    for b in batches:
        for ctx in contexts:
            pages = ctx // page
            if b * pages * page * hkv * d * 4 > 40e9:
                continue
            kc = torch.randn(b * pages, page, hkv, d, device="cuda", dtype=torch.bfloat16)
            vc = torch.randn_like(kc)
            tables = torch.randperm(b * pages, device="cuda", dtype=torch.int32).view(b, pages)
            lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
            q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)
            step = lambda: paged_decode(q, kc, vc, tables, lens)  # noqa: E731
            eager = gpu_ms(step)
            # the engine replays decode from CUDA graphs, so the GPU time (no launch overhead) is the figure
            ms = graph_ms(step)
            bw = 2 * b * ctx * hkv * d * 2 / (ms * 1e-3)
            rows.append({"batch": b, "context": ctx, "eager_ms": eager, "graph_ms": ms, "TB_per_s": bw / 1e12,
                         "fraction_of_copy": bw / copy_bw, "copy_TB_per_s": copy_bw / 1e12})
            del kc, vc
            torch.cuda.empty_cache()
    return rows


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parts", default="dense,pbs,decode")
    p.add_argument("--lengths", default="8192,32768,131072")
    p.add_argument("--budgets", default="0.05,0.1,0.2")
    p.add_argument("--captured", default=None, help="torch.save'd {tokens: (q, k, v)} of a real model's layer")
    p.add_argument("--real-model", default=None,
                   help="capture Q/K/V from this model (path, .gguf or alias) on Python stdlib source at --real-lengths "
                        "and add PBS rows on them")
    p.add_argument("--real-lengths", default="32768", help="token counts for --real-model")
    p.add_argument("--real-layer", type=int, default=None, help="layer to capture (default: the middle one)")
    p.add_argument("--decode-contexts", default="4096,16384,65536,131072")
    p.add_argument("--decode-batches", default="1,64")
    p.add_argument("--json", default=None, help="also write every table's rows to this JSON file")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pbs-engine bench kernels")
    add_args(p)
    return run(p.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    lengths = numbers(args.lengths, "--lengths")
    parts = args.parts.split(",")
    torch._dynamo.config.recompile_limit = 1000  # FlexAttention recompiles per shape and per mask
    torch._dynamo.config.accumulated_recompile_limit = 10000
    print(f"device: {torch.cuda.get_device_name()}, {versions()}")
    tables: dict[str, list[dict]] = {}
    if "dense" in parts:
        tables["dense"] = dense_rows(lengths)
        print_table("dense causal prefill (ms; vs_X = X time / our time, >1 means we are faster)", tables["dense"])
    captured = args.captured
    if args.real_model and "pbs" in parts:
        captured = capture_qkv(args.real_model, numbers(args.real_lengths, "--real-lengths"), args.real_layer)
    if "pbs" in parts:
        tables["pbs"] = pbs_rows(lengths, numbers(args.budgets, "--budgets", float), captured)
        print_table("PBS prefill, Qwen2.5-7B heads (pbs_ms includes selection; target: pbs/dense <= density+0.05)",
                    tables["pbs"])
    if "decode" in parts:
        tables["decode"] = decode_rows(numbers(args.decode_contexts, "--decode-contexts"),
                                       numbers(args.decode_batches, "--decode-batches"))
        print_table("paged decode (bytes of K+V read / time, against a device copy)", tables["decode"])
    write_json(args.json, [dict(table=name, **row) for name, rows in tables.items() for row in rows])
    return 0
