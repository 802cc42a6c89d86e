"""The argument vocabulary every script shares, `--config FILE.yaml`, and error reporting.

Flags given on the command line override values from `--config`, which may also give the
required ones; unknown keys in the YAML file are an error, like unknown flags.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from dataset_tools import DataError, ItemTextTemplate, SequenceData, default_template
from modality_encoders import (
    FUSIONS,
    HEADS,
    WHITENINGS,
    item_encoder_modality,
    resolve_item_encoder_config,
)
from pretraining.data import TRAIN_WINDOWS
from pretraining.diffrec import INFERENCE_MODES, MSE_REDUCTIONS
from pretraining.evaluation import EvaluationProtocol
from pretraining.recommender import (
    BACKBONES,
    INFERENCE_SETTINGS,
    LOSSES,
    NEGATIVE_SAMPLING,
    RecommenderConfig,
)
from pretraining.schedules import SCHEDULES
from pretraining.trainer import ON_NAN, SCHEDULERS, TrainingConfig

ITEM_ENCODER_PREFIX = "item_encoder."  # SequentialRecommender's item encoder parameters


class CommandLineError(ValueError):
    """Bad flags or a bad --config file."""


DIFFUSION_GROUP = "diffusion (--backbone diffrec)"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the scripts' docstring examples as written, and shows flag defaults."""


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML file of settings; flags override it")
    parser.add_argument(
        "--output-dir", type=Path, help="run folder (default: runs/<dataset>-<backbone>)",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--dataset", default="ml-100k",
                        help="built-in name (ml-100k, ml-1m, or its domain split ml-1m-old / "
                        "ml-1m-new) or a folder written by "
                        "scripts/prepare_data.py")
    parser.add_argument("--cache-dir", type=Path,
                        help="where built-in datasets are prepared "
                        "(default $PEFTREC_CACHE or ~/.cache/peftrec)")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return parser


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--backbone", choices=sorted(BACKBONES), default="sasrec")
    group.add_argument("--hidden-size", type=int, default=64)
    group.add_argument("--num-layers", type=int, default=2)
    group.add_argument("--num-heads", type=int, default=2)
    group.add_argument("--ffn-size", type=int, default=256)
    group.add_argument("--max-len", type=int, default=200, help="longest input sequence")
    group.add_argument("--dropout", type=float, default=0.2)
    group.add_argument("--loss", choices=list(LOSSES), default="full",
                       help="softmax over the whole catalog, or sampled softmax with "
                       "logQ correction")
    group.add_argument("--num-negatives", type=int, default=1024, help="for --loss sampled")
    group.add_argument("--negative-sampling", choices=list(NEGATIVE_SAMPLING),
                       default="uniform")
    group.add_argument("--repeat-bias", action="store_true",
                       help="learn one score offset for items already in the input sequence "
                       "(negative where users rarely re-consume, positive where they repeat)")
    group.add_argument("--init-items-from", type=Path, metavar="DIR",
                       help="start the item encoder (ID: the item table) from this pretraining "
                       "run folder or its best_model/ (any backbone; same dataset, item encoder "
                       "and --hidden-size)")
    group.add_argument("--freeze-items-epochs", type=int, default=0, metavar="E",
                       help="no update to the item encoder in the first E epochs, then joint "
                       "training (without --init-items-from: the random initial items stay "
                       "fixed for E epochs)")
    diffusion = parser.add_argument_group(DIFFUSION_GROUP)
    diffusion.add_argument("--schedule", choices=sorted(SCHEDULES), default="sqrt",
                           help="noise schedule of the diffusion process")
    diffusion.add_argument("--diffusion-steps", type=int, default=1000,
                           help="N, the steps of the diffusion process")
    diffusion.add_argument("--num-seeds", type=int, default=10,
                           help="noise samples averaged at inference (1..256)")
    diffusion.add_argument("--inference", choices=list(INFERENCE_MODES), default="one_step",
                           help="one step from pure noise, the full reverse process, or a "
                           "strided one of --inference-steps steps")
    diffusion.add_argument("--inference-steps", type=int, default=50,
                           help="steps of --inference strided")
    diffusion.add_argument("--noised-positions", type=int, default=1,
                           help="noise the last K positions (1: the target only)")
    diffusion.add_argument("--causal-denoiser", action="store_true",
                           help="causal attention in the denoiser: the history is encoded "
                           "once and reused for every seed and step")
    diffusion.add_argument("--every-position", action="store_true",
                           help="train on every position's next item, not only each window's "
                           "last (needs --causal-denoiser; ~max-len targets per window)")
    diffusion.add_argument("--detach-noised-items", action="store_true",
                           help="no gradient from the noised target copies to the item table "
                           "(stops a trained table from inflating its norms past the noise)")
    diffusion.add_argument("--logit-scale", action="store_true",
                           help="score with a learned scale s: softmax(s h0 E^T + b), so the "
                           "MSE and the softmax do not fight over the length of h0")
    diffusion.add_argument("--untied-output", action="store_true",
                           help="score with a separate output table W (the paper's Eq. 13, "
                           "a copy of the item vectors at start), not the item table")
    diffusion.add_argument("--mse-weight", type=float, default=1.0,
                           help="weight of the diffusion MSE next to the cross-entropy")
    diffusion.add_argument("--mse-reduction", choices=list(MSE_REDUCTIONS), default="mean",
                           help="a target's squared error averaged over the d dimensions, or "
                           "summed: the paper's squared norm (Eq. 13), d times stronger")
    diffusion.add_argument("--init-denoiser-from", type=Path, metavar="DIR",
                           help="start the denoiser's Transformer (and the repeat bias) from "
                           "this SASRec run folder or its best_model/: the history is then "
                           "encoded as SASRec encodes it (same layer sizes, --max-len at "
                           "most the SASRec's + 1)")


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=int, default=200)
    group.add_argument("--max-steps", type=int, default=0,
                       help="stop after N optimizer steps in total (0: no limit)")
    group.add_argument("--batch-size", type=int, default=128)
    group.add_argument("--eval-batch-size", type=int, default=256,
                       help="users scored at once in full ranking (bounds evaluation memory)")
    group.add_argument("--lr", type=float, default=1e-3)
    group.add_argument("--weight-decay", type=float, default=0.0)
    group.add_argument("--scheduler", choices=SCHEDULERS, default="constant",
                       help="the rate after warm-up: constant, cosine to 0 over --epochs, or "
                       "step (multiplied by --decay-factor after each of --decay-epochs); or "
                       "one_cycle (torch's OneCycleLR: from --lr/25 up to --lr over "
                       "--warmup-steps, default 30%% of the run's steps, then down to "
                       "--lr/25e4; the run is --epochs, or --max-steps if fewer)")
    group.add_argument("--warmup-steps", type=int, default=0,
                       help="steps of linear warm-up to --lr (one_cycle: of its rise)")
    group.add_argument("--decay-epochs", type=int, nargs="+", default=[],
                       help="--scheduler step: the epochs after which the rate drops")
    group.add_argument("--decay-factor", type=float, default=0.1,
                       help="--scheduler step: what each drop multiplies the rate by")
    group.add_argument("--grad-accum", type=int, default=1)
    group.add_argument("--max-grad-norm", type=float, default=5.0)
    group.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    group.add_argument("--on-nan", choices=ON_NAN, default="stop",
                       help="a NaN or inf training loss: stop with an error naming the step, "
                       "the batch's users and the last saved state, or skip that optimizer "
                       "step (counted as skipped_steps in log.jsonl and metrics.json)")
    group.add_argument("--patience", type=int, default=10,
                       help="epochs without better validation NDCG@10 before stopping")
    group.add_argument("--num-workers", type=int, default=0)
    group.add_argument("--save-steps", type=int, default=0,
                       help="also save the training state every N steps (0: once per epoch)")
    group.add_argument("--report-to", default="auto",
                       help="trackers: auto (installed ones), none, or tensorboard,mlflow")
    group.add_argument("--train-windows", choices=TRAIN_WINDOWS, default="last",
                       help="train on each user's most recent max_len window, tile the "
                       "whole history into windows (all), or make every prefix a sample "
                       "with the next item its only target (prefixes, as RecBole)")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the model through Accelerate (inductor)")
    group.add_argument("--pcgrad", action="store_true",
                       help="PCGrad (Yu et al. 2020) between the terms of a loss of several (a "
                       "diffusion backbone's MSE and cross-entropy): where two terms' gradients "
                       "of the shared parameters conflict, each loses its component along the "
                       "other")
    group.add_argument("--resume", action="store_true", help="continue the run in --output-dir")


