"""Flags of the fine-tuning scripts, shared with pretraining's vocabulary.

Every script takes the pretraining run (`--pretrained`), the target `--dataset`, the
training and evaluation-protocol flags of the pretraining scripts, and, for adapter
methods, the placement flags (`--adapt`, `--layers`, `--tune`) plus one flag per setting
of the method's config dataclass (`--reduction-factor`, `--rank`, ...). Every flag is a
field (`TransferSettings` holds the fine-tuning scripts' own), added by
`pretraining.cli.add_settings`, so the flags and the configs cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from peftrec.adapters import ADAPTERS
from peftrec.adapters.base import EXTRAS, AdapterConfig
from peftrec.downstream.transfer import ADDABLE_SETTINGS, finetune
from peftrec.modality_encoders import ContentEncoderSettings
from peftrec.pretraining.cli import (
    CommandLineError,
    RunSettings,
    add_protocol_arguments,
    add_settings,
    add_training_arguments,
    base_parser,
    flag_fields,
    parse_args,
    settings,
)
from peftrec.pretraining.recommender import RecommenderConfig
from peftrec.pretraining.trainer import TrainingConfig

PLACEMENT = {setting.name for setting in dataclasses.fields(AdapterConfig)}


@dataclass
class TransferSettings:
    """The fine-tuning scripts' own settings (a flag each, pretraining.cli). config.json's
    transfer section records them resolved: the base's checkpoint and fingerprint, the
    method (a baseline's name for --from-scratch / --zero-shot), --freeze, and the item
    matching (fields, source dataset, counts, frozen)."""

    pretrained: Path = field(metadata={
        "help": "run folder of a pretraining script (or its best_model/)"})
    match_items_by: tuple[str, ...] | None = field(default=None, metadata={
        "metavar": "FIELD[,FIELD...]",
        "help": "item fields both datasets have (e.g. movie_title,release_year): a target item "
        "whose values (case and whitespace ignored) are a source item's keeps that item's "
        "pretrained rows in every per-item parameter (ID table, item bias, output table); the "
        "others start fresh"})
    freeze_matched_items: bool = field(default=False, metadata={
        "help": "keep the matched items' rows as pretrained (no gradient, no weight decay); an "
        "adapter checkpoint then stores only the others"})
    source_dataset: str | None = field(default=None, metadata={
        "help": "the dataset --pretrained was trained on, if its folder moved (default: the "
        "one its run's config.json records)"})
    # Full fine-tuning's baselines, exclusive.
    from_scratch: bool = field(default=False, metadata={
        "help": "same architecture, random weights, trained on the target"})
    zero_shot: bool = field(default=False, metadata={
        "help": "evaluate on the target without training (content models, or an ID model "
        "with --match-items-by)"})
    popularity_prior: str | None = field(default=None, metadata={
        "metavar": "auto|WEIGHT",
        "help": "with --zero-shot: add WEIGHT * log(1 + count) to each item's score, count = its "
        "interactions in the target's training part (no training); auto: the weight chosen "
        "on validation NDCG@10 from downstream.popularity_prior.WEIGHT_GRID"})
    freeze: tuple[str, ...] = field(default=(), metadata={
        "metavar": "GROUP[,GROUP...]",
        "help": f"keep these pretrained parameter groups fixed, of {list(EXTRAS)} (as "
        "adapters' --tune defines them): embeddings = every nn.Embedding (positions, ...) "
        "except the per-item tables transfer restarts, which train (with --match-items-by, "
        "their matched rows stay as pretrained, as --freeze-matched-items)"})
    # A flag of the scripts of several methods (choices: theirs); the others train one.
    method: str | None = field(default=None, metadata={
        "choices": tuple(ADAPTERS), "help": "the adapter method this script trains"})


MATCHING = ("match_items_by", "freeze_matched_items", "source_dataset")


def finetune_parser(description: str, methods: Sequence[str] = ()) -> argparse.ArgumentParser:
    """Flags of a fine-tuning script for adapter `methods` (first = default); none: the
    full fine-tuning script, with `--from-scratch` and `--zero-shot` baselines."""
    parser = base_parser(description)
    add_settings(parser, TransferSettings, ("pretrained",))
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
        "--repeat-bias and --item-bias add score offsets, starting at 0, to a base trained "
        "without them, and a base's own are always kept and trained)")
    # The item encoder is the pretrained model's: no --item-encoder.
    add_settings(model, RecommenderConfig, exclude=(*ADDABLE_SETTINGS, "item_encoder"),
                 unset=True)
    add_settings(model, RecommenderConfig, ADDABLE_SETTINGS)
    add_settings(parser.add_argument_group("items matched across domains (per-item parameters)"),
                 TransferSettings, MATCHING)
    if not methods:
        add_settings(parser.add_mutually_exclusive_group(), TransferSettings,
                     ("from_scratch", "zero_shot"))
        add_settings(parser.add_argument_group("zero-shot"), TransferSettings,
                     ("popularity_prior",))
        strategy = parser.add_argument_group("full fine-tuning strategies")
        add_settings(strategy, TransferSettings, ("freeze",))
        add_settings(strategy, TrainingConfig, ("unfreeze_every",))
        return parser
    unknown = [m for m in methods if m not in ADAPTERS]
    if unknown:
        raise ValueError(f"unknown adapter method(s) {unknown}; registered: {sorted(ADAPTERS)}")
    group = parser.add_argument_group("adapter")
    if len(methods) > 1:
        add_settings(group, TransferSettings, ("method",), defaults={"method": methods[0]},
                     choices={"method": methods})
    else:
        parser.set_defaults(method=methods[0])
    add_settings(group, AdapterConfig)
    # A setting several methods share is one flag (the first method's default shown); unset,
    # the chosen method's own default applies.
    declared = set(PLACEMENT)
    for method in methods:
        config_class, _ = ADAPTERS[method]
        add_settings(group, config_class, exclude=declared, unset=method)
        declared.update(setting.name for setting in flag_fields(config_class))
    return parser


def adapter_config(args: argparse.Namespace) -> AdapterConfig:
    """The method's config from the parsed flags (unset method flags keep its defaults)."""
    config_class, _ = ADAPTERS[args.method]
    own = _method_fields(config_class)
    given = {name for other, _ in ADAPTERS.values() for name in _method_fields(other)
             if getattr(args, name, None) is not None}  # None: unset
    foreign = sorted(given - set(own))
    if foreign:
        flags = ", ".join("--" + name.replace("_", "-") for name in foreign)
        raise CommandLineError(f"{flags}: not a setting of --method {args.method}; drop it or "
                               "choose the method it belongs to")
    method_settings = {name: getattr(args, name) for name in own if name in given}
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

