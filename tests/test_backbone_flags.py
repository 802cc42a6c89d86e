"""ADRec's and DiffuRec's own settings are flags declared by their config fields (issue 27
item 7): each sets its backbone's field, and another backbone refuses it in one line."""

from __future__ import annotations

import pytest
import torch

from peftrec.pretraining.cli import CommandLineError, model_config, parse_args, pretrain_parser


@pytest.mark.parametrize(("backbone", "flag", "field"), [
    ("adrec", "--guide-scale", "guide_scale"), ("diffurec", "--uncertainty", "uncertainty")])
def test_a_backbones_own_flag_sets_its_field_and_others_refuse_it(backbone, flag, field):
    args = parse_args(pretrain_parser("t"), ["--backbone", backbone, flag, "0.01"])
    assert model_config(args, 10, "f").backbone_config[field] == 0.01
    with pytest.raises(CommandLineError, match=f"^{flag}: .* do nothing with --backbone "
                       f"diffrec; drop them or use --backbone {backbone}$"):
        parse_args(pretrain_parser("t"), ["--backbone", "diffrec", flag, "0.01"])


# The reference code's values: ADRec's src/config.yaml, DiffuRec's src/main.py.
OWN_DEFAULTS = {
    "adrec": {"schedule": "truncated-linear", "num_steps": 32, "num_seeds": 1, "mse_weight": 1.0},
    "diffurec": {"schedule": "truncated-linear", "num_steps": 32, "num_seeds": 1},
    "diffrec": {"schedule": "sqrt", "num_steps": 1000, "num_seeds": 10, "mse_weight": 1.0},
}
OVERRIDES = {"--schedule": "sqrt", "--diffusion-steps": "50", "--num-seeds": "3",
             "--mse-weight": "0.5"}
FIELDS = {"--schedule": "schedule", "--diffusion-steps": "num_steps",
          "--num-seeds": "num_seeds", "--mse-weight": "mse_weight"}


@pytest.mark.parametrize("backbone", sorted(OWN_DEFAULTS))
def test_the_shared_diffusion_flags_default_to_each_backbones_own_and_a_flag_overrides(backbone):
    args = parse_args(pretrain_parser("t"), ["--backbone", backbone, "--preset", "none"])
    config = model_config(args, 10, "f").backbone_settings()
    assert {name: getattr(config, name) for name in OWN_DEFAULTS[backbone]} == \
        OWN_DEFAULTS[backbone]
    given = [flag for flag, name in FIELDS.items() if name in OWN_DEFAULTS[backbone]]
    argv = [word for flag in given for word in (flag, OVERRIDES[flag])]
    args = parse_args(pretrain_parser("t"), ["--backbone", backbone, *argv])
    config = model_config(args, 10, "f").backbone_settings()
    for flag in given:
        assert str(getattr(config, FIELDS[flag])) == OVERRIDES[flag], flag


def test_a_shared_flag_a_backbone_does_not_read_is_refused():
    with pytest.raises(CommandLineError, match="^--mse-weight: .* do nothing with --backbone "
                       "diffurec; drop them or use --backbone"):
        parse_args(pretrain_parser("t"), ["--backbone", "diffurec", "--mse-weight", "0.5"])
    # Unset until a backbone reads it, so even its DiffRec value is refused with SASRec.
    with pytest.raises(CommandLineError, match="^--diffusion-steps: .* --backbone sasrec"):
        parse_args(pretrain_parser("t"), ["--backbone", "sasrec", "--diffusion-steps", "1000"])


@pytest.mark.parametrize("backbone", ["adrec", "diffurec"])
def test_the_number_of_seeds_changes_after_training(backbone):
    from peftrec.pretraining.recommender import RecommenderConfig, SequentialRecommender
    tiny = {"hidden_size": 8, "num_layers": 1, "num_heads": 2, "ffn_size": 16, "max_len": 6,
            "num_steps": 3}
    model = SequentialRecommender(RecommenderConfig(num_items=7, backbone=backbone,
                                                    backbone_config=tiny)).eval()
    model.set_inference(num_seeds=4)
    query = model.query({"input_ids": torch.tensor([[0, 1, 2]])})
    assert query.predicted.shape[:2] == (1, 4)
