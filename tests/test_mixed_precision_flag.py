"""--mixed-precision: unset, Accelerate's launcher (ACCELERATE_MIXED_PRECISION, which
`accelerate launch --mixed_precision` or a config file's `mixed_precision` sets) decides; a
given flag wins. config.json records the precision the run used."""

import json

import pytest
from accelerate.state import AcceleratorState

from peftrec.pretraining.cli import parse_args, pretrain_parser, training_config
from peftrec.pretraining.trainer import build_accelerator
from tests.helpers import run_pretrain


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one precision per process: start and leave it unset."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def resolved_precision(tmp_path, *flags: str) -> str:
    args = parse_args(pretrain_parser("t"), ["--dataset", "x", "--cpu", *flags])
    return build_accelerator(training_config(args, tmp_path / "run")).mixed_precision


@pytest.mark.parametrize(("flags", "expected"), [((), "bf16"),
                                                 (("--mixed-precision", "no"), "no")])
def test_the_launchers_precision_applies_unless_the_flag_is_given(
        flags, expected, tmp_path, monkeypatch, fresh_accelerate_state):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # as `accelerate launch` sets it
    assert resolved_precision(tmp_path, *flags) == expected


def test_no_flag_and_no_launcher_is_full_precision(tmp_path, monkeypatch,
                                                    fresh_accelerate_state):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert resolved_precision(tmp_path) == "no"


def test_config_json_records_the_precision_used(tiny_dataset_dir, tmp_path, monkeypatch,
                                                fresh_accelerate_state):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    run = tmp_path / "run"
    run_pretrain(tiny_dataset_dir, run, "--epochs", "1", "--max-steps", "1")
    assert json.loads((run / "config.json").read_text())["training"]["mixed_precision"] == "bf16"
