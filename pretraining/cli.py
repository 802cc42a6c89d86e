"""The argument vocabulary every script shares, `--config FILE.yaml`, presets, and errors.

Every setting is declared once, as a field of a config dataclass (`TrainingConfig`,
`RecommenderConfig`, `SASRecConfig`, `DiffRecConfig`, `EvaluationProtocol`, `RunSettings`,
`EvaluateSettings`, the fine-tuning scripts' `TransferSettings`, ...): a field with
`metadata={"help": ...}` is a flag (`add_settings`), typed by its annotation, with the
field's default and its metadata's `choices`, `metavar`, `flag` (the flag's name where it
is not the field's, e.g. `--diffusion-steps` for `num_steps`), `aliases` (more names of the
flag), `off_flag` (a switch's second flag that turns it off, with its own help:
`--train-encoder` for `--no-freeze-encoder`), `words` (a tuple of strings given as separate
words, `--users a b`, not comma-separated) and `positional` (an argument without a flag
name, such as report.py's RUN_OR_SWEEP). The parsed value is stored under the field's
name, so `settings(args, Config)` fills the dataclass. A script's mutually exclusive flags
are fields added to an `add_mutually_exclusive_group()`. Only `--config` and `--debug`
are the parser's own (`cli_parser`): they are not settings of a job.

Values come from, lowest first: the dataclass defaults, a `--preset` (pretraining.presets;
unset: `--backbone`'s default preset), the `--config` YAML file, the command line. Unknown
keys in the file are an error, like unknown flags; the file may also give the required flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import sys
import types
import typing
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from peftrec.dataset_tools import DataError, ItemTextTemplate, SequenceData, default_template
from peftrec.modality_encoders import (
    ContentEncoderSettings,
    item_encoder_modality,
    resolve_item_encoder_config,
)
from peftrec.pretraining.adrec import ADRecConfig
from peftrec.pretraining.data import TRAIN_WINDOWS
from peftrec.pretraining.diffrec import DiffRecConfig
from peftrec.pretraining.diffurec import DiffuRecConfig
from peftrec.pretraining.dimerec import DimeRecConfig
from peftrec.pretraining.dreamrec import DreamRecConfig
from peftrec.pretraining.evaluation import EvaluationProtocol
from peftrec.pretraining.presets import DEFAULT_PRESETS, NO_PRESET, PRESETS
from peftrec.pretraining.recommender import BACKBONES, INFERENCE_SETTINGS, RecommenderConfig
from peftrec.pretraining.sasrec import SASRecConfig
from peftrec.pretraining.trainer import TrainingConfig

ITEM_ENCODER_PREFIX = "item_encoder."  # SequentialRecommender's item encoder parameters


class CommandLineError(ValueError):
    """Bad flags or a bad --config file."""


DREAMREC_GROUP = "guidance (--backbone dreamrec)"
DIMEREC_GROUP = "interests (--backbone dimerec)"
ADREC_GROUP = "guidance scale (--backbone adrec)"
DIFFUREC_GROUP = "uncertainty (--backbone diffurec)"


@dataclass
class RunSettings:
    """Settings of the scripts outside the model, training and protocol configs: the data
    and where the caches are, where a training run writes, what it samples and starts from.
    config.json records them resolved (the dataset's path and fingerprint, the preset
    applied, `training.output_dir`, the sources' checkpoints)."""

    dataset: str = field(default="ml-100k", metadata={
        "help": "built-in name (ml-100k, ml-1m, or its domain split ml-1m-old / ml-1m-new) or a "
        "folder written by scripts/prepare_data.py"})
    cache_dir: Path | None = field(default=None, metadata={
        "help": "where built-in datasets are prepared (unset: $PEFTREC_CACHE or "
        "~/.cache/peftrec)"})
    train_windows: str = field(default="last", metadata={
        "choices": TRAIN_WINDOWS,
        "help": "train on each user's most recent max_len window, tile the whole history "
        "into windows (all), or make every prefix a sample with the next item its only "
        "target (prefixes, as RecBole)"})
    init_items_from: Path | None = field(default=None, metadata={
        "metavar": "DIR",
        "help": "start the item encoder (ID: the item table) from this pretraining run "
        "folder or its best_model/ (any backbone; same dataset, item encoder and "
        "--hidden-size)"})
    freeze_items_epochs: int = field(default=0, metadata={
        "metavar": "E",
        "help": "no update to the item encoder in the first E epochs, then joint training "
        "(without --init-items-from: the random initial items stay fixed for E epochs)"})
    encoder_cache_dir: Path | None = field(default=None, metadata={
        "help": "where content encoders' outputs are cached (unset: the dataset folder's "
        "cache/)"})
    init_denoiser_from: Path | None = field(default=None, metadata={
        "metavar": "DIR",
        "help": "start the denoiser's Transformer (and the repeat bias) from this SASRec run "
        "folder or its best_model/: the history is then encoded as SASRec encodes it (same "
        "layer sizes, --max-len at most the SASRec's + 1)"})
    output_dir: Path | None = field(default=None, metadata={
        "help": "run folder (default: runs/<dataset>-<backbone>, fine-tuning: "
        "runs/<dataset>-<method>)"})
    preset: str | None = field(default=None, metadata={
        "choices": (*sorted(PRESETS), NO_PRESET),
        "help": "a named set of settings (docs/user-guide.md#presets); --config and flags "
        "override it. Unset: --backbone's default preset (diffrec: diffrec-default, ...); "
        "none: the flags' own defaults"})


@dataclass
class EvaluateSettings:
    """The settings of scripts/evaluate.py of its own."""

    run: Path = field(metadata={
        "help": "run folder written by a pretraining or fine-tuning script"})
    output: Path | None = field(default=None, metadata={
        "help": "where to write the metrics (default RUN/evaluation.json)"})


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the scripts' docstring examples as written, and shows the flags' defaults (an
    unset one, None, is not shown: the help says what unset means)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def flag_fields(config_class: type) -> list[dataclasses.Field]:
    """The fields of `config_class` that are command-line flags: those with help text."""
    return [f for f in dataclasses.fields(config_class) if "help" in f.metadata]


def flag_name(setting: dataclasses.Field) -> str:
    return "--" + setting.metadata.get("flag", setting.name.replace("_", "-"))


_MISSING = object()


def _default(setting: dataclasses.Field):
    if setting.default_factory is not dataclasses.MISSING:
        return setting.default_factory()
    return setting.default


def backbone_defaults(name: str) -> dict[str, object]:
    """Each backbone whose config has the flag field `name` -> that field's default."""
    return {backbone: _default(setting) for backbone, (config_class, _) in BACKBONES.items()
            for setting in flag_fields(config_class) if setting.name == name}


def _diffusion_group_title() -> str:
    """DiffRec's group, naming the other backbones that read each of its flags."""
    sasrec = {setting.name for setting in flag_fields(SASRecConfig)}
    readers: dict[str, list[str]] = {}  # the other backbones -> the flags they read
    for setting in flag_fields(DiffRecConfig):
        others = [b for b in backbone_defaults(setting.name) if b != "diffrec"]
        if setting.name not in sasrec and others:
            readers.setdefault(", ".join(others), []).append(flag_name(setting))
    shared = "; ".join(f"{', '.join(flags)} also {others}" for others, flags in readers.items())
    return f"diffusion (--backbone diffrec; {shared})"


DIFFUSION_GROUP = _diffusion_group_title()
# The groups of flags that only some backbones read: title -> the backbone that owns them.
BACKBONE_GROUPS = {DIFFUSION_GROUP: "diffrec", DREAMREC_GROUP: "dreamrec",
                   DIMEREC_GROUP: "dimerec", ADREC_GROUP: "adrec", DIFFUREC_GROUP: "diffurec"}


def add_settings(
    group: argparse._ActionsContainer,
    config_class: type,
    names: Sequence[str] | None = None,
    exclude: Collection[str] = (),
    unset: bool | str = False,
    defaults: dict | None = None,
    required: Sequence[str] = (),
    choices: dict[str, Sequence[str]] | None = None,
) -> None:
    """One flag per flag field of `config_class` (`names` only, if given; less `exclude`).

    `unset`: the flags default to None, not to the field's default, so that whatever the
    caller applies them to (a pretrained model's settings, a run's own, a method's config)
    keeps its value; a string names what applies instead in the help, with the field's
    default: `unset="lora"` ends the help with "(lora default: 8)".
    `defaults`: field name -> this script's default, where it is not the field's (e.g. an
    image encoder pools the CLS token); `required`: fields this script needs given, whatever
    their default (a field without one always is); `choices`: field name -> this script's
    choices (e.g. the item encoders of its modality). Types: see `typed_options`.
    """
    defaults, choices = defaults or {}, choices or {}
    hints = typing.get_type_hints(config_class)
    for setting in flag_fields(config_class):
        if (names is not None and setting.name not in names) or setting.name in exclude:
            continue
        options = {"dest": setting.name, "help": setting.metadata["help"]}
        if unset:
            options["default"] = None
            if isinstance(unset, str):
                options["help"] += f" ({unset} default: {_default(setting)!r})"
        elif setting.name in defaults:
            options["default"] = defaults[setting.name]
        elif setting.name in required or setting.default is setting.default_factory is (
                dataclasses.MISSING):
            options["required"] = True
        else:
            options["default"] = _default(setting)
        if "metavar" in setting.metadata:
            options["metavar"] = setting.metadata["metavar"]
        if setting.name in choices or "choices" in setting.metadata:
            options["choices"] = list(choices.get(setting.name, setting.metadata.get("choices")))
        options.update(typed_options(hints[setting.name], f"{config_class.__name__}."
                                     f"{setting.name}", setting.metadata.get("words", False)))
        if setting.metadata.get("positional"):
            # argparse names a positional by its destination, and requires it unless the
            # --config file gives it (parse_args).
            del options["dest"]
            options.pop("required", None)
            group.add_argument(setting.name, **options)
        else:
            group.add_argument(flag_name(setting), *setting.metadata.get("aliases", ()),
                               **options)
        if "off_flag" in setting.metadata:
            # Unset (SUPPRESS), so that it leaves the switch's default alone.
            name, text = setting.metadata["off_flag"]
            group.add_argument("--" + name, dest=setting.name, action="store_false",
                               default=argparse.SUPPRESS, help=text)


def typed_options(kind, where: str, words: bool = False) -> dict:
    """`add_argument`'s options for a field annotated `kind` (`where` names it in errors):
    bool is a switch with its `--no-` form (so a flag can undo a preset or a file);
    `tuple[int, ...]` and `tuple[Path, ...]` take several values, `tuple[str, ...]`
    comma-separated names (several values with `words`); `X | None` is typed as X (None
    is the unset value, not something to type)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = next(member for member in typing.get_args(kind) if member is not type(None))
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    if kind in (int, float, str, Path):
        return {"type": kind}
    if kind == tuple[str, ...] and not words:
        return {"type": names_list}
    if kind in (tuple[int, ...], tuple[Path, ...], tuple[str, ...]):
        return {"type": typing.get_args(kind)[0], "nargs": "+"}
    raise TypeError(f"{where}: no flag for type {kind}")


def settings(args: argparse.Namespace, config_class: type,
             names: Sequence[str] | None = None) -> dict:
    """The values of `config_class`'s flags in `args` (those parsed; `names` only, if
    given), lists as tuples, ready for `config_class(**...)`."""
    return {f.name: tuple(value) if isinstance(value, list) else value
            for f in flag_fields(config_class)
            if (names is None or f.name in names)
            and (value := getattr(args, f.name, _MISSING)) is not _MISSING}


def names_list(text: str) -> tuple[str, ...]:
    """A comma-separated list of names on the command line."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def cli_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the flags every script has: `--config` (read by `parse_args`) and
    `--debug` (read by `run_main`)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    # The two flags declared here, not as fields: neither is a setting of the job. --config
    # is where the settings come from (read before any dataclass is filled, and a file
    # cannot name itself); --debug is how run_main reports a failure, read from the raw
    # command line so that it also holds for errors in the flags and the file themselves.
    parser.add_argument("--config", type=Path, help="YAML file of settings; flags override it")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return parser


