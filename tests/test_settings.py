"""One declaration per setting: the scripts' flags come from the config dataclasses' fields
(name, type, default, help, choices), `--config` files name them as flags or as fields,
and presets sit below the file and the command line (issue 26 item 1, issue 27)."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from peftrec.downstream.cli import finetune_parser
from peftrec.downstream.serving import recommend_parser
from peftrec.pretraining.cli import (
    CommandLineError,
    RunSettings,
    backbone_defaults,
    evaluate_parser,
    flag_fields,
    flag_name,
    model_config,
    parse_args,
    pretrain_parser,
    protocol_config,
    settings,
    training_config,
)
from peftrec.pretraining.diffrec import DiffRecConfig
from peftrec.pretraining.evaluation import EvaluationProtocol
from peftrec.pretraining.presets import PRESETS
from peftrec.pretraining.recommender import RecommenderConfig
from peftrec.pretraining.trainer import TrainingConfig
from tests.helpers import ROOT, SMALL, load_script

PRETRAINING_CONFIGS = [RecommenderConfig, DiffRecConfig, TrainingConfig, EvaluationProtocol,
                       RunSettings]


def options(parser) -> dict:
    return {option: action for action in parser._actions for option in action.option_strings}


@pytest.mark.parametrize("config_class", PRETRAINING_CONFIGS, ids=lambda c: c.__name__)
def test_every_setting_with_help_is_a_flag_with_the_fields_default_and_help(config_class):
    flags = options(pretrain_parser("t", "text"))
    for setting in flag_fields(config_class):
        if setting.name == "unfreeze_every":  # full fine-tuning's alone
            continue
        action = flags[flag_name(setting)]
        assert action.dest == setting.name and action.help.startswith(setting.metadata["help"])
        default = (setting.default if setting.default_factory is dataclasses.MISSING
                   else setting.default_factory())
        if setting.name == "item_encoder":  # a content script's default: its modality
            default = "text"
        if len({str(value) for value in backbone_defaults(setting.name).values()}) > 1:
            # Each backbone's own default (ADRec's 32 steps, DiffRec's 1000), set once the
            # backbone is known; the help lists them.
            assert action.default is None and f"{default} for diffrec" in action.help
        else:
            assert action.default == default and action.help == setting.metadata["help"], \
                setting.name


def test_the_parsed_flags_fill_the_configs_with_the_dataclass_defaults():
    args = parse_args(pretrain_parser("t"), ["--backbone", "diffrec", "--preset", "none"])
    config = model_config(args, num_items=10, fingerprint="f")
    assert config.backbone_settings() == DiffRecConfig()
    assert training_config(args, "out") == TrainingConfig(output_dir="out")
    assert protocol_config(args) == EvaluationProtocol(user_sample_seed=args.seed)


def test_a_flag_named_apart_from_its_field_sets_the_field(tmp_path):
    args = parse_args(pretrain_parser("t"), ["--backbone", "diffrec", "--diffusion-steps", "7",
                                             "--eval-users", "5"])
    assert model_config(args, 10, "f").backbone_settings().num_steps == 7
    assert protocol_config(args).max_users == 5
    # A --config file may name a setting by its flag or by its field.
    config = tmp_path / "run.yaml"
    for text in ("diffusion-steps: 9\n", "diffusion_steps: 9\n", "num_steps: 9\n"):
        config.write_text("backbone: diffrec\n" + text)
        args = parse_args(pretrain_parser("t"), ["--config", str(config)])
        assert args.num_steps == 9, text


def test_a_switch_set_by_the_config_file_is_undone_by_its_no_flag(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("repeat-bias: true\nmask_history: true\n")
    args = parse_args(pretrain_parser("t"), ["--config", str(config), "--no-repeat-bias"])
    assert (args.repeat_bias, args.mask_history) == (False, True)
    config.write_text("no-repeat-bias: true\n")  # the --no- form is no setting name
    with pytest.raises(CommandLineError, match="unknown settings"):
        parse_args(pretrain_parser("t"), ["--config", str(config)])


@pytest.mark.parametrize(("parser", "absent"), [
    (evaluate_parser, ["--output-dir", "--preset", "--epochs"]),
    (recommend_parser, ["--output-dir", "--seed", "--preset"]),
    (lambda d: finetune_parser(d), ["--preset"]),
], ids=["evaluate", "recommend", "finetune_full"])
def test_scripts_have_no_flags_they_ignore(parser, absent):
    flags = options(parser("t"))
    assert not set(absent) & set(flags)


def test_the_shared_settings_are_declared_once():
    """evaluate and recommend take --eval-batch-size (and evaluate the inference settings)
    from the same fields as training; a fine-tuning --loss from RecommenderConfig's."""
    field_help = {f.name: f.metadata["help"] for config in PRETRAINING_CONFIGS
                  for f in flag_fields(config)}
    for parser in (evaluate_parser("t"), recommend_parser("t"), finetune_parser("t")):
        assert options(parser)["--eval-batch-size"].help == field_help["eval_batch_size"]
    assert options(evaluate_parser("t"))["--num-seeds"].help == field_help["num_seeds"]
    assert options(finetune_parser("t"))["--loss"].help == field_help["loss"]


