"""What every benchmark shares: timing (GPU time and wall time), list flags, the model source (a real model or
random weights in an exact shape), tables with ratios, and JSON output with the device and command."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from pbs_engine.bench.shapes import SHAPES, shape_dir


def gpu_ms(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> float:
    """Median GPU time of fn in ms (triton's do_bench: L2 flushed, launches queued back to back)."""
    import triton

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def graph_ms(fn: Callable[[], object], rep: int = 100) -> float:
    """Median time of fn replayed from a CUDA graph, in ms: GPU time without launch overhead."""
    import triton

    fn()
    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")


def wall_s(fn: Callable[[], object]) -> float:
    """Wall time of one call in seconds, the device's queue drained before and after."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def gpu_profile(fn: Callable[[], object], ranges: tuple[str, ...] = ()) -> dict[str, float]:
    """One run of fn under torch.profiler: the wall time, the GPU kernel time ("gpu_s"), and the GPU time of the
    kernels launched inside each named torch.profiler.record_function range (e.g. "pbs.selection")."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    # kernels and copies only: the ranges' own GPU-side annotations span their kernels and would count them twice
    kernels = [e for e in events if e.device_type.name == "CUDA" and e.device_time_total > 0 and e.key not in ranges]
    out = {"wall_s": wall, "gpu_s": sum(e.device_time_total for e in kernels) / 1e6}
    for name in ranges:  # the CPU-side range's device time: its kernels' time
        out[name] = max((e.device_time_total for e in events if e.key == name), default=0.0) / 1e6
    return out


def numbers(text: str, flag: str, kind: type = int) -> list:
    """"1,2,3" -> [1, 2, 3]; a bad item names the flag."""
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated {kind.__name__}s") from None
    if not values:
        raise ValueError(f"{flag} is empty")
    return values


def model_source(spec: str, min_positions: int = 0) -> tuple[str, str, dict]:
    """(directory, load_format, config.json) for "random:<shape>" (random weights; its context raised to
    `min_positions` where shorter) or any --model of the engine."""
    if spec.startswith("random:"):
        name = spec.split(":", 1)[1]
        if name not in SHAPES:
            raise ValueError(f"--model {spec!r}: unknown shape; choose one of {', '.join(SHAPES)}")
        path = shape_dir(name, min_positions)
        return str(path), "dummy", json.loads((path / "config.json").read_text())
    from pbs_engine.engine.model_source import resolve_model

    path = resolve_model(spec)
    return str(path), "auto", json.loads((path / "config.json").read_text())


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, min(vocab, 30000), (n,), generator=g).tolist()


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def versions() -> str:
    try:
        import triton

        return f"torch {torch.__version__}, triton {triton.__version__}"
    except ImportError:
        return f"torch {torch.__version__}"


def print_table(title: str, rows: list[dict], cols: list[str] | None = None) -> None:
    """Right-aligned columns (every key of the rows unless `cols` picks), floats to 3 decimals, None as '-'."""
    if not rows:
        return
    cols = cols or list(dict.fromkeys(c for r in rows for c in r))

    def fmt(v) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    widths = [max(len(c), *(len(fmt(r.get(c))) for r in rows)) for c in cols]
    print(title)
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(fmt(r.get(c)).rjust(w) for c, w in zip(cols, widths)))
    print(flush=True)


def write_json(path: str | None, rows: list[dict], **extra) -> None:
    """The rows with the device, versions and the command line that made them (docs/results/<gpu>/*.json)."""
    if path:
        record = {"device": device_name(), "versions": versions(),
                  "command": "pbs-engine " + " ".join(sys.argv[1:]), **extra, "rows": rows}
        Path(path).write_text(json.dumps(record, indent=1))
