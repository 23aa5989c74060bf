"""Corrupt copies of a real model directory, one per way a download or an edit can break it, built in milliseconds.

Every file a case leaves alone is a symlink to the real one. A rewritten or truncated model.safetensors keeps (an
edit of) the real header and is extended to its length as a sparse file: its data reads as zeros and costs no copy.
CASES maps each case to (what it does to the directory, the file or field its error must name)."""
from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
Edit = Callable[[Path], None]


def build(case: str, real: Path, dst: Path) -> Path:
    """The model directory of `case`: symlinks to the files of the real model directory `real`, one of them broken."""
    dst.mkdir(parents=True)
    for f in real.iterdir():
        (dst / f.name).symlink_to(f)
    CASES[case][0](dst)
    return dst


def cut(src: Path, dst: Path, keep: int) -> Path:
    """`src` cut to `keep` bytes: its first 4 MiB as they are (past the headers of SmolLM2's safetensors and GGUF),
    zeros (sparse) after that."""
    with open(src, "rb") as f:
        head = f.read(min(keep, 4 << 20))
    dst.unlink(missing_ok=True)
    with open(dst, "wb") as f:
        f.write(head)
        f.truncate(keep)
    return dst


def read_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def tensors(header: dict) -> list[str]:
    return [k for k in header if k != "__metadata__"]


def data_size(header: dict) -> int:
    return max(header[k]["data_offsets"][1] for k in tensors(header))