def test_the_adapter_placement_flags_are_the_adapter_configs_fields():
    from peftrec.adapters.base import AdapterConfig
    from peftrec.downstream.cli import adapter_config

    flags = options(finetune_parser("t", ("houlsby", "pfeiffer")))
    for setting in flag_fields(AdapterConfig):
        assert flags[flag_name(setting)].default == setting.default, setting.name
    args = parse_args(finetune_parser("t", ("houlsby", "pfeiffer")), [
        "--pretrained", "runs/base", "--method", "pfeiffer", "--tune", "layernorm,bias"])
    config = adapter_config(args)
    assert (config.extras, config.layers, config.sites) == (("layernorm", "bias"), "all",
                                                            ("ffn",))


def test_every_adapter_setting_is_a_flag_with_its_fields_help_and_choices():
    from peftrec.adapters import ADAPTERS
    from peftrec.adapters.base import AdapterConfig

    placement = {setting.name for setting in dataclasses.fields(AdapterConfig)}
    for method, (config_class, _) in ADAPTERS.items():
        flags = options(finetune_parser("t", (method,)))
        for setting in dataclasses.fields(config_class):
            if setting.name not in placement:
                action = flags["--" + setting.name.replace("_", "-")]
                assert action.help.startswith(setting.metadata["help"]), (method, setting.name)
                assert action.choices == (list(setting.metadata["choices"])
                                          if "choices" in setting.metadata else None)
    assert options(finetune_parser("t", ("houlsby",)))["--non-linearity"].choices == [
        "swish", "relu", "gelu"]


@pytest.mark.parametrize("parser", [pretrain_parser, evaluate_parser, recommend_parser,
                                    finetune_parser], ids=lambda p: p.__name__)
def test_help_does_not_repeat_default_none(parser):
    assert "(default: None)" not in parser("t").format_help()


def test_finetuning_settings_left_out_stay_unset():
    args = parse_args(finetune_parser("t"), ["--pretrained", "runs/base"])
    assert (args.backbone, args.loss, args.num_negatives, args.repeat_bias) == (
        None, None, None, False)


def test_the_content_encoder_flags_are_its_settings_fields(tmp_path):
    from peftrec.modality_encoders import ContentEncoderSettings

    flags = options(pretrain_parser("t", "text"))
    image = options(pretrain_parser("t", "image"))
    for setting in flag_fields(ContentEncoderSettings):
        if setting.name != "image_store":
            assert flags[flag_name(setting)].help == setting.metadata["help"], setting.name
    assert (flags["--encoder"].default, flags["--pooling"].default) == ("minilm", "mean")
    assert (image["--pooling"].default, image["--encoder"].required,
            image["--image-store"].required) == ("cls", True, True)
    assert "--image-store" not in flags and "--text-template" not in image
    # The fine-tuning scripts' target overrides are the same settings, unset by default.
    target = options(finetune_parser("t"))
    for flag in ("--encoder", "--text-template", "--image-store"):
        assert (target[flag].help, target[flag].default) == (flags.get(
            flag, image.get(flag)).help, None)
    args = parse_args(pretrain_parser("t", "text"), ["--train-encoder"])
    assert args.freeze is False
    config = tmp_path / "run.yaml"
    config.write_text("freeze_encoder: false\n")
    assert parse_args(pretrain_parser("t", "text"), ["--config", str(config)]).freeze is False
    config.write_text("train_encoder: true\n")  # sets the opposite of its value: not a name
    with pytest.raises(CommandLineError, match="unknown settings"):
        parse_args(pretrain_parser("t", "text"), ["--config", str(config)])