def base_parser(description: str) -> argparse.ArgumentParser:
    """`--config`, `--debug` and the dataset: the flags of every script that loads data."""
    parser = cli_parser(description)
    add_settings(parser, RunSettings, ("dataset", "cache_dir"))
    return parser


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    add_settings(group, RecommenderConfig, exclude=("item_encoder",))  # a content script's
    add_settings(group, SASRecConfig)
    add_settings(group, RunSettings, ("init_items_from", "freeze_items_epochs"))
    diffusion = parser.add_argument_group(DIFFUSION_GROUP)
    add_settings(diffusion, DiffRecConfig, exclude=[f.name for f in flag_fields(SASRecConfig)])
    _default_per_backbone(diffusion)
    add_settings(diffusion, RunSettings, ("init_denoiser_from",))
    declared = [f.name for f in flag_fields(DiffRecConfig)]  # SASRec's and DiffRec's
    add_settings(parser.add_argument_group(DREAMREC_GROUP), DreamRecConfig, exclude=declared)
    add_settings(parser.add_argument_group(DIMEREC_GROUP), DimeRecConfig, exclude=declared)
    add_settings(parser.add_argument_group(ADREC_GROUP), ADRecConfig, exclude=declared)
    add_settings(parser.add_argument_group(DIFFUREC_GROUP), DiffuRecConfig, exclude=declared)


