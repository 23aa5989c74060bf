"""Reading a model directory's files without trusting them: JSON objects and safetensors headers, checked as they
are read, each error naming the file and what is wrong with it."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import NamedTuple

from pbs_engine.models.errors import CorruptCheckpointError, ModelLoadError

# bytes per element of the safetensors dtypes torch can load
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


class TensorInfo(NamedTuple):
    dtype: str
    shape: tuple[int, ...]


def read_json_object(path: Path, error: type[ModelLoadError]) -> dict:
    """The JSON object in `path`; anything else (unreadable, not JSON, not an object) raises `error`."""
    try:
        data = json.loads(path.read_bytes())
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror})") from e
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise error(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise error(f"{path}: must hold a JSON object, not a {type(data).__name__}")
    return data


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Every tensor of a safetensors file, after checking that the header parses, that each tensor's offsets fit
    its dtype and shape, and that the data they cover is exactly the rest of the file (no truncation)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CorruptCheckpointError(f"{path}: {size} bytes, too short for a safetensors file (empty or truncated)")
        (length,) = struct.unpack("<Q", prefix)
        if 8 + length > size:
            raise CorruptCheckpointError(f"{path}: truncated or not a safetensors file: it declares a {length}-byte "
                                         f"header, the file has {size} bytes in all")
        blob = f.read(length)
    try:
        header = json.loads(blob)
    except ValueError as e:
        raise CorruptCheckpointError(f"{path}: the safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: the safetensors header is a {type(header).__name__}, not an object")
    tensors, spans = {}, []
    for name, entry in header.items():
        if name != "__metadata__":
            tensors[name], span = _tensor_entry(path, name, entry)
            spans.append((*span, name))
    end = 0
    for start, stop, name in sorted(spans):
        if start != end:
            raise CorruptCheckpointError(f"{path}: tensor {name!r} starts at data offset {start}, but the tensor "
                                         f"before it ends at {end} (overlapping or gapped offsets)")
        end = stop
    expected = 8 + length + end
    if expected > size:
        raise CorruptCheckpointError(f"{path}: truncated: its header needs {expected} bytes, the file has {size}")
    if expected < size:
        raise CorruptCheckpointError(
            f"{path}: {size - expected} bytes beyond the {expected} its header accounts for (corrupt file)")
    return tensors


def _tensor_entry(path: Path, name: str, entry) -> tuple[TensorInfo, tuple[int, int]]:
    """One header entry as (dtype, shape) and its byte span, checked for consistency."""
    if not isinstance(entry, dict):
        raise CorruptCheckpointError(f"{path}: header entry of tensor {name!r} is not an object: {entry!r}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise CorruptCheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CorruptCheckpointError(f"{path}: tensor {name!r} has invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise CorruptCheckpointError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    start, stop = offsets
    if stop - start != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise CorruptCheckpointError(f"{path}: tensor {name!r} ({dtype}, shape {shape}) needs "
                                     f"{math.prod(shape) * DTYPE_BYTES[dtype]} bytes, its data_offsets {offsets} "
                                     f"hold {stop - start}")
    return TensorInfo(dtype, tuple(shape)), (start, stop)
