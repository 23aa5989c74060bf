"""GPU checks (run on the device machine; skipped where no CUDA GPU is visible): kernels in bf16 at realistic
sizes against float32 references, and the engine with CUDA graphs against eager mode."""
from __future__ import annotations

import pytest
import torch

from pbs_engine.kernels import PBSConfig, flash_prefill, paged_decode, paged_decode_ref, pbs_prefill

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def sdpa_ref(q, k, v, prefix=0):
    """float32 causal attention for queries that are the last len(q) of len(k) positions."""
    group = q.shape[1] // k.shape[1]
    qt = q.float().transpose(0, 1)
    kt = k.float().repeat_interleave(group, 1).transpose(0, 1)
    vt = v.float().repeat_interleave(group, 1).transpose(0, 1)
    mask = torch.arange(len(k), device=q.device)[None] <= torch.arange(len(q), device=q.device)[:, None] + prefix
    return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).transpose(0, 1)


@pytest.mark.parametrize("hq, hkv, d", [(28, 4, 128), (14, 2, 64), (32, 8, 128)])
@pytest.mark.parametrize("n, n_kv", [(4000, 4000), (3000, 7777)])
def test_flash_and_pbs_bf16(hq, hkv, d, n, n_kv):
    q = torch.randn(n, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(n_kv, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(n_kv, hkv, d, device="cuda", dtype=torch.bfloat16)
    ref = sdpa_ref(q, k, v, n_kv - n)
    cu_q = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, n_kv], dtype=torch.int32, device="cuda")
    assert rel_err(flash_prefill(q, k, v, cu_q, cu_k), ref) < 1e-2
    out, stats = pbs_prefill(q, k, v, PBSConfig(threshold=1.0))
    assert stats.density == 1.0 and rel_err(out, ref) < 1e-2
    _, sparse = pbs_prefill(q, k, v, PBSConfig(budget=0.2))
    assert sparse.density < 0.5


@pytest.mark.parametrize("batch, ctx", [(1, 70000), (64, 3000)])
def test_paged_decode_bf16(batch, ctx):
    page, hkv, hq, d = 256, 4, 28, 128
    pages = -(-ctx // page)
    kc = torch.randn(batch * pages + 3, page, hkv, d, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    tables = torch.randperm(batch * pages + 3, device="cuda")[: batch * pages].int().view(batch, pages)
    lens = torch.randint(ctx // 2, ctx + 1, (batch,), device="cuda", dtype=torch.int32)
    q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16)
    assert rel_err(paged_decode(q, kc, vc, tables, lens), paged_decode_ref(q, kc, vc, tables, lens)) < 1e-2


@pytest.mark.parametrize("hq, hkv, d", [(28, 4, 128), (14, 2, 64)])
@pytest.mark.parametrize("t", [1, 64, 3000])
def test_rope_and_cache_bf16(t, hq, hkv, d):
    """RoPE fused with the KV-cache write, on the strided q/k/v views of one qkv projection, against the reference
    (within a bf16 rounding: the GPU fuses the multiply-adds); v and its cache rows exactly."""
    from pbs_engine.kernels.rope import build_cos_sin_cache, rope_and_cache_ref, rope_and_cache_triton, rope_inv_freq

    qkv = torch.randn(t, (hq + 2 * hkv) * d, device="cuda", dtype=torch.bfloat16)
    q, k, v = (x.view(t, -1, d) for x in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))
    cos_sin = build_cos_sin_cache(rope_inv_freq(d, 1e6), 40000).float().cuda()
    pos = torch.randint(0, 40000, (t,), device="cuda")
    slots = torch.randperm(4 * t + 256, device="cuda")[:t]
    caches = [torch.randn(4 * t + 256, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    ours = rope_and_cache_triton(q, k, v, pos, cos_sin, slots, *caches)
    ref = rope_and_cache_ref(q, k, v, pos, cos_sin, slots, *ref_caches)
    for a, b in zip((*ours, *caches), (*ref, *ref_caches)):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)
    assert torch.equal(ours[2], v) and torch.equal(caches[1], ref_caches[1])


def assert_greedy_close(a, b, what: str) -> None:
    """Greedy outputs (token ids, logprobs) of two runs that differ only in batching or kernels agree, or first differ
    where each picked token is in the other's top 5 (a near tie that float rounding may flip, as vLLM's
    check_logprobs_close allows); the rest of the sequence is then free to differ."""
    for i, ((ids_a, lp_a), (ids_b, lp_b)) in enumerate(zip(a, b)):
        for pos, (x, y) in enumerate(zip(ids_a, ids_b)):
            if x != y:
                assert x in lp_b[pos] and y in lp_a[pos], f"{what}: prompt {i} token {pos}: {x} vs {y}, not a near tie"
                break


def greedy(llm, prompts, params):
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(prompts, params)]


def test_engine_cuda_graphs_match_eager(tmp_path):
    import json

    from pbs_engine import LLM, SamplingParams
    from pbs_engine.bench.shapes import QWEN25_7B_1M

    cfg = dict(QWEN25_7B_1M, num_hidden_layers=4, max_position_embeddings=32768)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    gen = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(100, 20000, (n,), generator=gen).tolist()}
               for n in (5, 300, 2000, 9000)]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=5)
    outs = {}
    for eager in (False, True):
        llm = LLM(str(tmp_path), load_format="dummy", skip_tokenizer_init=True, enforce_eager=eager,
                  attention="dense", gpu_memory_utilization=0.5, max_model_len=16384)
        outs[eager] = greedy(llm, prompts, params)
        single = [greedy(llm, p, params)[0] for p in prompts]
        assert_greedy_close(single, outs[eager], f"one at a time vs batched, eager={eager}")
        stats = llm.stats()
        assert stats["kv_free_blocks"] == stats["kv_total_blocks"]
        del llm
        torch.cuda.empty_cache()
    assert_greedy_close(outs[False], outs[True], "CUDA graphs vs eager")


