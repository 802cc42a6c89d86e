"""End-to-end jobs behind the scripts: pretrain a recommender, re-evaluate a run folder.

A run folder holds `config.json` (resolved settings, versions, dataset fingerprint),
`metrics.json`, `log.jsonl`, `best_model/` and `state/` (see `dataset_tools.checkpoints`
and `pretraining.trainer`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from peftrec.dataset_tools import SequenceData, atomic_write, load_dataset_folder, resolve_dataset
from peftrec.dataset_tools.checkpoints import (
    BEST_DIR,
    RUN_CONFIG,
    check_run_folder,
    load_weights,
    read_json,
    write_metrics,
    write_run_config,
)
from peftrec.dataset_tools.parameters import format_trainable_share, trainable_share
from peftrec.modality_encoders import build_item_content, normalize_item_encoder_config
from peftrec.pretraining.cli import (
    ITEM_ENCODER_PREFIX,
    inference_overrides,
    model_config,
    protocol_config,
    training_config,
)
from peftrec.pretraining.data import LeaveOneOutDataset, collate_left_padded, item_frequencies
from peftrec.pretraining.evaluation import EvaluationProtocol, evaluate
from peftrec.pretraining.recommender import (
    BACKBONES,
    WEIGHTS_NAME,
    CheckpointError,
    RecommenderConfig,
    SequentialRecommender,
    build_backbone_config,
    checkpoint_fingerprint,
    first_line,
    load_recommender_config,
)
from peftrec.pretraining.trainer import Trainer, build_accelerator, check_process_count

METRIC_COLUMNS = ("hr@5", "ndcg@5", "hr@10", "ndcg@10", "hr@20", "ndcg@20", "mrr")


def load_data(dataset: str, cache_dir: Path | None) -> SequenceData:
    return load_dataset_folder(resolve_dataset(dataset, cache_dir))


def pretrain(args: argparse.Namespace) -> dict:
    """Train a recommender from scratch on `args.dataset`; returns metrics.json's content."""
    data = load_data(args.dataset, args.cache_dir)
    output_dir = args.output_dir or Path("runs") / f"{data.name}-{args.backbone}"
    config = model_config(args, data.num_items, data.fingerprint, data)
    encoder_cache_dir = getattr(args, "encoder_cache_dir", None)
    model_section = asdict(config)
    item_source = None
    if args.init_items_from is not None:  # checked now: a bad source fails before training
        item_source = item_source_checkpoint(args.init_items_from, config)
        # In the model section, so that a resume from another source is refused.
        model_section["item_init"] = source_record(item_source)
    denoiser_source = None
    if args.init_denoiser_from is not None:
        denoiser_source = denoiser_source_checkpoint(args.init_denoiser_from)
        model_section["denoiser_init"] = source_record(denoiser_source)
    run_config = {
        "preset": args.preset,  # as resolved: named, the backbone's default, or none
        "dataset": dataset_section(data, args),
        "model": model_section,
        "training": asdict(training_config(args, output_dir)),
        "protocol": asdict(protocol_config(args)),
        "command": sys.argv,
        "versions": versions(),
    }

    def build_model() -> SequentialRecommender:
        model = build_recommender(config, data, encoder_cache_dir)
        if item_source is not None:
            copy_item_encoder(item_source, model)
            if model.output_items is not None:  # the output table starts as the items too
                model.copy_items_to_output()
        if denoiser_source is not None:
            copy_sasrec_transformer(denoiser_source, model)
        return model

    def load_best(checkpoint: Path) -> SequentialRecommender:
        return load_checkpoint(checkpoint, data, model_frequencies(config, data),
                               encoder_cache_dir)

    return train_run(args, data, output_dir, run_config, build_model, load_best,
                     label=f"{data.name} {args.backbone}")


def resolve_checkpoint(path: str | Path, flag: str) -> Path:
    """The checkpoint folder of `path`: a run folder's best_model/, or the checkpoint folder
    itself. `flag` names the option in the error."""
    path = Path(path)
    if (path / BEST_DIR / WEIGHTS_NAME).is_file():
        return path / BEST_DIR
    if (path / WEIGHTS_NAME).is_file():
        return path
    raise CheckpointError(
        f"{flag}: no pretrained checkpoint there (expected {BEST_DIR}/{WEIGHTS_NAME} of a run "
        "folder written by a pretraining script, or such a checkpoint folder)"
    )