def add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("evaluation protocol")
    group.add_argument("--mask-history", action="store_true",
                       help="exclude every item the user has seen before the target (the "
                       "whole history, not only the --max-len inputs) from the ranking, as "
                       "RecBole does")
    group.add_argument("--item-chunk-size", type=int, default=100_000,
                       help="items scored at once (bounds memory; metrics do not depend on it)")
    group.add_argument("--eval-users", type=int,
                       help="evaluate a sample of N users (seeded by --seed, recorded in metrics)")


def add_item_encoder_arguments(parser: argparse.ArgumentParser, modality: str) -> None:
    """Flags of the content item encoders (`modality` = "text" or "image"), and of the
    content + ID fusion encoder of that modality."""
    group = parser.add_argument_group(f"{modality} item encoder")
    group.add_argument("--item-encoder", choices=[modality, f"{modality}+id"], default=modality,
                       help=f"{modality}: the content vector; {modality}+id: plus a learned "
                       "per-item ID vector (a table that starts at zero; see --fusion)")
    if modality == "text":
        group.add_argument("--encoder", default="minilm",
                           help="transformers encoder: a local folder, a hub name already in "
                           "the local cache, or 'minilm' (the installed all-MiniLM-L6-v2)")
        group.add_argument("--text-template",
                           help="item text from item table columns, e.g. '{title}. {genre}' "
                           "(default: the built-in dataset's template)")
        group.add_argument("--max-text-length", type=int, default=64, help="tokens per item")
    else:
        group.add_argument("--encoder", required=True,
                           help="ViT or ViTMAE model folder (or a hub name in the local cache)")
        group.add_argument("--image-store", type=Path, required=True,
                           help="LMDB image store keyed by the dataset's item ids "
                           "(scripts/build_image_store.py)")
    group.add_argument("--pooling", choices=["cls", "mean"],
                       default="mean" if modality == "text" else "cls",
                       help="CLS token, or the mean over tokens (text: the attention mask; "
                       "images: the patches)")
    group.add_argument("--freeze-encoder", dest="freeze_encoder", action="store_true",
                       default=True, help="keep the encoder frozen and cache its outputs")
    group.add_argument("--train-encoder", dest="freeze_encoder", action="store_false",
                       default=argparse.SUPPRESS,
                       help="train the encoder end to end (sampled softmax over the items "
                       "each batch needs; see --trainable-layers)")
    group.add_argument("--trainable-layers", type=int, default=-1,
                       help="with --train-encoder: train only the top K layers and cache the "
                       "hidden states below them (-1: all layers)")
    group.add_argument("--encoder-cache-dir", type=Path,
                       help="where encoder outputs are cached; unset: the dataset "
                       "folder's cache/")
    group.add_argument("--encode-batch-size", type=int, default=64,
                       help="items encoded at once when building caches and catalogs, and "
                       "by a trained encoder in the step (chunks of similar text length)")
    group.add_argument("--item-head", choices=list(HEADS), default="linear",
                       help="output head above the pooled encoder outputs: linear (one "
                       "affine map), mlp (linear shortcut + a GELU MLP), moe (UniSRec's "
                       "mixture of whitening experts)")
    group.add_argument("--head-hidden-size", type=int,
                       help="--item-head mlp: hidden width (unset: the encoder's hidden size)")
    group.add_argument("--num-experts", type=int, help="--item-head moe: experts (unset: 8)")
    group.add_argument("--head-dropout", type=float, default=0.0,
                       help="--item-head mlp/moe: dropout inside the head")
    group.add_argument("--moe-noise", action="store_true",
                       help="--item-head moe: UniSRec's noisy gating in training")
    group.add_argument("--whitening", choices=list(WHITENINGS), default="none",
                       help="frozen encoder: whiten its cached outputs with the catalog's own "
                       "statistics before the head (center: subtract the mean; zca: mean and "
                       "covariance); recomputed on each dataset, so a transferred model sees "
                       "the target's catalog whitened")
    group.add_argument("--fusion", choices=list(FUSIONS),
                       help=f"--item-encoder {modality}+id: content + ID vector (sum; unset: "
                       "sum), or content + a learned sigmoid gate times the ID vector (gate)")