def _default_per_backbone(group: argparse._ArgumentGroup) -> None:
    """A flag that backbones read with defaults of their own (`--diffusion-steps`: DiffRec's
    1000, ADRec's 32) parses to None when not given, and `parse_args` then sets the chosen
    backbone's default; its help lists them."""
    for action in group._group_actions:
        by_value: dict[str, list[str]] = {}
        for backbone, default in backbone_defaults(action.dest).items():
            by_value.setdefault(str(default), []).append(backbone)
        if len(by_value) > 1:
            action.default = None
            action.help += " (default: " + "; ".join(
                f"{value} for {', '.join(backbones)}" for value, backbones in by_value.items()
            ) + ")"


def _resolve_backbone_defaults(args: argparse.Namespace) -> None:
    """The chosen backbone's own default for each of its settings left unset (None, see
    `_default_per_backbone`); another backbone's stay None."""
    backbone = getattr(args, "backbone", None)
    if backbone not in BACKBONES:
        return
    for setting in flag_fields(BACKBONES[backbone][0]):
        if getattr(args, setting.name, _MISSING) is None:
            setattr(args, setting.name, _default(setting))


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of every script that trains a run folder: `--output-dir` and the
    training settings (`--unfreeze-every` is full fine-tuning's alone)."""
    add_settings(parser, RunSettings, ("output_dir",))
    group = parser.add_argument_group("training")
    add_settings(group, TrainingConfig, exclude=("unfreeze_every",))
    add_settings(group, RunSettings, ("train_windows",))


def add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings(parser.add_argument_group("evaluation protocol"), EvaluationProtocol)


def add_item_encoder_arguments(parser: argparse.ArgumentParser, modality: str) -> None:
    """Flags of the content item encoders (`modality` = "text" or "image"), and of the
    content + ID fusion encoder of that modality."""
    group = parser.add_argument_group(f"{modality} item encoder")
    add_settings(group, RecommenderConfig, ("item_encoder",), defaults={"item_encoder": modality},
                 choices={"item_encoder": (modality, f"{modality}+id")})
    if modality == "text":
        add_settings(group, ContentEncoderSettings, exclude=("image_store",),
                     defaults={"encoder": "minilm"})
    else:
        add_settings(group, ContentEncoderSettings,
                     exclude=("template", "max_text_length", "token_vectors",
                              "token_pooling", "token_dropout"),
                     defaults={"pooling": "cls"}, required=("image_store",))
    add_settings(group, RunSettings, ("encoder_cache_dir",))


def pretrain_parser(description: str, modality: str | None = None) -> argparse.ArgumentParser:
    """Flags of every pretraining script: common, preset, model, training and protocol, plus
    the content item encoder's for `modality` "text" or "image"."""
    parser = base_parser(description)
    add_settings(parser, RunSettings, ("preset",))
    add_model_arguments(parser)
    add_training_arguments(parser)
    add_protocol_arguments(parser)
    if modality is not None:
        add_item_encoder_arguments(parser, modality)
    return parser


def evaluate_parser(description: str) -> argparse.ArgumentParser:
    """Flags of scripts/evaluate.py: a run folder, optionally another dataset folder."""
    parser = base_parser(description)
    parser.set_defaults(dataset=None)  # default: the dataset the run was trained on
    add_settings(parser, EvaluateSettings)
    add_settings(parser, TrainingConfig, ("eval_batch_size", "seed", "cpu"))
    add_settings(parser, RunSettings, ("encoder_cache_dir",))
    add_protocol_arguments(parser)
    add_settings(parser.add_argument_group("diffusion inference (unset: the run's own)"),
                 DiffRecConfig, INFERENCE_SETTINGS, unset=True)
    return parser


def inference_overrides(args: argparse.Namespace) -> dict:
    """The diffusion backbones' inference settings given to scripts/evaluate.py (none: the
    run's own)."""
    return {name: value for name, value in settings(args, DiffRecConfig, INFERENCE_SETTINGS).items()
            if value is not None}


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None):
    """Parse flags on top of the `--config` YAML file's values, on top of the `--preset`'s
    (named on the command line or in the file).

    A required flag may come from the file (argparse's own error names those given by
    neither), and a flag of a mutually exclusive group given on the command line replaces
    the file's choice in that group (`--input` on the command line, `dataset:` in the file).
    """
    defaults = {action.dest: action.default for action in _diffusion_actions(parser)}
    given = _command_line_settings(parser, argv)
    values = {}
    if given.get("config") is not None:
        path = given["config"]
        values = _read_config(path, parser)
        for group in parser._mutually_exclusive_groups:
            members = {action.dest for action in group._group_actions}
            if members & given.keys():
                values = {dest: value for dest, value in values.items()
                          if dest not in members - given.keys()}
            chosen = sorted(members & values.keys())
            if len(chosen) > 1:
                raise CommandLineError(f"--config {path}: {', '.join(chosen)} exclude each "
                                       "other; keep one")
            group.required = group.required and not chosen
    preset = _resolve_preset(parser, given, values)
    named = "preset" in given or "preset" in values  # else the backbone's default preset
    if preset is not None:
        values = {**_preset_settings(preset, parser), **values, "preset": preset}
    for action in parser._actions:
        action.required = action.required and action.dest not in values
    parser.set_defaults(**values)
    args = parser.parse_args(argv)
    if preset is not None:
        names = _setting_names(parser)
        missing = [flag for flag in PRESETS[preset].needs
                   if getattr(args, names[flag.lstrip("-").replace("-", "_")]) is None]
        if missing:
            source = (f"--preset {preset}" if named else f"--backbone {args.backbone} (its "
                      f"default preset {preset}; --preset none opts out)")
            raise CommandLineError(f"{source} needs {', '.join(missing)}: "
                                   f"{PRESETS[preset].needs_why}")
    _refuse_other_backbones_settings(parser, args, defaults)
    _resolve_backbone_defaults(args)
    return args