def test_the_data_scripts_flags_are_their_configs_fields(tmp_path, capsys):
    from peftrec.dataset_tools import PrepareConfig
    from peftrec.dataset_tools.synthetic import SyntheticConfig

    synthetic = load_script("generate_synthetic").parse_arguments
    args = synthetic(["--interactions", "1000", "--items", "50", "--topics", "5",
                      "--output-dir", str(tmp_path)])
    assert SyntheticConfig(**settings(args, SyntheticConfig)) == SyntheticConfig(
        num_interactions=1000, num_items=50, num_topics=5)
    with pytest.raises(SystemExit):  # a field without a default is a required flag
        synthetic(["--interactions", "1000", "--output-dir", str(tmp_path)])
    assert "the following arguments are required: --items" in capsys.readouterr().err
    args = load_script("prepare_data").parse_arguments(
        ["--input", "log.csv", "--format", "csv", "--output", str(tmp_path), "--k-core", "3"])
    assert PrepareConfig(**settings(args, PrepareConfig)) == PrepareConfig(k_core=3)


# --- presets -------------------------------------------------------------------------------


def preset_argv(name: str) -> list[str]:
    """`--preset name` with the flags the preset needs given."""
    return ["--preset", name, *[item for flag in PRESETS[name].needs for item in (flag, "RUN")]]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_resolves_to_its_settings(name):
    args = parse_args(pretrain_parser("t"), preset_argv(name))
    flags = options(pretrain_parser("t"))
    for flag, value in PRESETS[name].settings.items():
        parsed = getattr(args, flags["--" + flag].dest)
        assert (list(parsed) if isinstance(value, list) else parsed) == value, flag
    model_config(args, num_items=10, fingerprint="f")  # the settings make a valid model
    training_config(args, "out")


def test_a_flag_overrides_the_preset():
    args = parse_args(pretrain_parser("t"), [*preset_argv("diffrec-plus"), "--lr", "5e-3",
                                             "--no-every-position", "--decay-epochs", "4"])
    assert (args.lr, args.every_position, args.decay_epochs) == (5e-3, False, [4])
    assert (args.causal_denoiser, args.hidden_size) == (True, 256)  # the rest is the preset's


def test_precedence_is_preset_then_config_file_then_command_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("preset: diffrec-paper\nlr: 0.002\nbatch-size: 64\n")
    args = parse_args(pretrain_parser("t"), ["--config", str(config), "--batch-size", "32"])
    assert args.epochs == 50  # the preset's, over the default
    assert args.lr == 0.002  # the file's, over the preset's
    assert args.batch_size == 32  # the command line's, over the file's
    # A preset named on the command line replaces the file's.
    args = parse_args(pretrain_parser("t"), ["--config", str(config), "--preset",
                                             "diffrec-plus", "--init-items-from", "RUN"])
    assert (args.lr, args.every_position, args.train_windows) == (0.002, True, "all")


def test_preset_errors_name_the_problem(tmp_path):
    with pytest.raises(CommandLineError, match="--preset diffrec-plus needs --init-items-from"):
        parse_args(pretrain_parser("t"), ["--preset", "diffrec-plus"])
    config = tmp_path / "run.yaml"
    config.write_text("preset: diffrec-best\n")
    with pytest.raises(CommandLineError, match="preset: 'diffrec-best' is not one of"):
        parse_args(pretrain_parser("t"), ["--config", str(config)])


def test_the_user_guide_lists_every_presets_settings():
    guide = (ROOT / "docs" / "user-guide.md").read_text()
    section = guide.split("\n## Presets\n", 1)[1].split("\n## ", 1)[0]
    rows = {match[1]: match[2] for match in re.finditer(r"^\| `([\w-]+)` \| (.*)$", section,
                                                         re.MULTILINE)}
    assert set(rows) == set(PRESETS)
    for name, preset in PRESETS.items():
        for flag, value in preset.settings.items():
            words = " ".join(map(str, value)) if isinstance(value, list) else value
            shown = f"`--{flag}`" if value is True else (
                f"`--no-{flag}`" if value is False else f"`--{flag} {words}`")
            assert shown in rows[name], f"{name}: {shown} missing from the table"


def test_config_json_records_the_resolved_preset(tiny_dataset_dir, tmp_path):
    from peftrec.pretraining.pipeline import pretrain

    run = tmp_path / "run"
    pretrain(parse_args(pretrain_parser("t"), [
        "--preset", "diffrec-paper", "--dataset", str(tiny_dataset_dir), "--output-dir", str(run),
        *SMALL, "--epochs", "1", "--diffusion-steps", "10", "--num-seeds", "1"]))
    recorded = json.loads((run / "config.json").read_text())
    backbone = recorded["model"]["backbone_config"]
    assert (recorded["model"]["backbone"], backbone["mse_reduction"], backbone["untied_output"],
            backbone["num_steps"]) == ("diffrec", "sum", True, 10)
    assert recorded["dataset"]["train_windows"] == "prefixes"
    assert (recorded["training"]["epochs"], recorded["training"]["patience"]) == (1, 50)