def pretrain_parser(description: str, modality: str | None = None) -> argparse.ArgumentParser:
    """Flags of every pretraining script: common, model, training and protocol, plus the
    content item encoder's for `modality` "text" or "image"."""
    parser = base_parser(description)
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
    parser.add_argument("--run", required=True, type=Path,
                        help="run folder written by a pretraining script")
    parser.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--output", type=Path,
                        help="where to write the metrics (default RUN/evaluation.json)")
    add_protocol_arguments(parser)
    inference = parser.add_argument_group("DiffRec inference (default: the run's own)")
    inference.add_argument("--inference", choices=list(INFERENCE_MODES))
    inference.add_argument("--num-seeds", type=int, help="samples averaged")
    inference.add_argument("--inference-steps", type=int, help="steps of --inference strided")
    return parser


def inference_overrides(args: argparse.Namespace) -> dict:
    """The DiffRec inference settings given to scripts/evaluate.py (none: the run's own)."""
    return {name: getattr(args, name) for name in INFERENCE_SETTINGS
            if getattr(args, name, None) is not None}


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None):
    """Parse flags on top of the `--config` YAML file's values.

    A required flag may come from the file (argparse's own error names those given by
    neither), and a flag of a mutually exclusive group given on the command line replaces
    the file's choice in that group (`--input` on the command line, `dataset:` in the file).
    """
    defaults = {action.dest: action.default for action in _diffusion_actions(parser)}
    given = _command_line_settings(parser, argv)
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
        for action in parser._actions:
            action.required = action.required and action.dest not in values
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    backbone = getattr(args, "backbone", "diffrec")
    if backbone != "diffrec":
        given = [action.option_strings[0] for action in _diffusion_actions(parser)
                 if getattr(args, action.dest) != defaults[action.dest]]
        if given:
            raise CommandLineError(f"{', '.join(given)}: DiffRec settings, which do nothing "
                                   f"with --backbone {backbone}; drop them or use --backbone "
                                   "diffrec")
    return args


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
    return {dest: value for dest, value in vars(namespace).items() if value is not None}


