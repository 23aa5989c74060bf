"""Options shared by the commands that load a model, and the one place user errors become CLI messages."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
import typing
from typing import Callable

from pbs_engine.kernels.config import BLOCK_SCORES, HELP, PBSConfig  # torch-free: --help stays fast


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", default=None,
                   help="local directory, .gguf file, HF repo id or alias (qwen2.5-7b-1m, qwen2.5-7b, llama-3.1-8b, "
                        "smollm2-135m); default: the embedded SmolLM2-135M-Instruct")
    g.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    g.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--attention", choices=["pbs", "dense"], default="pbs", help="prefill attention (default: pbs)")
    g.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output, in tokens")
    g.add_argument("--max-num-partial-prefills", type=int, default=4,
                   help="prompts prefilled side by side in one step (default: 4)")
    g.add_argument("--quantization", "-q", choices=["fp8"], default=None,
                   help="fp8: decoder weights in e4m3 with per-channel scales, activations quantised per token "
                        "(GPU of compute capability >= 8.9; on CPU a slow reference path)")
    g.add_argument("--kv-cache-dtype", choices=["auto", "fp8", "fp8_e4m3"], default="auto",
                   help="fp8: the KV cache in e4m3 with a scale per token and head, about twice the tokens "
                        "(default auto: the model's dtype)")
    g.add_argument("--max-num-batched-tokens", type=int, default=None, metavar="N",
                   help="tokens per step, the longest prefill chunk (default: on GPU the largest of 128K..8K whose "
                        "activations fit beside the KV cache; 4096 on CPU)")
    g.add_argument("--long-prefill-token-threshold", type=int, default=None,
                   help="while other requests run or wait, tokens one prompt may take per step (default: a quarter "
                        "of the step, at most 8192)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split the model over this many GPUs (or CPU processes), one worker process each")
    g.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                   help="a Jinja chat template (a file, or the template itself) instead of the model's")
    g.add_argument("--max-num-seqs", type=int, default=128,
                   help="requests decoded together in one batch (default: 128)")
    g.add_argument("--kv-cache-memory", type=_size, default=None, metavar="SIZE",
                   help="KV cache size in bytes or with a unit (512MiB, 2GiB, 1.5GB); on CPU the cache (default "
                        "2GiB), on CUDA a cap on the free memory it would fill")
    g.add_argument("--num-kv-blocks", type=int, default=None, metavar="N",
                   help="KV cache blocks (instead of --kv-cache-memory)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse cached K/V of prompt blocks shared with earlier requests (default: on)")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=False,
                   help="launch each decode step before the previous one's tokens are read back, so host work "
                        "overlaps the GPU (default: off; docs/runtime.md)")
    add_pbs_args(g)


def add_pbs_args(g: argparse._ArgumentGroup) -> None:
    """One --pbs-X flag per PBSConfig field (bools: --pbs-X / --no-pbs-X), default None: PBSConfig's default."""
    hints = typing.get_type_hints(PBSConfig)
    for f in dataclasses.fields(PBSConfig):
        kind = next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
        extra = dict(action=argparse.BooleanOptionalAction) if kind is bool else dict(type=kind)
        if f.name == "block_score":
            extra["choices"] = BLOCK_SCORES
        default = "off" if f.default is False else "on" if f.default is True else f.default
        g.add_argument(f"--pbs-{f.name.replace('_', '-')}", dest=f"pbs_{f.name}", default=None,
                       help=f"PBS: {HELP[f.name]} (default: {default})", **extra)


def pbs_config(args: argparse.Namespace) -> PBSConfig:
    """The PBSConfig of the --pbs-* flags given, PBSConfig's defaults for the rest."""
    return PBSConfig(**{f.name: getattr(args, f"pbs_{f.name}") for f in dataclasses.fields(PBSConfig)
                        if getattr(args, f"pbs_{f.name}", None) is not None})


def _size(text: str) -> int:
    from pbs_engine.engine.config import parse_size  # torch: only when the flag is given

    try:
        size = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1 byte")
    return size


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens per answer (default: {max_tokens})")
    g.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default: {temperature})")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end the answer where TEXT appears, TEXT left out (repeatable)")


def sampling_params(args: argparse.Namespace):
    from pbs_engine import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=args.stop)


def llm_kwargs(args: argparse.Namespace) -> dict:
    return dict(model=args.model, device=args.device, dtype=args.dtype, attention=args.attention,
                max_model_len=args.max_model_len, pbs=pbs_config(args),
                tensor_parallel_size=args.tensor_parallel_size,
                max_num_partial_prefills=args.max_num_partial_prefills,
                long_prefill_token_threshold=args.long_prefill_token_threshold,
                max_num_batched_tokens=args.max_num_batched_tokens, quantization=args.quantization,
                kv_cache_dtype=args.kv_cache_dtype,
                max_num_seqs=args.max_num_seqs, enable_prefix_caching=args.enable_prefix_caching,
                chat_template=args.chat_template, kv_cache_memory=args.kv_cache_memory,
                num_kv_blocks=args.num_kv_blocks, async_scheduling=args.async_scheduling)


def load_llm(args: argparse.Namespace, **overrides):
    """The LLM the model options describe, announced on stderr: first use converts, big models take a while."""
    from pbs_engine import LLM
    from pbs_engine.engine.model_source import DEFAULT_MODEL

    print(f"pbs-engine: loading model {args.model or DEFAULT_MODEL}", file=sys.stderr, flush=True)
    start = time.monotonic()
    llm = LLM(**{**llm_kwargs(args), **overrides})
    weights = ("fp8 (e4m3) weights, " if llm.config.quantization == "fp8" else "") + (
        "fp8 KV cache, " if llm.config.kv_cache_dtype == "fp8" else "")
    print(f"pbs-engine: model loaded in {time.monotonic() - start:.1f}s ({llm.config.device}, {llm.config.dtype}, "
          f"{weights}max_model_len {llm.config.max_model_len})", file=sys.stderr, flush=True)
    return llm


def run_command(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; bad input (a ValueError, TypeError or OSError we raised) becomes a one-line message."""
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from pbs_engine.engine.errors import InvalidRequest

    try:
        return fn(args)
    except InvalidRequest as e:  # a request field: say it as the flag that set it
        flag = f"--{e.param.replace('_', '-')}" if e.param else None
        value = getattr(args, e.param, None) if e.param else None
        if flag and e.reason and value is not None:
            print(f"pbs-engine: error: {flag} {value}: {e.reason}", file=sys.stderr)
        else:
            print(f"pbs-engine: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError) as e:
        print(f"pbs-engine: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pbs-engine: interrupted", file=sys.stderr)
        return 130
