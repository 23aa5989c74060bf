"""Tokenizer: `tokenizers` for text <-> ids, the model's jinja2 chat template rendered as HF does, stop ids."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from pbs_engine.models.errors import InvalidTokenizerError, ModelNotFoundError
from pbs_engine.models.model_files import read_json_object


PROBE_CHARS_PER_TOKEN = 8  # text tokenises to ~3-5 characters per token: a probe this long holds > limit tokens


class ChatTemplateError(ValueError):
    """The messages are malformed, or the model has no chat template, or the template rejected them."""


def _token_str(cfg: dict, name: str, path: Path) -> str | None:
    """A special token of tokenizer_config.json: a string, or an added-token object with a string "content"."""
    value = cfg.get(name)
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise InvalidTokenizerError(f"{path}: field {name!r} must be a token string, got {cfg[name]!r}")
    return value


def _ids(value, path: Path) -> list[int]:
    """generation_config.json's eos_token_id: one token id or a list of them."""
    ids = [] if value is None else [value] if isinstance(value, int) else value
    if not isinstance(ids, list) or not all(type(i) is int and i >= 0 for i in ids):
        raise InvalidTokenizerError(f"{path}: field 'eos_token_id' must be a token id or a list of them, "
                                    f"got {value!r}")
    return list(ids)


def _chat_template(value, path: Path, template_file: Path) -> str | None:
    """tokenizer_config.json's chat_template (a string, or named templates of which we take "default"), else
    chat_template.jinja's."""
    if isinstance(value, list):
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                   for t in value):
            raise InvalidTokenizerError(f"{path}: field 'chat_template' must be a string or a list of "
                                        "{'name', 'template'} objects")
        named = {t["name"]: t["template"] for t in value}
        value = named.get("default", next(iter(named.values()), None))
    if value is not None and not isinstance(value, str):
        raise InvalidTokenizerError(f"{path}: field 'chat_template' must be a string, got {value!r}")
    if value is None and template_file.is_file():
        try:
            return template_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidTokenizerError(f"{template_file}: unreadable ({e})") from e
    return value


class Tokenizer:
    def __init__(self, model_dir: str | Path, chat_template: str | None = None):
        """`chat_template` (Jinja source) replaces the model's own."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ModelNotFoundError(f"{path}: tokenizer.json not found in the model directory")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises a bare Exception for every parse error
            raise InvalidTokenizerError(f"{path}: not a valid tokenizer.json ({e})") from e
        cfg_path, gen_path = model_dir / "tokenizer_config.json", model_dir / "generation_config.json"
        cfg, gen = _read_json(cfg_path), _read_json(gen_path)
        self.chat_template = _chat_template(cfg.get("chat_template"), cfg_path, model_dir / "chat_template.jinja")
        if chat_template is not None:
            self.chat_template = chat_template
        self.bos_token = _token_str(cfg, "bos_token", cfg_path)
        self.eos_token = _token_str(cfg, "eos_token", cfg_path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eos_ids = _ids(gen.get("eos_token_id"), gen_path)
        if self.eos_token is not None and self._tok.token_to_id(self.eos_token) is not None:
            eos_ids.append(self._tok.token_to_id(self.eos_token))
        self.eos_token_ids: list[int] = sorted(set(eos_ids))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL (encode does not): a long text tokenised in a worker thread leaves the
        # server's event loop and the engine thread running
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def encode_within(self, text: str, limit: int, add_special_tokens: bool = True) -> list[int] | None:
        """The ids of `text`, or None when it is certainly longer than `limit` tokens; a huge text is found out
        from its first PROBE_CHARS_PER_TOKEN x limit characters, without tokenising all of it."""
        probe = PROBE_CHARS_PER_TOKEN * limit
        if len(text) > probe and len(self.encode(text[:probe], add_special_tokens)) > limit + 1:
            return None  # +1: the cut may split one token in two
        return self.encode(text, add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render the conversation to the prompt text the model was trained on."""
        validate_messages(messages)
        if not self.chat_template:
            raise ChatTemplateError("this model has no chat_template in tokenizer_config.json; use generate() instead")
        try:
            return _compile(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "", tools=None, documents=None)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template rejected the messages: {e}") from e

    def encode_prompt(self, text: str, system: str | None = None, raw: bool = False) -> list[int]:
        """The one place a user's text becomes prompt ids: as the user message of the chat template (after an
        optional system message) when the model has one, else (or with `raw`) the text itself."""
        if raw or not self.chat_template:
            return self.encode(text)
        return self.encode_chat(([{"role": "system", "content": system}] if system else []) +
                                [{"role": "user", "content": text}])

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # The template already places BOS and role markers; HF tokenizes it without adding special tokens.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)


def validate_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {'role', 'content'} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ChatTemplateError(f"messages[{i}] must be an object with a string 'role'")
        if m["role"] not in ("system", "user", "assistant", "tool", "developer"):
            raise ChatTemplateError(f"messages[{i}].role {m['role']!r} is not one of system, user, assistant, tool")
        if not isinstance(m.get("content"), str):
            raise ChatTemplateError(f"messages[{i}].content must be a string")


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, holding back bytes of an unfinished UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        # Decode a few prompt tokens as left context so leading spaces and merges come out right.
        self.ids = list(prompt_ids[-4:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def step(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]


def _read_json(path: Path) -> dict:
    """An optional JSON file of the model directory: {} where it is absent."""
    return read_json_object(path, InvalidTokenizerError) if path.is_file() else {}


def _raise(message: str):
    raise jinja2.TemplateError(message)


_templates: dict[str, jinja2.Template] = {}


def _compile(source: str) -> jinja2.Template:
    if source not in _templates:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _templates[source] = env.from_string(source)
    return _templates[source]