def source_record(checkpoint: Path) -> dict:
    """How config.json names a checkpoint a run started from: its path and fingerprint."""
    return {"checkpoint": str(checkpoint.absolute()),
            "fingerprint": checkpoint_fingerprint(checkpoint)}


def item_source_checkpoint(source: Path, config: RecommenderConfig) -> Path:
    """The checkpoint of `--init-items-from` (a run folder or its best_model/), checked to
    hold an item encoder for the same catalog and of the same kind and width as `config`'s."""
    flag = f"--init-items-from {source}"
    checkpoint = resolve_checkpoint(source, flag)
    origin = load_recommender_config(checkpoint)
    if (origin.dataset_fingerprint, origin.num_items) != (config.dataset_fingerprint,
                                                          config.num_items):
        raise CheckpointError(
            f"{flag} was trained on another dataset (fingerprint "
            f"{str(origin.dataset_fingerprint)[:12]}, {origin.num_items} items) than this run "
            f"(fingerprint {str(config.dataset_fingerprint)[:12]}, {config.num_items} items); "
            "item tables are per catalog: pass a run on this --dataset"
        )
    width, origin_width = (c.backbone_settings().hidden_size for c in (config, origin))
    if (origin.item_encoder, origin_width) != (config.item_encoder, width):
        raise CheckpointError(
            f"{flag} has a {origin.item_encoder!r} item encoder of width {origin_width}, this "
            f"model a {config.item_encoder!r} one of width {width}; pass --hidden-size "
            f"{origin_width} (and its item encoder), or a run with this model's"
        )
    before, now = (normalize_item_encoder_config(c.item_encoder, c.item_encoder_config)
                   for c in (origin, config))
    if before != now:
        # Copied weights must be the ones the encoder's output cache was computed with.
        changed = sorted(key for key in before | now if before.get(key) != now.get(key))
        raise CheckpointError(f"{flag}: its item encoder settings differ ({changed}); "
                              "use the source run's encoder flags")
    return checkpoint


def copy_item_encoder(checkpoint: Path, model: SequentialRecommender) -> None:
    """Overwrite `model`'s item encoder with the one saved in `checkpoint`."""
    state = {name.removeprefix(ITEM_ENCODER_PREFIX): tensor
             for name, tensor in load_weights(checkpoint, WEIGHTS_NAME).items()
             if name.startswith(ITEM_ENCODER_PREFIX)}
    try:
        model.item_encoder.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"--init-items-from {checkpoint}: its item encoder does not fit "
                              f"this model ({first_line(error)})") from None


def denoiser_source_checkpoint(source: Path) -> Path:
    """The checkpoint of `--init-denoiser-from`: a SASRec run folder or its best_model/."""
    checkpoint = resolve_checkpoint(source, f"--init-denoiser-from {source}")
    origin = load_recommender_config(checkpoint)
    if origin.backbone != "sasrec":
        raise CheckpointError(f"--init-denoiser-from {source} is a {origin.backbone!r} run; "
                              "the denoiser starts from a SASRec run's Transformer")
    return checkpoint


def copy_sasrec_transformer(checkpoint: Path, model: SequentialRecommender) -> None:
    """Start `model`'s DiffRec denoiser (and its repeat bias, when both have one) from the
    SASRec saved in `checkpoint` (see `DiffRec.load_sasrec_transformer`)."""
    weights = load_weights(checkpoint, WEIGHTS_NAME)
    origin = load_recommender_config(checkpoint)
    state = {name.removeprefix("backbone."): tensor for name, tensor in weights.items()
             if name.startswith("backbone.")}
    try:
        model.backbone.load_sasrec_transformer(state, origin.backbone_settings())
    except (ValueError, RuntimeError) as error:
        raise CheckpointError(f"--init-denoiser-from {checkpoint}: "
                              f"{first_line(error)}") from None
    if model.config.repeat_bias and "repeat_bias" in weights:
        model.repeat_bias.data.copy_(weights["repeat_bias"])


def model_frequencies(config: RecommenderConfig, data: SequenceData):
    """Item frequencies when the model samples negatives by popularity, else None."""
    return item_frequencies(data) if config.negative_sampling == "popularity" else None


def build_recommender(
    config: RecommenderConfig, data: SequenceData, encoder_cache_dir: Path | None = None
) -> SequentialRecommender:
    """A freshly initialised recommender for `data`, with its items' content."""
    content = build_item_content(data, config.item_encoder, config.item_encoder_config,
                                 encoder_cache_dir)
    return SequentialRecommender(config, model_frequencies(config, data), content)


