"""The tokenizer files (tokenizer.json, tokenizer_config.json, stop tokens) of an HF directory, rebuilt from the
byte-level BPE vocabulary a GGUF file carries, splitting text the way llama.cpp does for its `tokenizer.ggml.pre`."""
from __future__ import annotations

from dataclasses import dataclass

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), written as the original tokenizer.json spelled them
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
          r"\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2 = "gpt2"  # ByteLevel's built-in GPT-2 regex
_STARCODER = "starcoder"  # every digit alone, then the GPT-2 regex

# tokenizer.ggml.pre -> (split, ignore_merges: llama.cpp looks a whole pre-token up in the vocabulary first)
PRE_TOKENIZERS: dict[str, tuple[str, bool]] = {
    **{name: (_LLAMA3, True) for name in ("llama3", "llama-v3", "llama-bpe")},
    **{name: (_LLAMA3, False) for name in ("dbrx", "smaug-bpe")},
    **{name: (_QWEN2, False) for name in ("qwen2", "stablelm2", "deepseek-r1-qwen")},
    **{name: (_GPT2, False) for name in ("gpt2", "mpt", "olmo", "jais")},
    **{name: (_STARCODER, False) for name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                                                "minerva")},
}

NORMAL, CONTROL, USER_DEFINED = 1, 3, 4
END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "<|end|>")


@dataclass
class GGUFVocab:
    """The `tokenizer.*` metadata of a GGUF file with a `gpt2` (byte-level BPE) tokenizer model."""
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None

    def token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokens[token_id]

    def stop_ids(self) -> list[int]:
        """End-of-sequence ids for generation: the file's EOS first, then its EOT and the end-of-turn control tokens."""
        ids = [i for i in (self.eos_id, self.eot_id) if i is not None]
        ids += [i for i, (t, kind) in enumerate(zip(self.tokens, self.token_types))
                if kind == CONTROL and t in END_OF_TURN]
        return list(dict.fromkeys(ids))

    def tokenizer_json(self) -> dict:
        """The `tokenizers` document: control tokens become special added tokens, user-defined ones plain ones."""
        added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                  "special": kind == CONTROL}
                 for i, (t, kind) in enumerate(zip(self.tokens, self.token_types)) if kind in (CONTROL, USER_DEFINED)]
        split, ignore_merges = PRE_TOKENIZERS[self.pre]
        return {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": _pre_tokenizer(split), "post_processor": self._post_processor(),
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": ignore_merges, "vocab": {t: i for i, t in enumerate(self.tokens)},
                      "merges": [m.split(" ", 1) for m in self.merges]},
        }

    def tokenizer_config(self, model_max_length: int) -> dict:
        return {
            "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": self.chat_template,
            "bos_token": self.token(self.bos_id), "eos_token": self.token(self.eos_id),
            "pad_token": self.token(self.pad_id), "unk_token": self.token(self.unk_id),
            "add_bos_token": self.add_bos, "add_eos_token": self.add_eos,
            "model_max_length": model_max_length, "clean_up_tokenization_spaces": False,
        }

    def _post_processor(self) -> dict:
        bos = self.token(self.bos_id) if self.add_bos else None
        eos = self.token(self.eos_id) if self.add_eos else None
        if bos is None and eos is None:
            return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}

        def piece(seq: str, type_id: int) -> list[dict]:
            out = [{"Sequence": {"id": seq, "type_id": type_id}}]
            if bos is not None:
                out.insert(0, {"SpecialToken": {"id": bos, "type_id": type_id}})
            if eos is not None:
                out.append({"SpecialToken": {"id": eos, "type_id": type_id}})
            return out

        specials = {t: {"id": t, "ids": [self.tokens.index(t)], "tokens": [t]} for t in (bos, eos) if t is not None}
        return {"type": "TemplateProcessing", "single": piece("A", 0), "pair": piece("A", 0) + piece("B", 1),
                "special_tokens": specials}


def _pre_tokenizer(split: str) -> dict:
    def byte_level(use_regex: bool) -> dict:
        return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": use_regex}

    if split == _GPT2:
        steps = [byte_level(True)]
    elif split == _STARCODER:
        steps = [{"type": "Digits", "individual_digits": True}, byte_level(True)]
    else:
        steps = [{"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": False},
                 byte_level(False)]
    return {"type": "Sequence", "pretokenizers": steps}
