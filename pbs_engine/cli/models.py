"""`pbs-engine models`: the converted models in the cache (GGUFs are converted there on first use) with their
sizes; `--remove NAME` deletes one."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from pbs_engine.engine.model_source import cache_root


def register(sub) -> None:
    p = sub.add_parser("models", help="list the converted models in the cache, or remove one",
                       description="List the models converted into the cache ($PBS_ENGINE_CACHE, else "
                                   "~/.cache/pbs-engine) with their sizes. A removed model is converted again "
                                   "from its GGUF on next use.")
    p.add_argument("--remove", metavar="NAME", help="delete this converted model from the cache")
    p.set_defaults(func=run)


def cached_models() -> list[Path]:
    """Complete converted model directories (config.json is written last), by name."""
    folder = cache_root() / "models"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if (p / "config.json").is_file())


def size_of(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def human(size: float) -> str:
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            break
        size /= 1024
    return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"


def run(args: argparse.Namespace) -> int:
    models = cached_models()
    if args.remove is not None:
        target = next((m for m in models if m.name == args.remove), None)
        if target is None:
            names = ", ".join(m.name for m in models) or "none"
            raise ValueError(f"--remove {args.remove!r}: no such converted model (cached: {names})")
        size = size_of(target)
        shutil.rmtree(target)
        print(f"removed {target.name} ({human(size)})")
        return 0
    folder = cache_root() / "models"
    if not models:
        print(f"no converted models in {folder}")
        return 0
    width = max(len(m.name) for m in models)
    print(f"{'NAME':<{width}}  {'SIZE':>10}")
    for m in models:
        print(f"{m.name:<{width}}  {human(size_of(m)):>10}")
    print(f"in {folder}; `pbs-engine models --remove NAME` deletes one")
    return 0