def dataset_section(data: SequenceData, args: argparse.Namespace) -> dict:
    return {"name": data.name, "path": str(data.path), "fingerprint": data.fingerprint,
            "train_windows": args.train_windows}


def train_run(
    args: argparse.Namespace,
    data: SequenceData,
    output_dir: Path,
    run_config: dict,
    build_model: Callable[[], SequentialRecommender],
    load_best: Callable[[Path], SequentialRecommender],
    label: str,
    save_model: Callable | None = None,
    extra_files: dict[str, str] | None = None,
) -> dict:
    """The run-folder job shared by pretraining and fine-tuning: write config.json (and
    `extra_files`, name -> text, beside it), build the model (after seeding), train with the
    Trainer, evaluate the best checkpoint (loaded by `load_best`), write metrics.json and
    print the table. Returns the metrics."""
    check_run_folder(output_dir, run_config, args.resume, with_later_settings)
    trainer_config = training_config(args, output_dir)
    accelerator = build_accelerator(trainer_config)
    set_seed(args.seed)  # before the model exists: its initial weights depend on the seed
    model = build_model()  # bad settings fail here, before the run folder is written
    if accelerator.is_main_process:
        write_run_config(output_dir, run_config, extra_files)
    trainable, total, percent = trainable_share(model)
    max_len = model.config.backbone_settings().max_len
    protocol = protocol_config(args)
    trainer = Trainer(
        model, trainer_config,
        LeaveOneOutDataset(data, "train", max_len, windows=args.train_windows),
        evaluation_dataset(data, "valid", max_len, protocol), collate_left_padded, protocol,
        accelerator, save_model,
    )
    accelerator.print(f"{data.name}: {data.num_users} users, {data.num_items} items; "
                      f"{accelerator.num_processes} process(es)\n"
                      f"{format_trainable_share(model)}")
    summary = trainer.train()
    metrics = evaluate_model(load_best(output_dir / BEST_DIR), data, protocol,
                             trainer_config.eval_batch_size, accelerator)
    metrics["training"] = summary
    metrics["parameters"] = {"trainable": trainable, "total": total, "trainable_percent": percent}
    # Size of what the best checkpoint stores (the adapter alone for adapter runs).
    metrics["checkpoint_mb"] = sum(
        f.stat().st_size for f in (output_dir / BEST_DIR).glob("*.safetensors")) / 2**20
    if accelerator.is_main_process:
        write_metrics(output_dir, metrics)
        print(format_metrics_table({label: metrics}))
    return metrics


def load_checkpoint(
    checkpoint: Path,
    data: SequenceData,
    frequencies=None,
    encoder_cache_dir: Path | None = None,
) -> SequentialRecommender:
    """A saved recommender, checked to belong to `data` (`frequencies`: default the data's,
    when the model samples negatives by popularity)."""
    config = load_recommender_config(checkpoint)
    if frequencies is None:
        frequencies = model_frequencies(config, data)
    content = build_item_content(data, config.item_encoder, config.item_encoder_config,
                                 encoder_cache_dir)
    model = SequentialRecommender.from_pretrained(checkpoint, frequencies, content)
    trained_on = model.config.dataset_fingerprint
    if trained_on != data.fingerprint or model.config.num_items != data.num_items:
        raise CheckpointError(
            f"{checkpoint} was trained on another dataset (fingerprint {str(trained_on)[:12]}, "
            f"{model.config.num_items} items) than {data.path} (fingerprint "
            f"{data.fingerprint[:12]}, {data.num_items} items); evaluate it on its own dataset, "
            "or fine-tune it on this one with the downstream scripts"
        )
    return model


def evaluate_checkpoint(
    checkpoint: Path,
    data: SequenceData,
    protocol: EvaluationProtocol,
    batch_size: int,
    accelerator: Accelerator,
    frequencies=None,
    encoder_cache_dir: Path | None = None,
) -> dict:
    """Validation and test metrics of a saved checkpoint on `data`, plus the protocol."""
    model = load_checkpoint(checkpoint, data, frequencies, encoder_cache_dir)
    return evaluate_model(model, data, protocol, batch_size, accelerator)