def write_safetensors(path: Path, header: dict | bytes, size: int | None = None) -> None:
    """A safetensors file: `header` (a dict, or raw bytes), then `size` zero bytes (default: what its offsets need)."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + (data_size(header) if size is None else size))


def steps(*edits: Edit) -> Edit:
    def apply(dst: Path) -> None:
        for edit in edits:
            edit(dst)
    return apply


def write(name: str, content: bytes | str) -> Edit:
    def apply(dst: Path) -> None:
        (dst / name).unlink(missing_ok=True)
        (dst / name).write_bytes(content.encode() if isinstance(content, str) else content)
    return apply


def edit_json(name: str, **fields) -> Edit:
    def apply(dst: Path) -> None:
        write(name, json.dumps({**json.loads((dst / name).read_text()), **fields}))(dst)
    return apply


def edit_config(**fields) -> Edit:
    return edit_json("config.json", **fields)


def truncate_weights(keep: Callable[[Path], int]) -> Edit:
    """model.safetensors cut to keep(the real file) bytes."""
    def apply(dst: Path) -> None:
        real = (dst / WEIGHTS).resolve()
        cut(real, dst / WEIGHTS, keep(real))
    return apply


def header_length(path: Path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def edit_weights(edit: Callable[[dict], None], size: Callable[[int], int] | None = None) -> Edit:
    """model.safetensors rewritten with an edited real header; size(the real data length) gives its data length
    (default: what the edited header's offsets need)."""
    def apply(dst: Path) -> None:
        header = read_header(dst / WEIGHTS)
        real_size = data_size(header)
        edit(header)
        write_safetensors(dst / WEIGHTS, header, None if size is None else size(real_size))
    return apply


def set_tensor(name: str, **fields) -> Callable[[dict], None]:
    return lambda header: header[name].update(fields)


def last_tensor(header: dict) -> str:
    return max(tensors(header), key=lambda k: header[k]["data_offsets"][1])


def sharded(**shards: Callable[[dict, Path], None]) -> Edit:
    """An index splitting the real tensors between shards `<name>.safetensors`, each written by its function from
    the header of its tensors."""
    def apply(dst: Path) -> None:
        header = read_header(dst / WEIGHTS)
        (dst / WEIGHTS).unlink()
        names = sorted(tensors(header))
        files = [f"{shard}.safetensors" for shard in shards]
        weight_map = {name: files[i * len(files) // len(names)] for i, name in enumerate(names)}
        write(INDEX, json.dumps({"weight_map": weight_map}))(dst)
        for file, make in zip(files, shards.values()):
            mine, offset = {"__metadata__": header["__metadata__"]}, 0
            for name in (n for n in names if weight_map[n] == file):
                start, end = header[name]["data_offsets"]
                mine[name] = {**header[name], "data_offsets": [offset, offset + end - start]}
                offset += end - start
            make(mine, dst / file)
    return apply


def complete_shard(header: dict, path: Path) -> None:
    write_safetensors(path, header)


def truncated_shard(header: dict, path: Path) -> None:
    write_safetensors(path, header, data_size(header) // 2)


def absent_shard(header: dict, path: Path) -> None:
    """The index names this shard, but it is not written."""


def drop_last_tensor(header: dict) -> None:
    del header[last_tensor(header)]


def add_tensor(header: dict) -> None:
    end = data_size(header)
    header["model.extra.weight"] = {"dtype": "BF16", "shape": [1], "data_offsets": [end, end + 2]}


# the cases only the built model can judge (a tensor's place, dtype or shape): caught before any data is read
AGAINST_MODEL = {"weights integer dtype", "weights wrong shape", "weights wrong shape in merged projection",
                 "weights missing tensor", "weights unexpected tensor", "weights vocab_size of config.json disagrees"}
CASES: dict[str, tuple[Edit, str]] = {
    # model.safetensors: integrity
    "weights empty": (truncate_weights(lambda real: 0), WEIGHTS),
    "weights 4 bytes": (truncate_weights(lambda real: 4), WEIGHTS),
    "weights 8 bytes": (truncate_weights(lambda real: 8), WEIGHTS),
    "weights header cut": (truncate_weights(lambda real: 8 + header_length(real) // 2), WEIGHTS),
    "weights header only": (truncate_weights(lambda real: 8 + header_length(real)), WEIGHTS),
    "weights truncated to half": (truncate_weights(lambda real: real.stat().st_size // 2), WEIGHTS),
    "weights one byte short": (truncate_weights(lambda real: real.stat().st_size - 1), WEIGHTS),
    "weights trailing bytes": (edit_weights(lambda h: None, size=lambda n: n + 100), WEIGHTS),
    "weights header length huge": (write(WEIGHTS, struct.pack("<Q", 1 << 40) + b"{}"), WEIGHTS),
    "weights header not json": (lambda dst: write_safetensors(dst / WEIGHTS, b"\x00garbage\xff" * 10, 0), WEIGHTS),
    "weights header a list": (lambda dst: write_safetensors(dst / WEIGHTS, b"[1, 2, 3]", 0), WEIGHTS),
    "weights tensor entry not an object": (edit_weights(lambda h: h.update({"model.extra.weight": 5}),
                                                        size=lambda n: n), WEIGHTS),
    "weights offsets beyond file": (edit_weights(lambda h: h[last_tensor(h)]["data_offsets"].__setitem__(1, 1 << 40),
                                                 size=lambda n: n), WEIGHTS),
    "weights offsets disagree with shape": (edit_weights(set_tensor("model.norm.weight", shape=[577])), WEIGHTS),
    "weights overlapping offsets": (edit_weights(set_tensor("model.layers.0.input_layernorm.weight",
                                                            data_offsets=[0, 1152])), WEIGHTS),
    "weights unknown dtype": (edit_weights(set_tensor("model.norm.weight", dtype="Q4")), WEIGHTS),
    # model.safetensors: tensors against the model
    "weights integer dtype": (edit_weights(set_tensor("model.norm.weight", dtype="I16")), WEIGHTS),
    "weights wrong shape": (edit_weights(set_tensor("model.norm.weight", shape=[2, 288])), WEIGHTS),
    "weights wrong shape in merged projection": (
        edit_weights(set_tensor("model.layers.0.self_attn.k_proj.weight", shape=[576, 192])), WEIGHTS),
    "weights missing tensor": (edit_weights(drop_last_tensor), WEIGHTS),
    "weights unexpected tensor": (edit_weights(add_tensor), WEIGHTS),
    "weights vocab_size of config.json disagrees": (edit_config(vocab_size=1000), WEIGHTS),
    # sharded checkpoints
    "index not json": (steps(sharded(a=complete_shard), write(INDEX, "{oops")), INDEX),
    "index weight_map a list": (steps(sharded(a=complete_shard), write(INDEX, '{"weight_map": []}')), INDEX),
    "index names an absent shard": (sharded(a=complete_shard, b=absent_shard), "b.safetensors"),
    "index names a truncated shard": (sharded(a=complete_shard, b=truncated_shard), "b.safetensors"),
    # config.json
    "config empty": (write("config.json", ""), "config.json"),
    "config not json": (write("config.json", "{not json"), "config.json"),
    "config not utf-8": (write("config.json", b"\xff\xfe\x00garbage"), "config.json"),
    "config a list": (write("config.json", "[1, 2]"), "config.json"),
    "config hidden_size a string": (edit_config(hidden_size="big"), "hidden_size"),
    "config hidden_size null": (edit_config(hidden_size=None), "hidden_size"),
    "config hidden_size a list": (edit_config(hidden_size=[576]), "hidden_size"),
    "config hidden_size negative": (edit_config(hidden_size=-576), "hidden_size"),
    "config hidden_size fractional": (edit_config(hidden_size=576.5), "hidden_size"),
    "config num_attention_heads zero": (edit_config(num_attention_heads=0), "num_attention_heads"),
    "config heads do not divide hidden_size": (edit_config(num_attention_heads=7, num_key_value_heads=7,
                                                           head_dim=None), "num_attention_heads"),
    "config kv heads do not divide heads": (edit_config(num_key_value_heads=2), "num_key_value_heads"),
    "config vocab_size zero": (edit_config(vocab_size=0), "vocab_size"),
    "config num_hidden_layers zero": (edit_config(num_hidden_layers=0), "num_hidden_layers"),
    "config max_position_embeddings negative": (edit_config(max_position_embeddings=-1), "max_position_embeddings"),
    "config rms_norm_eps a string": (edit_config(rms_norm_eps="small"), "rms_norm_eps"),
    "config rope_theta zero": (edit_config(rope_theta=0), "rope_theta"),
    "config tie_word_embeddings a string": (edit_config(tie_word_embeddings="yes"), "tie_word_embeddings"),
    "config architectures a string": (edit_config(architectures="LlamaForCausalLM"), "architectures"),
    "config rope_scaling a string": (edit_config(rope_scaling="yes"), "rope_scaling"),
    "config rope_scaling llama3 without factor": (edit_config(rope_scaling={"rope_type": "llama3"}), "rope_scaling"),
    "config torch_dtype a number": (edit_config(torch_dtype=16), "torch_dtype"),
    # tokenizer files
    "tokenizer empty": (write("tokenizer.json", ""), "tokenizer.json"),
    "tokenizer garbage": (write("tokenizer.json", "garbage, not a tokenizer"), "tokenizer.json"),
    "tokenizer not utf-8": (write("tokenizer.json", b"\xff\xfe\x00garbage"), "tokenizer.json"),
    "tokenizer an empty object": (write("tokenizer.json", "{}"), "tokenizer.json"),
    "tokenizer truncated": (lambda dst: cut(dst / "tokenizer.json", dst / "tokenizer.json", 5000), "tokenizer.json"),
    "tokenizer_config not json": (write("tokenizer_config.json", "{oops"), "tokenizer_config.json"),
    "tokenizer_config a list": (write("tokenizer_config.json", "[]"), "tokenizer_config.json"),
    "tokenizer_config chat_template a number": (edit_json("tokenizer_config.json", chat_template=5), "chat_template"),
    "tokenizer_config chat_template list of strings": (edit_json("tokenizer_config.json", chat_template=["a"]),
                                                       "chat_template"),
    "tokenizer_config eos_token a number": (edit_json("tokenizer_config.json", eos_token=2), "eos_token"),
    "chat_template.jinja not utf-8": (steps(edit_json("tokenizer_config.json", chat_template=None),
                                            write("chat_template.jinja", b"\xff\xfe{{ x }}")), "chat_template.jinja"),
    "generation_config not json": (write("generation_config.json", "garbage"), "generation_config.json"),
    "generation_config a list": (write("generation_config.json", "[2]"), "generation_config.json"),
    "generation_config eos_token_id a string": (edit_json("generation_config.json", eos_token_id="</s>"),
                                                "eos_token_id"),
}
