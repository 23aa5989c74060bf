"""The attention methods an evaluation compares, by name."""
from __future__ import annotations

from dataclasses import replace

from pbs_engine.kernels import PBSConfig


def methods(base: PBSConfig, thresholds: list[float] | None = None) -> dict[str, tuple[str, PBSConfig | None]]:
    """name -> (prefill attention, PBS config): dense, PBS with `base`, the same without permutation, a 10% budget,
    and PBS at each extra threshold."""
    table = {
        "dense": ("dense", None),
        "pbs": ("pbs", base),
        "pbs-nopermute": ("pbs", replace(base, permute=False)),
        "pbs-budget10": ("pbs", PBSConfig.budget_of(0.10, base)),
    }
    for t in thresholds or []:
        table[f"pbs-t{t:g}"] = ("pbs", replace(base, threshold=t))
    return table
