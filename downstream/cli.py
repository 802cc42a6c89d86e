"""Flags of the fine-tuning scripts, shared with pretraining's vocabulary.

Every script takes the pretraining run (`--pretrained`), the target `--dataset`, the
training and evaluation-protocol flags of the pretraining scripts, and, for adapter
methods, the placement flags (`--adapt`, `--layers`, `--tune`) plus one flag per setting
of the method's config dataclass (`--reduction-factor`, `--rank`, ...), generated from its
fields so the flags and the configs cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Sequence
from pathlib import Path

from peftrec.adapters import ADAPTERS
from peftrec.adapters.base import EXTRAS, AdapterConfig
from peftrec.downstream.transfer import finetune
from peftrec.modality_encoders import ContentEncoderSettings
from peftrec.pretraining.cli import (
    CommandLineError,
    RunSettings,
    add_protocol_arguments,
    add_settings,
    add_training_arguments,
    base_parser,
    names_list,
    parse_args,
    settings,
    typed_options,
)
from peftrec.pretraining.recommender import RecommenderConfig
from peftrec.pretraining.trainer import TrainingConfig

PLACEMENT = {field.name for field in dataclasses.fields(AdapterConfig)}


def finetune_parser(description: str, methods: Sequence[str] = ()) -> argparse.ArgumentParser:
    """Flags of a fine-tuning script for adapter `methods` (first = default); none: the
    full fine-tuning script, with `--from-scratch` and `--zero-shot` baselines."""
    parser = base_parser(description)
    parser.add_argument("--pretrained", type=Path, required=True,
                        help="run folder of a pretraining script (or its best_model/)")
    add_training_arguments(parser)
    add_protocol_arguments(parser)
    encoder = parser.add_argument_group(
        "item encoder of the target (content models; unset: the pretrained model's: give the "
        "encoder's folder if it moved, the target's text template or image store)")
    add_settings(encoder, ContentEncoderSettings, ("encoder", "template", "image_store"),
                 unset=True)
    add_settings(encoder, RunSettings, ("encoder_cache_dir",))
    model = parser.add_argument_group(
        "model (unset: the pretrained model's; --backbone is checked against it, the "
        "objective replaces its for training, evaluation always ranks the whole catalog; "
        "--repeat-bias adds a score offset, starting at 0, to a base trained without one, "
        "and a base's own is always kept and trained)")
    add_settings(model, RecommenderConfig, exclude=("repeat_bias",), unset=True)
    add_settings(model, RecommenderConfig, ("repeat_bias",))
    matching = parser.add_argument_group("items matched across domains (per-item parameters)")
    matching.add_argument("--match-items-by", type=names_list, metavar="FIELD[,FIELD...]",
                          help="item fields both datasets have (e.g. movie_title,release_year): "
                          "a target item whose values (case and whitespace ignored) are a "
                          "source item's keeps that item's pretrained rows in every per-item "
                          "parameter (ID table, item bias, output table); the others start "
                          "fresh")
    matching.add_argument("--freeze-matched-items", action="store_true",
                          help="keep the matched items' rows as pretrained (no gradient, no "
                          "weight decay); an adapter checkpoint then stores only the others")
    matching.add_argument("--source-dataset",
                          help="the dataset --pretrained was trained on, if its folder moved "
                          "(default: the one its run's config.json records)")
    if not methods:
        baseline = parser.add_mutually_exclusive_group()
        baseline.add_argument("--from-scratch", action="store_true",
                              help="same architecture, random weights, trained on the target")
        baseline.add_argument("--zero-shot", action="store_true",
                              help="evaluate on the target without training (content models, "
                              "or an ID model with --match-items-by)")
        strategy = parser.add_argument_group("full fine-tuning strategies")
        strategy.add_argument("--freeze", type=names_list, default=(), metavar="GROUP[,GROUP...]",
                              help=f"keep these pretrained parameter groups fixed, of "
                              f"{list(EXTRAS)} (as adapters' --tune defines them): embeddings "
                              "= every nn.Embedding (positions, ...) except the per-item tables "
                              "transfer restarts, which train (with --match-items-by, their "
                              "matched rows stay as pretrained, as --freeze-matched-items)")
        add_settings(strategy, TrainingConfig, ("unfreeze_every",))
        return parser
    unknown = [m for m in methods if m not in ADAPTERS]
    if unknown:
        raise ValueError(f"unknown adapter method(s) {unknown}; registered: {sorted(ADAPTERS)}")
    group = parser.add_argument_group("adapter")
    if len(methods) > 1:
        group.add_argument("--method", choices=list(methods), default=methods[0],
                           help="the adapter method this script trains")
    else:
        parser.set_defaults(method=methods[0])
    add_settings(group, AdapterConfig)
    _add_method_settings(group, methods)
    return parser


def adapter_config(args: argparse.Namespace) -> AdapterConfig:
    """The method's config from the parsed flags (unset method flags keep its defaults)."""
    config_class, _ = ADAPTERS[args.method]
    own = _method_fields(config_class)
    foreign = sorted({name for other, _ in ADAPTERS.values() for name in _method_fields(other)
                      if name not in own and hasattr(args, name)})
    if foreign:
        flags = ", ".join("--" + name.replace("_", "-") for name in foreign)
        raise CommandLineError(f"{flags}: not a setting of --method {args.method}; drop it or "
                               "choose the method it belongs to")
    method_settings = {name: getattr(args, name) for name in own if hasattr(args, name)}
    return config_class(**settings(args, AdapterConfig), **method_settings)


def run_finetune(args: argparse.Namespace) -> dict:
    """The fine-tuning job behind every downstream script."""
    method = getattr(args, "method", None)
    if method is not None:
        return finetune(args, adapter_config(args), method)
    baseline = "scratch" if args.from_scratch else "zero_shot" if args.zero_shot else "full"
    return finetune(args, None, baseline)


def main_for(description: str, methods: Sequence[str] = ()):
    """A script's `main(argv)`: parse the flags of `methods` and fine-tune."""

    def main(argv: Sequence[str] | None = None) -> dict:
        return run_finetune(parse_args(finetune_parser(description, methods), argv))

    return main


def _method_fields(config_class: type) -> list[str]:
    return [f.name for f in dataclasses.fields(config_class) if f.name not in PLACEMENT]


def _add_method_settings(group: argparse._ArgumentGroup, methods: Sequence[str]) -> None:
    """One flag per method setting, typed by the config field's annotation, with its help
    text and choices; a setting shared by several methods gets one flag (the first
    method's default is shown)."""
    added: set[str] = set()
    for method in methods:
        config_class, _ = ADAPTERS[method]
        hints = typing.get_type_hints(config_class)
        defaults = config_class()
        for setting in dataclasses.fields(config_class):
            if setting.name in PLACEMENT or setting.name in added:
                continue
            added.add(setting.name)
            options = typed_options(hints[setting.name], f"{config_class.__name__}.{setting.name}")
            if "choices" in setting.metadata:
                options["choices"] = list(setting.metadata["choices"])
            # Unset flags stay unset (SUPPRESS), so the method's own default applies.
            group.add_argument("--" + setting.name.replace("_", "-"), default=argparse.SUPPRESS,
                               help=f"{setting.metadata['help']} ({method} default: "
                               f"{getattr(defaults, setting.name)!r})", **options)