def _resolve_preset(parser: argparse.ArgumentParser, given: dict, values: dict) -> str | None:
    """The preset a pretraining run applies: the one named on the command line or in the
    file, else the default preset of the backbone they name (or of the default backbone);
    None for `--preset none`, a backbone without one, or a parser without `--preset`."""
    if "preset" not in {action.dest for action in parser._actions}:
        return None
    preset = given.get("preset", values.get("preset"))
    if preset is None and given.get("resume", values.get("resume")):
        preset = _resumed_runs_preset(given.get("output_dir", values.get("output_dir")))
    if preset is None:
        backbone = given.get("backbone", values.get("backbone", parser.get_default("backbone")))
        preset = DEFAULT_PRESETS.get(backbone)
    return None if preset == NO_PRESET else preset


def _resumed_runs_preset(output_dir: str | Path | None) -> str | None:
    """The preset the run in `output_dir` started with (`none` for a run from before its
    backbone had a default preset), so that `--resume` without `--preset` continues it as
    it was rather than under a default added since; None where there is no such run (its
    config.json is then checked, and any damage named, when the run is loaded)."""
    if output_dir is None:
        return None
    try:
        recorded = json.loads((Path(output_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(recorded, dict):
        return None
    return recorded.get("preset") or NO_PRESET


def _refuse_other_backbones_settings(parser: argparse.ArgumentParser, args: argparse.Namespace,
                                     defaults: dict) -> None:
    """One line naming the settings given that the chosen backbone does not read (a flag of
    another backbone's group that is no field of its config), and whose they are."""
    backbone = getattr(args, "backbone", "diffrec")  # None where a script leaves it unset
    own = ({setting.name for setting in flag_fields(BACKBONES[backbone][0])}
           if backbone in BACKBONES else set())
    given, owners = [], []
    for group in parser._action_groups:
        if BACKBONE_GROUPS.get(group.title, backbone) == backbone:
            continue
        for action in group._group_actions:
            if action.dest not in own and getattr(args, action.dest) != defaults[action.dest]:
                given.append(action.option_strings[0])
                owners.append(BACKBONE_GROUPS[group.title])
    if given:
        owners = sorted(set(owners))
        names = " and ".join(BACKBONES[owner][1].__name__ for owner in owners)
        raise CommandLineError(f"{', '.join(given)}: {names} settings, which do nothing with "
                               f"--backbone {backbone}; drop them or use --backbone "
                               f"{' or '.join(owners)}")


def _preset_settings(name: str, parser: argparse.ArgumentParser) -> dict:
    """The settings of preset `name` by destination (`name` is checked against the choices:
    the command line's by argparse, the `--config` file's by `_file_value`)."""
    return _by_destination(PRESETS[name].settings, parser, f"--preset {name}")


def _setting_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Setting name -> destination: every flag's name, with _ for - (a switch's `--no-`
    form and `--train-encoder`, which set the opposite, excluded), and every destination
    itself (`diffusion_steps` and `num_steps`)."""
    names = {}
    for action in parser._actions:
        options = [] if isinstance(action, argparse._StoreFalseAction) else action.option_strings
        if isinstance(action, argparse.BooleanOptionalAction):
            options = options[:1]
        names.update({option.lstrip("-").replace("-", "_"): action.dest
                      for option in options if option.startswith("--")})
        names[action.dest] = action.dest
    return names


def _by_destination(values: dict, parser: argparse.ArgumentParser, source: str) -> dict:
    """`values` (setting name -> value, names as flags or with _) by destination."""
    names = _setting_names(parser)
    values = {str(key).replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise CommandLineError(f"{source}: unknown settings {unknown}; see --help for the "
                               "valid names")
    return {names[key]: value for key, value in values.items()}


def _command_line_settings(parser: argparse.ArgumentParser,
                           argv: Sequence[str] | None) -> dict:
    """The settings `argv` itself gives, defaults left out; required flags are not checked
    yet (the `--config` file may give them)."""
    # argparse fills in a default only where the namespace has no value: None marks unset
    # (no flag stores None; append and count actions start from it).
    namespace = argparse.Namespace(**{action.dest: None for action in parser._actions})
    required = [item for item in [*parser._actions, *parser._mutually_exclusive_groups]
                if item.required]
    for item in required:
        item.required = False
    try:
        parser.parse_known_args(argv, namespace)
    finally:
        for item in required:
            item.required = True
    for action in parser._actions:
        # argparse (3.11) takes `--flag=--` for no value at all, an empty list.
        if action.nargs is None and getattr(namespace, action.dest, None) == []:
            name = (action.option_strings or [action.metavar or action.dest])[0]
            raise CommandLineError(f"{name}: one value expected, not "
                                   "'--'; give the value after the flag")
    return {dest: value for dest, value in vars(namespace).items() if value is not None}


def _diffusion_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The flags of the backbone groups (DiffRec's, DreamRec's)."""
    return [action for group in parser._action_groups if group.title in BACKBONE_GROUPS
            for action in group._group_actions]


def without_diffusion_flags(argv: Sequence[str]) -> list[str]:
    """`argv` less its diffusion settings (DiffRec's, DreamRec's) and their values: the flags
    of a SASRec run next to a diffusion one (e.g. the reference of a benchmark that takes
    one set of flags)."""
    actions = {option: action for action in _diffusion_actions(pretrain_parser(""))
               for option in action.option_strings}
    kept, skip_value = [], False
    for token in argv:
        if skip_value:
            skip_value = False
            continue
        name = token.split("=", 1)[0]
        if name in actions:
            skip_value = actions[name].nargs != 0 and "=" not in token
            continue
        kept.append(token)
    return kept


def read_yaml(path: Path, what: str):
    """The YAML document in `path`; bad YAML or text that is not UTF-8 is one line naming
    `what` (e.g. "--config FILE") and where (PyYAML's own message runs to several lines)."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise CommandLineError(f"{what} is not UTF-8 text (byte {error.start}: "
                               f"{error.reason})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(error, "problem", None) or error).split())
        raise CommandLineError(f"{what} is not valid YAML{where}: {problem}") from None


def _read_config(path: Path, parser: argparse.ArgumentParser) -> dict:
    if not path.is_file():
        raise CommandLineError(f"--config {path}: no such file")
    values = read_yaml(path, f"--config {path}") or {}
    if not isinstance(values, dict):
        raise CommandLineError(f"--config {path} must be a mapping of setting: value")
    values = _by_destination(values, parser, f"--config {path}")
    actions = {}
    for action in parser._actions:
        actions.setdefault(action.dest, action)  # a switch before its off flag
    typed = {dest: _file_value(actions[dest], value, f"--config {path}: {dest}")
             for dest, value in values.items()}
    return {dest: value for dest, value in typed.items() if value is not None}  # null: unset


def _file_value(action: argparse.Action, value, where: str):
    """A --config file's `value` for `action`, typed and checked as the command line's words
    would be: argparse types a default only when it is one string (`runs: [a, b]` would stay
    strings, `size: [8]` a list) and checks no default against its choices."""
    if value is None:
        if action.default is not None:  # only a setting that may be unset may be null
            raise CommandLineError(f"{where}: a value is needed, not null (default "
                                   f"{action.default!r})")
        return None
    if action.nargs == 0:
        if not isinstance(value, bool):
            raise CommandLineError(f"{where}: true or false, not {value!r}")
        return value
    if action.type is names_list and isinstance(value, list):  # a list for a comma-separated one
        value = ",".join(str(item) for item in value)
    several = action.nargs in ("+", "*")
    if isinstance(value, dict) or (isinstance(value, list) and not several):
        raise CommandLineError(f"{where}: one value expected, not {value!r}")
    items = value if isinstance(value, list) else [value]
    if action.type is not None:
        try:
            items = [action.type(str(item)) for item in items]
        except (TypeError, ValueError) as error:
            raise CommandLineError(f"{where}: {error}") from None
    wrong = [item for item in items if action.choices is not None and item not in action.choices]
    if wrong:
        raise CommandLineError(f"{where}: {wrong[0]!r} is not one of {list(action.choices)}")
    return items if several else items[0]


def model_config(
    args: argparse.Namespace, num_items: int, fingerprint: str, data: SequenceData | None = None
) -> RecommenderConfig:
    config = RecommenderConfig(  # item_encoder: a content script's flag, else the default
        num_items=num_items, backbone_config=settings(args, BACKBONES[args.backbone][0]),
        dataset_fingerprint=fingerprint, **settings(args, RecommenderConfig),
    )
    if item_encoder_modality(config.item_encoder) is None:
        return config
    return dataclasses.replace(config, item_encoder_config=item_encoder_config(
        args, config.item_encoder, data))


def item_encoder_config(args: argparse.Namespace, item_encoder: str, data: SequenceData | None):
    """The content encoder's settings from the flags, resolved (template, fingerprint, hidden
    size)."""
    config = settings(args, ContentEncoderSettings)
    if item_encoder_modality(item_encoder) == "text":
        if config["template"] is None:
            if data is None:
                raise CommandLineError("the text encoder needs --text-template")
            try:
                config["template"] = default_template(data.name).template
            except DataError as error:
                raise CommandLineError(f"{error} (--text-template)") from None
        ItemTextTemplate(config["template"])  # a malformed template fails now, not mid-run
    else:
        config["image_store"] = str(Path(config["image_store"]).absolute())
    return resolve_item_encoder_config(item_encoder, config)


def training_config(args: argparse.Namespace, output_dir: Path) -> TrainingConfig:
    freeze_items = getattr(args, "freeze_items_epochs", 0)  # a pretraining flag only
    return TrainingConfig(
        output_dir=str(output_dir), **settings(args, TrainingConfig),
        freeze_prefixes=(ITEM_ENCODER_PREFIX,) if freeze_items else (), freeze_epochs=freeze_items,
    )


def protocol_config(args: argparse.Namespace) -> EvaluationProtocol:
    return EvaluationProtocol(**settings(args, EvaluationProtocol), user_sample_seed=args.seed)


def is_main_process() -> bool:
    """Rank 0 of a launch (or a plain run), read before any Accelerator exists."""
    return int(os.environ.get("RANK", "0")) == 0


def run_main(
    main: Callable[[Sequence[str] | None], object],
    argv: Sequence[str] | None = None,
    main_process_only: bool = False,
):
    """Run a script's main; bad input exits 2 with one line, no traceback unless --debug.

    `main_process_only`: for scripts that write one dataset, under `accelerate launch` only
    rank 0 runs (the others would write the same folder concurrently).
    """
    if main_process_only and not is_main_process():
        return
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        main(argv)
    except (ValueError, FileNotFoundError, NotADirectoryError) as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:
        if debug or error.errno not in (errno.ENAMETOOLONG, errno.ENOSPC, errno.EDQUOT):
            raise
        if error.errno == errno.ENAMETOOLONG:  # a path given (a flag's value) is too long
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        # A full disk is not a bug: saves are atomic, so what was saved before is whole.
        print(f"error: no space left on the device writing {error.filename or 'a file'}; "
              "the files saved before are intact: free some space and rerun (with --resume "
              "for a training run)", file=sys.stderr)
        sys.exit(1)
