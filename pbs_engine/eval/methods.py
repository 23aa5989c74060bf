"""The attention methods an evaluation compares, by name."""
from __future__ import annotations

import dataclasses
from dataclasses import replace

from pbs_engine.kernels import PBSConfig


def parse_variant(spec: str) -> tuple[str, dict]:
    """"NAME=field:value,field:value" (PBSConfig fields) -> (NAME, {field: value})."""
    name, _, body = spec.partition("=")
    fields = {f.name: f.type for f in dataclasses.fields(PBSConfig)}
    out: dict = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition(":")
        if key not in fields or not value:
            raise ValueError(f"--variant {spec!r}: {item!r} is not FIELD:VALUE with FIELD one of {sorted(fields)}")
        kind = fields[key].split(" |")[0]  # the annotation, "int | None" -> "int"
        out[key] = {"bool": lambda x: x.lower() in ("1", "true"), "int": int, "float": float, "str": str}[kind](value)
    if not name or not out:
        raise ValueError(f"--variant {spec!r}: expected NAME=field:value[,field:value...]")
    return name, out


def methods(base: PBSConfig, thresholds: list[float] | None = None,
            variants: list[str] | None = None) -> dict[str, tuple[str, PBSConfig | None]]:
    """name -> (prefill attention, PBS config): dense, PBS with `base`, the same with the permutation switched (on
    or off), a 10% budget,
    PBS at each extra threshold, and each named variant of `base` ("NAME=field:value,...")."""
    table = {
        "dense": ("dense", None),
        "pbs": ("pbs", base),
        ("pbs-nopermute" if base.permute else "pbs-permute"): ("pbs", replace(base, permute=not base.permute)),
        "pbs-budget10": ("pbs", PBSConfig.budget_of(0.10, base)),
    }
    for t in thresholds or []:
        table[f"pbs-t{t:g}"] = ("pbs", replace(base, threshold=t))
    for spec in variants or []:
        name, fields = parse_variant(spec)
        table[name] = ("pbs", replace(base, **fields))
    return table