def evaluate_model(
    model: SequentialRecommender,
    data: SequenceData,
    protocol: EvaluationProtocol,
    batch_size: int,
    accelerator: Accelerator,
    splits: tuple[str, ...] = ("valid", "test"),
) -> dict:
    """Metrics of `model` on `data` by full ranking for each split in `splits`, plus the
    protocol."""
    model.to(accelerator.device)
    max_len = model.config.backbone_settings().max_len
    results = {}
    for split in splits:
        loader = accelerator.prepare(DataLoader(
            evaluation_dataset(data, split, max_len, protocol), batch_size=batch_size,
            collate_fn=collate_left_padded,
        ))
        results[split] = evaluate(model, loader, accelerator, protocol, split)
    results["protocol"] = results[splits[0]].pop("protocol")
    for split in splits[1:]:
        results[split].pop("protocol")
    return results


def evaluation_dataset(
    data: SequenceData, split: str, max_len: int, protocol: EvaluationProtocol
) -> LeaveOneOutDataset:
    return LeaveOneOutDataset(data, split, max_len, protocol.max_users, protocol.user_sample_seed,
                              full_history=protocol.mask_history)


def run_dataset(run_dir: Path, dataset: str | None = None,
                cache_dir: Path | None = None) -> SequenceData:
    """The dataset of a run folder: `dataset` (a name or folder) if given, else the one its
    config.json records."""
    if not (run_dir / RUN_CONFIG).is_file():
        raise CheckpointError(f"{run_dir} is not a run folder (no {RUN_CONFIG}); pass --run DIR "
                              "of a finished or interrupted training run")
    run_config = read_json(run_dir / RUN_CONFIG)
    return load_data(dataset or run_config["dataset"]["path"], cache_dir)


def evaluate_run(
    args: argparse.Namespace,
    load_model: Callable[[Path, SequenceData], SequentialRecommender] | None = None,
) -> dict:
    """Re-evaluate the best checkpoint of a run folder; writes `evaluation.json` there.

    `load_model(checkpoint, data)` loads the checkpoint (default: a full checkpoint;
    the downstream package passes one that also reads adapter checkpoints)."""
    run_dir = Path(args.run)
    data = run_dataset(run_dir, args.dataset, args.cache_dir)
    accelerator = Accelerator(cpu=args.cpu)
    check_process_count(accelerator)
    model = (load_model or load_checkpoint)(run_dir / BEST_DIR, data)
    inference = inference_overrides(args)
    if inference:
        model.set_inference(**inference)
    metrics = evaluate_model(model, data, protocol_config(args), args.eval_batch_size,
                             accelerator)
    if inference:
        metrics["inference"] = inference
    if accelerator.is_main_process:
        output = Path(args.output) if args.output else run_dir / "evaluation.json"
        atomic_write(output, json.dumps(metrics, indent=2))
        print(format_metrics_table({f"{run_dir.name} on {data.name}": metrics}))
    return metrics


def format_metrics_table(runs: dict[str, dict]) -> str:
    """A plain-text table of test (and validation NDCG@10) metrics, one row per run."""
    header = ["run", "valid ndcg@10", *(f"test {m}" for m in METRIC_COLUMNS)]
    rows = [[name, f"{m['valid']['ndcg@10']:.4f}", *(f"{m['test'][c]:.4f}" for c in METRIC_COLUMNS)]
            for name, m in runs.items()]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
             for row in [header, *rows]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


# Run settings added after run folders were first written, with the behaviour runs from
# before had (a config.json without the key ran that way), so they still resume.
SETTINGS_ADDED_LATER = {"dataset": {"train_windows": "last"},
                        "model": {"item_encoder_config": {}, "repeat_bias": False}}


def with_later_settings(section: str, settings: dict) -> dict:
    """`settings` with the settings added since at the values older runs ran with: those of
    SETTINGS_ADDED_LATER, and the backbone's own (dataclass fields added with their old
    behaviour as the default). As read back from JSON: tuples compare as lists."""
    settings = json.loads(json.dumps({**SETTINGS_ADDED_LATER.get(section, {}), **settings}))
    if section == "model" and settings.get("backbone") in BACKBONES:
        settings["backbone_config"] = asdict(
            build_backbone_config(settings["backbone"], settings.get("backbone_config", {})))
    if section == "model" and settings.get("item_encoder_config"):  # e.g. the item head's
        settings["item_encoder_config"] = normalize_item_encoder_config(
            settings.get("item_encoder", "id"), settings["item_encoder_config"])
    return settings


def versions() -> dict:
    import accelerate
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__}
