"""Sizing the KV cache: --kv-cache-memory / --num-kv-blocks reach the engine; bad sizes name the flag or field."""
from __future__ import annotations

import argparse

import pytest

from pbs_engine import LLM
from pbs_engine.cli.common import add_model_args, llm_kwargs
from pbs_engine.engine.config import EngineConfig, parse_size


def model_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_model_args(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize("text, size", [("1000", 1000), ("512MiB", 512 << 20), ("2GiB", 2 << 30),
                                        ("1.5GB", 1_500_000_000), ("64 kib", 64 << 10), ("3G", 3 * 10**9)])
def test_sizes_take_bytes_or_a_unit(text, size):
    assert parse_size(text) == size


def test_num_kv_blocks_flag_sets_the_block_count(smollm2_path):
    llm = LLM(**llm_kwargs(model_args("--model", str(smollm2_path), "--device", "cpu", "--num-kv-blocks", "300")))
    assert llm.stats()["kv_total_blocks"] == 300


def test_kv_cache_memory_flag_sizes_the_cpu_cache(smollm2_path):
    llm = LLM(**llm_kwargs(model_args("--model", str(smollm2_path), "--device", "cpu", "--kv-cache-memory", "24MiB")))
    assert llm.stats()["kv_total_blocks"] == (24 << 20) // llm.engine.runner.kv_bytes_per_block()


@pytest.mark.parametrize("value", ["lots", "2XB", "-1GiB", "0"])
def test_bad_kv_cache_memory_flag_names_the_flag(value, capsys):
    with pytest.raises(SystemExit):
        model_args("--kv-cache-memory", value)
    assert "--kv-cache-memory" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, match", [(dict(kv_cache_memory="lots"), "kv_cache_memory"),
                                           (dict(kv_cache_memory=0), "kv_cache_memory"),
                                           (dict(kv_cache_memory="1GiB", num_kv_blocks=10), "give one")])
def test_bad_kv_cache_size_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(device="cpu", **kwargs)


def test_a_cache_too_small_for_one_block_is_an_error(smollm2_path):
    with pytest.raises(ValueError, match="kv_cache_memory"):
        LLM(str(smollm2_path), device="cpu", kv_cache_memory="1KiB")