def _diffusion_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [action for group in parser._action_groups if group.title == DIFFUSION_GROUP
            for action in group._group_actions]


def without_diffusion_flags(argv: Sequence[str]) -> list[str]:
    """`argv` less its DiffRec settings and their values: the flags of a SASRec run next
    to a DiffRec one (e.g. the reference of a benchmark that takes one set of flags)."""
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


def _read_config(path: Path, parser: argparse.ArgumentParser) -> dict:
    if not path.is_file():
        raise CommandLineError(f"--config {path}: no such file")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise CommandLineError(f"--config {path} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise CommandLineError(f"--config {path} must be a mapping of setting: value")
    known = {action.dest for action in parser._actions}
    values = {str(key).replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CommandLineError(
            f"--config {path}: unknown settings {unknown}; see --help for the valid names"
        )
    return values


def model_config(
    args: argparse.Namespace, num_items: int, fingerprint: str, data: SequenceData | None = None
) -> RecommenderConfig:
    item_encoder = getattr(args, "item_encoder", "id")
    encoder_config = ({} if item_encoder_modality(item_encoder) is None
                      else item_encoder_config(args, item_encoder, data))
    backbone_config = {
        "hidden_size": args.hidden_size, "num_layers": args.num_layers,
        "num_heads": args.num_heads, "ffn_size": args.ffn_size,
        "max_len": args.max_len, "dropout": args.dropout,
    }
    if args.backbone == "diffrec":
        backbone_config.update(
            schedule=args.schedule, num_steps=args.diffusion_steps, num_seeds=args.num_seeds,
            inference=args.inference, inference_steps=args.inference_steps,
            noised_positions=args.noised_positions, causal_denoiser=args.causal_denoiser,
            every_position=args.every_position, mse_weight=args.mse_weight,
            detach_noised_items=args.detach_noised_items, logit_scale=args.logit_scale,
            untied_output=args.untied_output, mse_reduction=args.mse_reduction,
        )
    return RecommenderConfig(
        num_items=num_items,
        backbone=args.backbone,
        item_encoder=item_encoder,
        item_encoder_config=encoder_config,
        backbone_config=backbone_config,
        loss=args.loss,
        num_negatives=args.num_negatives,
        negative_sampling=args.negative_sampling,
        repeat_bias=args.repeat_bias,
        dataset_fingerprint=fingerprint,
    )


def item_encoder_config(args: argparse.Namespace, item_encoder: str, data: SequenceData | None):
    """The content encoder's settings from the flags, resolved (fingerprint, hidden size)."""
    config = {"encoder": args.encoder, "pooling": args.pooling, "freeze": args.freeze_encoder,
              "trainable_layers": args.trainable_layers,
              "encode_batch_size": args.encode_batch_size, "head": args.item_head,
              "head_hidden_size": args.head_hidden_size, "num_experts": args.num_experts,
              "head_dropout": args.head_dropout, "moe_noise": args.moe_noise,
              "fusion": args.fusion, "whitening": args.whitening}
    if item_encoder_modality(item_encoder) == "text":
        template = args.text_template
        if template is None:
            if data is None:
                raise CommandLineError("the text encoder needs --text-template")
            try:
                template = default_template(data.name).template
            except DataError as error:
                raise CommandLineError(f"{error} (--text-template)") from None
        ItemTextTemplate(template)  # a malformed template fails now, not mid-run
        config.update(template=template, max_text_length=args.max_text_length)
    else:
        config["image_store"] = str(Path(args.image_store).absolute())
    return resolve_item_encoder_config(item_encoder, config)


def training_config(args: argparse.Namespace, output_dir: Path) -> TrainingConfig:
    freeze_items = getattr(args, "freeze_items_epochs", 0)  # a pretraining flag only
    return TrainingConfig(
        output_dir=str(output_dir), epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size, lr=args.lr, weight_decay=args.weight_decay,
        scheduler=args.scheduler, warmup_steps=args.warmup_steps,
        decay_epochs=tuple(args.decay_epochs), decay_factor=args.decay_factor,
        grad_accum=args.grad_accum,
        max_grad_norm=args.max_grad_norm, mixed_precision=args.mixed_precision,
        patience=args.patience, num_workers=args.num_workers, seed=args.seed,
        save_steps=args.save_steps, report_to=args.report_to, cpu=args.cpu, resume=args.resume,
        compile=args.compile, on_nan=args.on_nan, pcgrad=args.pcgrad,
        unfreeze_every=getattr(args, "unfreeze_every", 0),  # a full fine-tuning flag only
        freeze_prefixes=(ITEM_ENCODER_PREFIX,) if freeze_items else (), freeze_epochs=freeze_items,
    )


def protocol_config(args: argparse.Namespace) -> EvaluationProtocol:
    return EvaluationProtocol(
        mask_history=args.mask_history, item_chunk_size=args.item_chunk_size,
        max_users=args.eval_users, user_sample_seed=args.seed,
    )


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
