"""`pbs-engine convert FILE.gguf OUTDIR`: a llama or qwen2 GGUF into an HF-style safetensors directory."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert a GGUF file into an HF-style model directory",
                       description="Dequantise a llama/qwen2 GGUF (F32, F16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_0, Q6_K, ...) "
                                   "into config.json, model.safetensors and tokenizer files.")
    p.add_argument("gguf", help="input .gguf file")
    p.add_argument("outdir", help="output directory (created; an existing non-empty one needs --force)")
    p.add_argument("--dtype", default="bfloat16", help="weight dtype: bfloat16 (default), float16 or float32")
    p.add_argument("--force", action="store_true",
                   help="write into OUTDIR even if it has files (the ones convert writes are overwritten)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.outdir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise ValueError(f"{out} already exists and is not empty: pass --force to write into it, or pick another "
                         "OUTDIR")
    from pbs_engine.engine.config import DTYPES
    from pbs_engine.models.gguf_convert import convert_gguf

    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype {args.dtype!r}: choose one of {', '.join(DTYPES)}")
    print(f"wrote {convert_gguf(args.gguf, out, dtype=DTYPES[args.dtype])}")
    return 0
