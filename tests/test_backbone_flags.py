"""ADRec's and DiffuRec's own settings are flags declared by their config fields (issue 27
item 7): each sets its backbone's field, and another backbone refuses it in one line."""

from __future__ import annotations

import pytest

from peftrec.pretraining.cli import CommandLineError, model_config, parse_args, pretrain_parser


@pytest.mark.parametrize(("backbone", "flag", "field"), [
    ("adrec", "--guide-scale", "guide_scale"), ("diffurec", "--uncertainty", "uncertainty")])
def test_a_backbones_own_flag_sets_its_field_and_others_refuse_it(backbone, flag, field):
    args = parse_args(pretrain_parser("t"), ["--backbone", backbone, flag, "0.01"])
    assert model_config(args, 10, "f").backbone_config[field] == 0.01
    with pytest.raises(CommandLineError, match=f"^{flag}: .* do nothing with --backbone "
                       f"diffrec; drop them or use --backbone {backbone}$"):
        parse_args(pretrain_parser("t"), ["--backbone", "diffrec", flag, "0.01"])