@pytest.mark.parametrize("batch, ctx", [(1, 70000), (64, 3000)])
def test_paged_decode_fp8_cache(batch, ctx):
    """The FP8 cache: the kernel against the reference on the same e4m3 pages and scales."""
    from pbs_engine.kernels.paged_decode import quantize_kv

    page, hkv, hq, d = 256, 4, 28, 128
    pages = -(-ctx // page)
    n = batch * pages + 3
    kc, ks = quantize_kv(torch.randn(n * page, hkv, d, device="cuda") * 20)
    vc, vs = quantize_kv(torch.randn(n * page, hkv, d, device="cuda"))
    kc, vc = kc.view(n, page, hkv, d), vc.view(n, page, hkv, d)
    ks, vs = ks.view(n, page, hkv), vs.view(n, page, hkv)
    tables = torch.randperm(n, device="cuda")[: batch * pages].int().view(batch, pages)
    lens = torch.randint(ctx // 2, ctx + 1, (batch,), device="cuda", dtype=torch.int32)
    q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16) * 0.05
    got = paged_decode(q, kc, vc, tables, lens, k_scale=ks, v_scale=vs)
    assert rel_err(got, paged_decode_ref(q, kc, vc, tables, lens, k_scale=ks, v_scale=vs)) < 1e-2


@pytest.mark.parametrize("options", [dict(quantization="fp8"), dict(kv_cache_dtype="fp8"),
                                     dict(quantization="fp8", kv_cache_dtype="fp8")])
def test_engine_fp8_runs_with_cuda_graphs_and_chunks(tmp_path, options):
    """FP8 weights and/or cache through the whole engine: chunked prefill over a cached prefix (PBS and dense),
    CUDA-graph decode equal to eager decode."""
    import json

    from pbs_engine import LLM, SamplingParams
    from pbs_engine.bench.shapes import QWEN25_7B_1M

    cfg = dict(QWEN25_7B_1M, num_hidden_layers=4, max_position_embeddings=65536)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    prompt = {"prompt_token_ids": torch.randint(100, 20000, (40000,)).tolist()}
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=5)
    outs = {}
    for eager in (False, True):
        llm = LLM(str(tmp_path), load_format="dummy", skip_tokenizer_init=True, enforce_eager=eager,
                  gpu_memory_utilization=0.5, max_model_len=65536, max_num_batched_tokens=16384,
                  pbs=PBSConfig(min_length=0), **options)
        outs[eager] = greedy(llm, prompt, params)
        assert len(outs[eager][0][0]) == 16
        del llm
        torch.cuda.empty_cache()
    assert_greedy_close(outs[False], outs[True], f"CUDA graphs vs eager, {options}")


def test_engine_async_scheduling_matches_sync(tmp_path):
    """Async scheduling on the GPU (CUDA graphs, samples read behind an event, input ids filled on the device): the
    same greedy tokens as the synchronous engine. Every request has the same length, so both engines run the same
    batches and the numbers are bit-equal."""
    import json

    from pbs_engine import LLM, SamplingParams
    from pbs_engine.bench.shapes import QWEN25_7B_1M

    cfg = dict(QWEN25_7B_1M, num_hidden_layers=4, max_position_embeddings=16384)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    gen = torch.Generator().manual_seed(1)
    prompts = [{"prompt_token_ids": torch.randint(100, 20000, (n,), generator=gen).tolist()} for n in (7, 900, 3000)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outs, launches = {}, []
    for a in (False, True):
        llm = LLM(str(tmp_path), load_format="dummy", skip_tokenizer_init=True, async_scheduling=a,
                  attention="dense", gpu_memory_utilization=0.4, max_model_len=8192)
        if a:
            launch = llm.engine.runner.launch
            llm.engine.runner.launch = lambda batch, prev=None: launches.append(prev is not None) or launch(batch, prev)
        outs[a] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        del llm
        torch.cuda.empty_cache()
    assert outs[True] == outs[False] and all(len(t) == 24 for t in outs[True])
    assert sum(launches) >= 20  # decode steps launched back to back
