"""A `tokenizers` tokenizer.json (byte-level BPE) rebuilt from the vocabulary, merges and pre-tokenizer type that a
GGUF file carries, following llama.cpp's pre-tokenizer definitions."""
from __future__ import annotations

from pbs_engine.models.errors import ModelLoadError

# llama.cpp pre-tokenizer name -> the split regex applied before byte-level encoding
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
          r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_REGEX = {"llama-bpe": _LLAMA3, "llama3": _LLAMA3, "qwen2": _QWEN2}
GPT2_STYLE = {"gpt2", "default", "smollm"}  # ByteLevel's own GPT-2 regex; smollm first splits digits one by one

CONTROL, USER_DEFINED = 3, 4


def byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": use_regex}


def pre_tokenizer(pre: str) -> dict:
    if pre in SPLIT_REGEX:
        split = {"type": "Split", "pattern": {"Regex": SPLIT_REGEX[pre]}, "behavior": "Isolated", "invert": False}
        return {"type": "Sequence", "pretokenizers": [split, byte_level(False)]}
    if pre in GPT2_STYLE:
        steps = [byte_level(True)]
        if pre == "smollm":
            steps.insert(0, {"type": "Digits", "individual_digits": True})
        return {"type": "Sequence", "pretokenizers": steps}
    raise ModelLoadError(f"GGUF tokenizer.ggml.pre {pre!r} is not supported "
                         f"(supported: {', '.join(sorted(SPLIT_REGEX) + sorted(GPT2_STYLE))})")


def tokenizer_json(tokens: list[str], merges: list[str], token_types: list[int], pre: str,
                   bos: str | None, add_bos: bool) -> dict:
    """The tokenizer.json document for a GGUF `gpt2`-model (byte-level BPE) vocabulary."""
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": kind == CONTROL}
             for i, (t, kind) in enumerate(zip(tokens, token_types)) if kind in (CONTROL, USER_DEFINED)]
    post = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    if add_bos and bos is not None:
        bos_id = tokens.index(bos)
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": pre_tokenizer(pre), "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": pre in ("llama-bpe", "llama3"),
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": [m.split(" ", 1) for m in merges]},
    }
