"""Default presets (issue 27 item 6): `--backbone NAME` alone trains with NAME's default
preset, below a `--config` file and the command line; `--preset none` opts out; the run's
config.json names the preset it ran with."""

from __future__ import annotations

import json

import pytest

from peftrec.pretraining.cli import CommandLineError, model_config, parse_args, pretrain_parser
from peftrec.pretraining.presets import DEFAULT_PRESETS, PRESETS
from peftrec.pretraining.recommender import BACKBONES
from tests.helpers import SMALL


def parse(*argv: str):
    return parse_args(pretrain_parser("t"), list(argv))


def values(args, preset: str) -> dict:
    """What `args` holds for each setting of `preset`, as the preset writes it."""
    flags = {option: action.dest for action in pretrain_parser("t")._actions
             for option in action.option_strings}
    parsed = {flag: getattr(args, flags["--" + flag]) for flag in PRESETS[preset].settings}
    return {flag: list(value) if isinstance(value, tuple) else value
            for flag, value in parsed.items()}


# `--backbone NAME` alone must be enough, but for DreamRec: its MSE collapses a trained item
# table, and without a SASRec run's it learns nothing (docs/default-presets.md).
NEEDS_A_RUN = {"dreamrec"}


def needed(preset: str) -> list[str]:
    return [item for flag in PRESETS[preset].needs for item in (flag, "RUN")]


def test_each_default_preset_belongs_to_a_registered_backbone_and_sets_it():
    for backbone, preset in DEFAULT_PRESETS.items():
        assert backbone in BACKBONES
        assert PRESETS[preset].settings["backbone"] == backbone
        assert bool(PRESETS[preset].needs) == (backbone in NEEDS_A_RUN)


def test_dreamrec_alone_is_refused_in_one_line_naming_the_fix():
    with pytest.raises(CommandLineError, match=r"^--backbone dreamrec \(its default preset "
                       r"dreamrec-default; --preset none opts out\) needs --init-items-from: "
                       r"DreamRec's MSE alone .* a SASRec run's table"):
        parse("--backbone", "dreamrec")
    assert parse("--backbone", "dreamrec", "--preset", "none").freeze_items_epochs == 0


@pytest.mark.parametrize("backbone", sorted(DEFAULT_PRESETS))
def test_the_backbone_alone_resolves_to_its_default_presets_settings(backbone):
    preset = DEFAULT_PRESETS[backbone]
    args = parse("--backbone", backbone, *needed(preset))
    assert args.preset == preset
    assert values(args, preset) == PRESETS[preset].settings
    model_config(args, num_items=10, fingerprint="f")  # a valid model


def test_a_flag_overrides_the_default_preset_and_the_rest_stays():
    args = parse("--backbone", "diffrec", "--lr", "5e-3", "--no-repeat-bias", "--max-len", "20")
    assert (args.lr, args.repeat_bias, args.max_len) == (5e-3, False, 20)
    assert (args.every_position, args.train_windows, args.batch_size) == (True, "all", 64)


def test_a_config_file_naming_the_backbone_applies_its_preset_below_the_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("backbone: diffrec\nlr: 0.0005\n")
    args = parse("--config", str(config), "--batch-size", "32")
    assert (args.preset, args.every_position) == ("diffrec-default", True)  # the preset's
    assert args.lr == 0.0005  # the file's over the preset's
    assert args.batch_size == 32  # the command line's over both


def test_preset_none_and_a_named_preset_replace_the_default():
    plain = parse("--backbone", "diffrec", "--preset", "none")
    assert plain.preset == "none"
    assert (plain.every_position, plain.repeat_bias, plain.max_len, plain.train_windows,
            plain.lr) == (False, False, 200, "last", 1e-3)  # the flags' own defaults
    paper = parse("--backbone", "diffrec", "--preset", "diffrec-paper")
    assert (paper.preset, paper.every_position, paper.train_windows) == (
        "diffrec-paper", False, "prefixes")


def test_the_default_backbone_trains_with_sasrecs_default_preset():
    args = parse()
    assert (args.preset, args.backbone, args.repeat_bias, args.train_windows) == (
        "sasrec-default", "sasrec", True, "all")
    plain = parse("--preset", "none")
    assert (plain.preset, plain.repeat_bias, plain.train_windows) == ("none", False, "last")


def test_config_json_records_the_default_preset(tiny_dataset_dir, tmp_path):
    from peftrec.pretraining.pipeline import pretrain

    run = tmp_path / "run"
    pretrain(parse("--backbone", "diffrec", "--dataset", str(tiny_dataset_dir), "--output-dir",
                   str(run), *SMALL, "--epochs", "1", "--max-steps", "1", "--eval-users", "8",
                   "--diffusion-steps", "10", "--num-seeds", "1"))
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["preset"] == "diffrec-default"
    assert recorded["model"]["backbone_config"]["every_position"] is True


@pytest.mark.parametrize("recorded, expected", [
    # None: recorded as such runs recorded it, so their config.json still matches.
    ({}, (None, False, "last")),  # a run from before presets were recorded
    ({"preset": None}, (None, False, "last")),  # before its backbone had a default preset
    ({"preset": "sasrec-default"}, ("sasrec-default", True, "all")),
])
def test_resume_without_preset_continues_with_the_runs_own_preset(tmp_path, recorded, expected):
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    args = parse("--output-dir", str(tmp_path), "--resume")
    assert (args.preset, args.repeat_bias, args.train_windows) == expected
    # A preset given (or no run to resume) is what applies, as without --resume.
    assert parse("--output-dir", str(tmp_path), "--resume", "--preset", "none").preset == "none"
    assert parse("--output-dir", str(tmp_path / "new"), "--resume").preset == "sasrec-default"
