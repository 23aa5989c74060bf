"""The engine's one configuration object, validated where it is built."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pbs_engine.kernels import PBSConfig

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
CPU_KV_CACHE_MEMORY = 2 << 30  # the CPU cache's default size; its pages are committed as blocks are first used


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string: 1000000, 512MiB, 2GiB, 1.5GB (units case-insensitive, B optional)."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    unit = match and match.group(2).lower()
    unit = unit + "b" if unit and unit[-1] != "b" else unit  # 2G, 512Mi
    if not match or unit not in SIZE_UNITS:
        raise ValueError(f"{value!r} is not a size: give bytes or a number with a unit (512MiB, 2GiB, 1.5GB)")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


@dataclass
class EngineConfig:
    model: str | None = None  # directory, HF repo id, alias or .gguf; None: the embedded default
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str | None = None  # None: bfloat16 on cuda, float32 on cpu
    attention: str = "pbs"  # prefill attention: "pbs" | "dense"
    quantization: str | None = None  # "fp8": decoder projections in e4m3 with per-channel weight scales, inputs
    # quantised per token inside RMSNorm / SiLU-and-mul, GEMMs by torch._scaled_mm (CUDA, compute capability >= 8.9;
    # on the CPU a dequantising reference path, slow); None: the weights' dtype
    kv_cache_dtype: str = "auto"  # "fp8": the paged KV cache in e4m3 with a float32 scale per (token, KV head),
    # about half the bytes of bf16 (twice the tokens); "auto": the model's dtype
    pbs: PBSConfig = field(default_factory=PBSConfig)
    max_model_len: int | None = None  # None: the model's max_position_embeddings (shrunk to what the cache holds)
    num_kv_blocks: int | None = None  # None: sized from kv_cache_memory (CPU) or free GPU memory
    kv_block_size: int | None = None  # tokens per cache block; None: 256 on cuda, 16 on cpu
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: int | str | None = None  # KV cache bytes (or "2GiB"): on CPU its size (None: 2 GiB), on CUDA a
    # cap on what gpu_memory_utilization leaves free (None: all of it)
    max_num_seqs: int = 128
    tensor_parallel_size: int = 1  # ranks the model's heads, MLP and vocabulary are split over (one process each)
    max_num_batched_tokens: int | None = None  # per-step token budget (the longest prefill chunk); None: on cuda
    # the largest of 128K, 64K, ... 8K tokens whose activations fit beside a full-length KV cache (ModelRunner.
    # prefill_chunk), on cpu 4096
    chunked_prefill: bool = True
    max_num_partial_prefills: int = 4  # prompts part-way through their prefill at once (ones that finish in a step
    # may pass them)
    long_prefill_token_threshold: int | None = None  # while others wait, a prompt takes at most this many tokens a
    # step while other requests run or wait (short prompts go beside a long one, not behind it, and running streams
    # keep decoding); None: max_num_batched_tokens / 4, at most 8192
    enable_prefix_caching: bool = True  # reuse the cached K/V of full prompt blocks shared with earlier requests
    enforce_eager: bool = False  # True: no CUDA graphs for decode
    async_scheduling: bool = False  # True: while a decode step runs on the GPU, the next one is scheduled and
    # launched with its input tokens taken from the running step's samples on the device, so the host's output
    # processing and packing overlap GPU work instead of leaving it idle (vLLM V1's --async-scheduling); steps with
    # prompts to prefill, penalties, logprobs or tensor parallelism run synchronously as before
    load_format: str = "auto"  # "auto": safetensors; "dummy": random weights from config.json (speed runs only)
    skip_tokenizer_init: bool = False  # True: prompts are token ids only, outputs carry no text
    chat_template: str | None = None  # a Jinja chat template, or a file holding one, instead of the model's

    def __post_init__(self) -> None:
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError):
            dev = None
        if dev is None or dev.type not in ("cuda", "cpu"):
            raise ValueError(f"device {self.device!r}: choose cuda, cuda:N or cpu")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}, but no CUDA GPU is visible: run on the CPU (device cpu)")
        if self.dtype is None:
            self.dtype = "bfloat16" if dev.type == "cuda" else "float32"
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.attention not in ("pbs", "dense"):
            raise ValueError(f"attention={self.attention!r}: choose 'pbs' or 'dense'")
        if self.quantization not in (None, "fp8"):
            raise ValueError(f"quantization={self.quantization!r}: choose 'fp8' or leave it unset")
        if self.kv_cache_dtype == "fp8_e4m3":
            self.kv_cache_dtype = "fp8"
        if self.kv_cache_dtype not in ("auto", "fp8"):
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r}: choose 'auto' or 'fp8'")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format={self.load_format!r}: choose 'auto' or 'dummy'")
        if isinstance(self.pbs, dict):
            self.pbs = PBSConfig(**self.pbs)
        if self.kv_block_size is None:
            self.kv_block_size = 256 if dev.type == "cuda" else 16
        if self.max_num_batched_tokens is None and dev.type == "cpu":
            self.max_num_batched_tokens = 4096  # on cuda the runner sizes it from memory
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size!r} must be an integer >= 1")
        if dev.type == "cuda" and self.tensor_parallel_size > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} but only {torch.cuda.device_count()} "
                             f"CUDA devices are visible")
        if dev.type == "cuda" and self.tensor_parallel_size > 1 and dev.index not in (None, 0):
            raise ValueError(f"device={self.device!r}: with tensor parallelism rank r runs on cuda:r; give 'cuda'")
        for name in ("kv_block_size", "max_num_seqs", "max_num_batched_tokens", "max_num_partial_prefills"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.long_prefill_token_threshold is not None and self.long_prefill_token_threshold < 1:
            raise ValueError(f"long_prefill_token_threshold={self.long_prefill_token_threshold} must be >= 1")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks={self.num_kv_blocks} must be >= 1")
        if self.kv_cache_memory is not None:
            try:
                size = parse_size(self.kv_cache_memory)
            except ValueError as e:
                raise ValueError(f"kv_cache_memory: {e}") from None
            if size < 1:
                raise ValueError(f"kv_cache_memory={self.kv_cache_memory!r} must be at least 1 byte")
            if self.num_kv_blocks is not None:
                raise ValueError(f"num_kv_blocks={self.num_kv_blocks} and kv_cache_memory={self.kv_cache_memory!r}"
                                 " both size the KV cache: give one")
            self.kv_cache_memory = size
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len={self.max_model_len} must be >= 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")
        if self.chat_template is not None:
            self.chat_template = _template_source(self.chat_template)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def _template_source(value: str) -> str:
    """The Jinja source `chat_template` names: the file's text, or the value itself when it is a template."""
    if os.path.isfile(value):
        return Path(value).read_text(encoding="utf-8")
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"chat_template={value!r}: no such file, and not a Jinja template (no {{{{ }}}} or {{% %}})")
