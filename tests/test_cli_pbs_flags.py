"""The --pbs-* flags: generated from PBSConfig's fields, so every field has one and each reaches PBSConfig."""
from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

from pbs_engine.cli.common import add_model_args, pbs_config
from pbs_engine.kernels.config import PBSConfig


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_model_args(p)
    return p.parse_args(argv)


def test_every_field_has_a_flag_defaulting_to_pbsconfig():
    args = parse()
    assert {f.name for f in dataclasses.fields(PBSConfig)} == {k[4:] for k in vars(args) if k.startswith("pbs_")}
    assert pbs_config(args) == PBSConfig()


@pytest.mark.parametrize("argv, want", [(["--pbs-budget", "0.1"], dict(budget=0.1)),
                                        (["--no-pbs-permute"], dict(permute=False)),
                                        (["--pbs-permute"], dict(permute=True)),
                                        (["--pbs-block-size", "64", "--pbs-segment-size", "128"],
                                         dict(block_size=64, segment_size=128)),
                                        (["--pbs-threshold", "0.9"], dict(threshold=0.9)),
                                        (["--pbs-dense-last-blocks", "0"], dict(dense_last_blocks=0)),
                                        (["--pbs-block-score", "mean"], dict(block_score="mean")),
                                        (["--pbs-query-reps", "1"], dict(query_reps=1))])
def test_flag_reaches_pbsconfig(argv, want):
    assert pbs_config(parse(*argv)) == PBSConfig(**want)


@pytest.mark.parametrize("flag", ["--pbs-local-segments", "--pbs-dense-layers", "--pbs-max-blocks"])
def test_removed_knobs_have_no_flag(flag):
    with pytest.raises(SystemExit):
        parse(flag, "1")


def test_help_does_not_import_torch():
    code = "import sys; from pbs_engine.cli import common; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
