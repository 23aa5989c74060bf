"""`pbs-engine convert FILE.gguf OUTDIR`: a llama or qwen2 GGUF into an HF-style safetensors directory."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert a GGUF file into an HF-style model directory",
                       description="Dequantise a llama/qwen2 GGUF (F32, F16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_0, Q6_K, ...) "
                                   "into config.json, model.safetensors and tokenizer files.")
    p.add_argument("gguf", help="input .gguf file")
    p.add_argument("outdir", help="output directory (created)")
    p.add_argument("--dtype", default="bfloat16", help="weight dtype: bfloat16 (default), float16 or float32")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pbs_engine.engine.config import DTYPES
    from pbs_engine.models.gguf_convert import convert_gguf

    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype {args.dtype!r}: choose one of {', '.join(DTYPES)}")
    out = convert_gguf(args.gguf, args.outdir, dtype=DTYPES[args.dtype])
    print(f"wrote {out}")
    return 0
