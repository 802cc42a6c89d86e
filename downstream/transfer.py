"""Transfer a pretrained recommender to a target dataset.

    base (a pretraining run) --rebuild the item side for the target--> target model
        --inject adapters, freeze the rest--> fine-tune with the Trainer --> evaluate

The item side is rebuilt for the target catalog: a content encoder (text, image) encodes
the target's items with the pretrained encoder and projection; an ID model gets a fresh,
trainable item table (and a generative backbone a fresh item bias), so only its backbone
transfers, except for target items matched to source items (`--match-items-by`,
`downstream.matching`): they keep their pretrained rows, trainable or frozen. Methods:

- an adapter method (`houlsby`, `lora`, `prefix`, ...): adapters injected by
  `adapters.get_adapted_model`, everything else frozen except the named extras and the
  fresh per-item parameters; the best checkpoint is the adapter alone
  (`adapters.checkpoint`), tied to the base by its fingerprint;
- `full`: every parameter trained (the upper reference); a complete checkpoint; or, with
  `--freeze GROUPS`, all but those pretrained groups; with `--unfreeze-every N`, the
  backbone unfrozen progressively from the top (`SequentialRecommender.unfreezing_stages`);
- `scratch`: the same architecture, randomly initialised, trained on the target only;
- `zero_shot`: the pretrained model evaluated on the target without training (content
  encoders; an ID model only with its items matched: the others have never been seen,
  and are scored as the average source item).
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import asdict, replace
from pathlib import Path

from peftrec.adapters import fold_prefixes, get_adapted_model, parse_layers
from peftrec.adapters.base import (
    EXTRAS,
    AdapterConfig,
    adapts_item_tables,
    current_parameter_name,
    extra_parameter_ids,
)
from peftrec.adapters.checkpoint import (
    is_adapter_checkpoint,
    load_adapter_weights,
    read_adapter_config,
    save_adapter,
)
from peftrec.adapters.lora import save_peft_adapters
from peftrec.adapters.placement import check_known
from peftrec.dataset_tools import (
    DataError,
    ItemTextTemplate,
    SequenceData,
    default_template,
)
from peftrec.dataset_tools.checkpoints import (
    CheckpointError,
    check_run_folder,
    load_weights,
    write_metrics,
    write_run_config,
)
from peftrec.downstream.matching import (
    MATCHING_FILE,
    ItemMatching,
    carry_matched_rows,
    freeze_matched_rows,
    load_source_dataset,
    match_items,
    plain_state_dict,
    read_matching,
)
from peftrec.downstream.popularity_prior import evaluate_with_prior, parse_prior
from peftrec.modality_encoders.base import lookup_table_names
from peftrec.modality_encoders.content_encoder import HEAD_SITE
from peftrec.modality_encoders.transformer import (
    ADAPTER_LAYOUTS,
    load_encoder_config,
    resolve_encoder_path,
)
from peftrec.pretraining.cli import is_main_process, protocol_config, training_config
from peftrec.pretraining.pipeline import (
    build_recommender,
    dataset_section,
    evaluate_model,
    evaluate_run,
    format_metrics_table,
    load_checkpoint,
    load_data,
    resolve_checkpoint,
    train_run,
    versions,
    with_later_settings,
)
from peftrec.pretraining.recommender import (
    WEIGHTS_NAME,
    RecommenderConfig,
    SequentialRecommender,
    checkpoint_fingerprint,
    load_recommender_config,
)
from peftrec.pretraining.trainer import build_accelerator

BASELINES = ("full", "scratch", "zero_shot")
# Score offsets a target may add to a base trained without them (`--repeat-bias`,
# `--item-bias`): they start neutral (0: no change to any score) and every fine-tuning
# trains them. The item bias is per item, restarted by every transfer like the other
# per-item parameters; the repeat bias is one more parameter the base may lack.
ADDABLE_SETTINGS = ("repeat_bias", "item_bias")
ADDABLE_PARAMETERS = ("repeat_bias",)


def target_config(
    base: RecommenderConfig,
    data: SequenceData,
    adapter: AdapterConfig | None = None,
    encoder_overrides: dict | None = None,
    added: tuple[str, ...] = (),
    objective: dict | None = None,
) -> RecommenderConfig:
    """The base's architecture for the target catalog (`added`: the `ADDABLE_SETTINGS` to
    turn on where the base has them off), trained with the base's objective unless
    `objective` replaces some of it
    (`loss`, `num_negatives`, `negative_sampling`: a training setting, not architecture;
    no weight depends on it).

    Adapters in the item encoder's transformer layers need the encoder inside the step: it
    is switched from frozen + cached outputs to partial caching, running only the layers
    from the lowest adapted one up (the hidden states below are cached), with its own
    weights frozen. Adapters on its output head alone keep the cache.
    """
    encoder_config = {**base.item_encoder_config, **(encoder_overrides or {})}
    if "template" in encoder_config and "template" not in (encoder_overrides or {}):
        encoder_config["template"] = target_template(encoder_config["template"], data)
    adapts_items = adapter is not None and adapter.adapt in ("item_encoder", "both")
    if adapts_items and base.item_encoder == "id" and not adapts_item_tables(adapter):
        raise ValueError(
            f"--adapt {adapter.adapt}: the base model's items are IDs (an embedding table "
            "has no layers to adapt); use --adapt backbone, or LoRA (scripts/adapter_lora.py), "
            "which adapts the table itself"
        )
    if adapts_items and base.item_encoder != "id":
        name = encoder_config["encoder"]
        encoder = load_encoder_config(resolve_encoder_path(name), name)
        if adapts_encoder_layers(adapter, encoder.model_type,
                                 lookup_table_names(base.item_encoder)):
            num_layers = encoder.num_hidden_layers
            lowest = parse_layers(adapter.layers, num_layers)[0]
            encoder_config.update(freeze=False,
                                  trainable_layers=-1 if lowest == 0 else num_layers - lowest)
    objective = {name: value for name, value in (objective or {}).items() if value is not None}
    loss = objective.get("loss", base.loss)
    sampling = sorted(set(objective) - {"loss"})
    if loss == "full" and sampling:
        flags = ", ".join("--" + name.replace("_", "-") for name in sampling)
        origin = "--loss full" if "loss" in objective else "the pretrained model's"
        raise ValueError(f"{flags}: settings of --loss sampled, but the loss is full "
                         f"({origin}); add --loss sampled or drop them")
    unknown = sorted(set(added) - set(ADDABLE_SETTINGS))
    if unknown:
        raise ValueError(f"{unknown}: a target can add only {list(ADDABLE_SETTINGS)}")
    return replace(base, num_items=data.num_items, dataset_fingerprint=data.fingerprint,
                   item_encoder_config=encoder_config, **dict.fromkeys(added, True),
                   **objective)


OBJECTIVE = ("loss", "num_negatives", "negative_sampling")  # what a target may train with


def objective_overrides(args: argparse.Namespace) -> dict:
    """The training objective given to a fine-tuning script (unset: the base's)."""
    return {name: getattr(args, name) for name in OBJECTIVE
            if getattr(args, name, None) is not None}


def adapts_encoder_layers(adapter: AdapterConfig, model_type: str,
                          lookup_tables: tuple[str, ...] = ()) -> bool:
    """Whether `adapter` reaches a content encoder's transformer layers, rather than only
    what lies above the cache: it does unless it names the output head (`--sites
    projection`, `--target-modules projection`) or one of the encoder's `lookup_tables` (a
    content + ID encoder's `id_embedding`, a text encoder's `token_vectors`) and nothing
    those layers hold."""
    names = set(adapter.placement())
    above_cache = {HEAD_SITE, *lookup_tables}
    if not names & above_cache:
        return True
    layout = ADAPTER_LAYOUTS.get(model_type)
    layer_names = set(layout[0]) | set(layout[1]) if layout else names - above_cache
    return bool(names & layer_names)


def target_template(template: str, data: SequenceData) -> str:
    """The item text template for the target: the base's when the target's item table has
    its fields, else the target's built-in default (e.g. ML-1M's `{genre}` is ML-100k's
    `{class}`); otherwise an error asking for --text-template."""
    columns = set(data.items.column_names)
    if set(ItemTextTemplate(template).fields) <= columns:
        return template
    try:
        return default_template(data.name).template
    except DataError:
        missing = sorted(set(ItemTextTemplate(template).fields) - columns)
        raise ValueError(
            f"the pretrained model's item text template {template!r} uses fields {missing} "
            f"that {data.path} lacks (it has {sorted(columns)}); pass --text-template"
        ) from None


def build_target_model(
    config: RecommenderConfig,
    base_dir: Path | None,
    data: SequenceData,
    encoder_cache_dir: Path | None = None,
) -> SequentialRecommender:
    """The target model with the base's weights (`base_dir`), or freshly initialised
    (`base_dir` None, for training from scratch)."""
    model = build_recommender(config, data, encoder_cache_dir)
    if base_dir is not None:
        transfer_weights(model, base_dir)
    return model


def transfer_weights(model: SequentialRecommender, base_dir: Path) -> None:
    """Copy every base tensor into `model`, except the per-item ones of the source catalog.

    Every target tensor must come from the base, except the per-item ones (fresh), those
    the target adds (`ADDABLE_PARAMETERS`) and the weights of a content encoder that the
    base kept frozen outside the model (they come from the encoder's own folder); anything
    else means another architecture.
    """
    base_state = load_weights(base_dir, WEIGHTS_NAME)
    per_item = set(model.catalog_parameter_names())
    target_state = model.state_dict()
    missing, unfitting = [], []
    for name, tensor in target_state.items():
        if name in per_item:
            continue
        if name not in base_state:
            if not name.startswith("item_encoder.encoder.") and name not in ADDABLE_PARAMETERS:
                missing.append(name)
            continue
        if base_state[name].shape != tensor.shape:
            unfitting.append(f"{name} {tuple(base_state[name].shape)} vs {tuple(tensor.shape)}")
            continue
        target_state[name] = base_state[name]
    unexpected = sorted(set(base_state) - set(target_state) - per_item)
    if missing or unfitting or unexpected:
        raise CheckpointError(
            f"--pretrained {base_dir} does not fit the target model (missing "
            f"{missing[:3]}, other shapes {unfitting[:3]}, unexpected {unexpected[:3]}); "
            "pass a checkpoint written by a peftrec pretraining script"
        )
    model.load_state_dict(target_state)


def adapt(model: SequentialRecommender, adapter: AdapterConfig) -> SequentialRecommender:
    """Inject `adapter` and freeze the rest, keeping the fresh per-item parameters and the
    repeat bias trainable."""
    get_adapted_model(model, adapter)
    parameters = dict(model.named_parameters())
    for name in [*model.catalog_parameter_names(), *ADDABLE_PARAMETERS]:
        if name in parameters:
            parameters[name].requires_grad_(True)
    return model


def freeze_groups(model: SequentialRecommender, groups: tuple[str, ...]) -> None:
    """Keep the pretrained parameters of `groups` (keys of `EXTRAS`, the groups adapters'
    `--tune` names) fixed: requires_grad off, so in no optimizer. The per-item tables that
    transfer restarts stay trainable (their matched rows are frozen by
    `freeze_matched_rows`)."""
    fixed = extra_parameter_ids(model, groups)
    catalog = set(model.catalog_parameter_names())
    for name, parameter in model.named_parameters():
        if id(parameter) in fixed and name not in catalog:
            parameter.requires_grad_(False)


def load_adapted_model(
    directory: Path,
    data: SequenceData,
    base_dir: Path | None = None,
    encoder_cache_dir: Path | None = None,
) -> SequentialRecommender:
    """Rebuild a fine-tuned model from its adapter checkpoint and base checkpoint.

    `base_dir` defaults to the base recorded in the adapter checkpoint; its fingerprint
    must be the recorded one.
    """
    adapter, meta = read_adapter_config(directory)
    base_dir = Path(base_dir or meta["pretrained"])
    config = RecommenderConfig(**meta["model"])
    if config.dataset_fingerprint != data.fingerprint:
        raise CheckpointError(
            f"{directory} was fine-tuned on another dataset (fingerprint "
            f"{str(config.dataset_fingerprint)[:12]}) than {data.path} "
            f"({data.fingerprint[:12]}); evaluate it on its own dataset"
        )
    fingerprint = checkpoint_fingerprint(base_dir)
    record = meta.get("item_matching")
    matching = read_matching(directory, record) if record else None
    model = matched_target_model(config, base_dir, data, encoder_cache_dir, adapter, matching,
                                 frozen=bool(record and record.get("frozen")))
    load_adapter_weights(model, directory, fingerprint)
    return model


def matched_target_model(
    config: RecommenderConfig,
    base_dir: Path | None,
    data: SequenceData,
    encoder_cache_dir: Path | None = None,
    adapter: AdapterConfig | None = None,
    matching: ItemMatching | None = None,
    frozen: bool = False,
    announce: bool = False,
    freeze: tuple[str, ...] = (),
) -> SequentialRecommender:
    """The target model on its base (`base_dir`; None: from scratch), its matched items'
    rows carried from the base, adapted by `adapter`, the parameter groups `freeze` fixed
    (`freeze_groups`), and, if `frozen`, the matched rows frozen (after the adapters, whose
    injection freezes whole parameters). `announce`: print the matching's counts (main
    process)."""
    model = build_target_model(config, base_dir, data, encoder_cache_dir)
    carried = []
    if matching is not None:
        carried = carry_matched_rows(model, base_dir, matching)
        if announce and is_main_process():
            print(f"{matching.summary()}; carried {', '.join(carried)}"
                  f"{' (frozen)' if frozen else ''}")
    if adapter is not None:
        adapt(model, adapter)
    if freeze:
        freeze_groups(model, freeze)
    if matching is not None:
        # A table under LoRA keeps its matched rows as pretrained whatever `frozen` says:
        # the low-rank update moves them (its parameter is then its `base_layer`'s).
        adapted = [current_parameter_name(model, name) for name in carried]
        rows = [now for name, now in zip(carried, adapted, strict=True) if frozen or now != name]
        if rows:
            freeze_matched_rows(model, matching, rows)
    return model


def load_any_checkpoint(
    directory: Path, data: SequenceData, encoder_cache_dir: Path | None = None
) -> SequentialRecommender:
    """A full checkpoint or an adapter checkpoint (rebuilt on its recorded base)."""
    if is_adapter_checkpoint(directory):
        return load_adapted_model(directory, data, encoder_cache_dir=encoder_cache_dir)
    return load_checkpoint(directory, data, encoder_cache_dir=encoder_cache_dir)


def evaluate_any_run(args: argparse.Namespace) -> dict:
    """`scripts/evaluate.py`: re-evaluate a pretraining or fine-tuning run folder."""
    return evaluate_run(args, lambda directory, data: load_any_checkpoint(
        directory, data, args.encoder_cache_dir))


def finetune(args: argparse.Namespace, adapter: AdapterConfig | None, method: str) -> dict:
    """Fine-tune `--pretrained` on `--dataset` with `method` (an adapter method or one of
    BASELINES); returns metrics.json's content."""
    data = load_data(args.dataset, args.cache_dir)
    base_dir = resolve_checkpoint(args.pretrained, f"--pretrained {args.pretrained}")
    base = load_recommender_config(base_dir)
    if args.backbone is not None and args.backbone != base.backbone:
        raise CheckpointError(f"--backbone {args.backbone}: --pretrained {base_dir} is a "
                              f"{base.backbone} model; drop --backbone or pass a {args.backbone} "
                              "checkpoint")
    matching = resolve_matching(args, base_dir, base, data, method)
    freeze = tuple(getattr(args, "freeze", ()))
    check_known(freeze, EXTRAS, "--freeze group(s)", "valid")
    strategies = [flag for flag, given in (("--freeze", freeze),
                                           ("--unfreeze-every", getattr(args, "unfreeze_every", 0)))
                  if given]
    if strategies and method != "full":
        raise ValueError(f"{', '.join(strategies)}: a strategy of fine-tuning pretrained weights "
                         f"(full fine-tuning), not of {method}; drop it")
    # Frozen pretrained embeddings include the item rows carried from the base.
    frozen = matching is not None and (bool(getattr(args, "freeze_matched_items", False))
                                       or "embeddings" in freeze)
    prior = parse_prior(getattr(args, "popularity_prior", None))  # finetune_full only
    if prior is not None and method != "zero_shot":
        raise ValueError("--popularity-prior: a zero-shot setting (training learns the target's "
                         "popularity itself); add --zero-shot or drop it")
    if method == "zero_shot" and base.item_encoder == "id" and matching is None:
        raise ValueError("zero-shot transfer needs a content item encoder (text or image): an "
                         "ID model has never seen the target's items; fine-tune it instead, "
                         "or match the items both domains share (--match-items-by FIELDS)")
    added = tuple(name for name in ADDABLE_SETTINGS if getattr(args, name))
    config = target_config(base, data, adapter, encoder_overrides(args), added,
                           objective_overrides(args))
    output_dir = args.output_dir or Path("runs") / f"{data.name}-{method}"
    fingerprint = checkpoint_fingerprint(base_dir)
    encoder_cache_dir = getattr(args, "encoder_cache_dir", None)
    run_config = {
        "dataset": dataset_section(data, args),
        "model": asdict(config),
        "transfer": {"pretrained": str(base_dir.absolute()), "base_fingerprint": fingerprint,
                     "method": method, "adapter": adapter and adapter.to_dict()},
        "training": asdict(training_config(args, output_dir)),
        "protocol": asdict(protocol_config(args)),
        "command": sys.argv,
        "versions": versions(),
    }
    if freeze:  # only when given: runs from before the flag resume unchanged
        run_config["transfer"]["freeze"] = list(freeze)
    if prior is not None:
        run_config["transfer"]["popularity_prior"] = prior
    extra_files = {}
    if matching is not None:
        run_config["transfer"]["item_matching"] = matching_record(
            matching, frozen, "source_mean" if method == "zero_shot" else "fresh")
        extra_files[MATCHING_FILE] = matching.to_json()
    label = f"{data.name} {method}"
    if method == "zero_shot":
        return _zero_shot(args, data, config, base_dir, output_dir, run_config, label,
                          matching, prior)

    def build_model() -> SequentialRecommender:
        return matched_target_model(config, None if method == "scratch" else base_dir, data,
                                    encoder_cache_dir, adapter, matching, frozen, announce=True,
                                    freeze=freeze)

    def save_model(model, state_dict: dict, directory: Path) -> None:
        save_target_model(model, directory, adapter, base_dir, fingerprint, matching, frozen,
                          state_dict)

    def load_best(directory: Path) -> SequentialRecommender:
        if adapter is None:
            return load_checkpoint(directory, data, encoder_cache_dir=encoder_cache_dir)
        return load_adapted_model(directory, data, base_dir, encoder_cache_dir)

    return train_run(args, data, output_dir, run_config, build_model, load_best, label,
                     save_model, extra_files)


def save_target_model(
    model: SequentialRecommender,
    directory: Path,
    adapter: AdapterConfig | None,
    base_dir: Path,
    base_fingerprint: str,
    matching: ItemMatching | None = None,
    frozen: bool = False,
    state_dict: dict | None = None,
) -> None:
    """The best checkpoint of a fine-tuning run: a complete one (`adapter` None), or the
    adapter alone, tied to the base by its fingerprint, with the item matching (if any)
    that rebuilds the model's carried and frozen rows on that base."""
    if adapter is None:
        if frozen:  # composed back into plain tensors: loadable without the matching
            state_dict = plain_state_dict(model, state_dict)
        model.save_pretrained(directory, state_dict)
        return
    saved = adapter
    if getattr(adapter, "reparameterize", False):
        # Save the prefixes the MLPs produce, not the MLPs: smaller, and what
        # inference runs (the training model keeps its MLPs).
        model, state_dict = fold_prefixes(copy.deepcopy(model)), None
        saved = adapter.replace(reparameterize=False)
    metadata = {"pretrained": str(base_dir.absolute()), "model": asdict(model.config)}
    extra_files = {}
    if matching is not None:
        metadata["item_matching"] = matching_record(matching, frozen, "fresh")
        extra_files[MATCHING_FILE] = matching.to_json()
    # A transformers encoder's LoRA also in peft's own format, for use outside peftrec,
    # written inside the checkpoint's atomic write: covered by its checksums.
    save_adapter(model, directory, saved, base_fingerprint, state_dict=state_dict,
                 metadata=metadata, extra_files=extra_files,
                 write_more=lambda folder: save_peft_adapters(model, folder, state_dict))


def matching_record(matching: ItemMatching, frozen: bool, unmatched: str) -> dict:
    """How config.json (and an adapter checkpoint) records a run's item matching."""
    return {**matching.record(), "frozen": frozen, "unmatched": unmatched}


def resolve_matching(args: argparse.Namespace, base_dir: Path, base: RecommenderConfig,
                     data: SequenceData, method: str) -> ItemMatching | None:
    """The target -> source item mapping `--match-items-by` asks for (None without it),
    against the base's source dataset (recorded by its run, or `--source-dataset`)."""
    requested = getattr(args, "match_items_by", None)
    fields = requested.split(",") if isinstance(requested, str) else requested or ()
    fields = tuple(f.strip() for f in fields if f.strip())
    if not fields:
        given = [flag for flag, name in (("--freeze-matched-items", "freeze_matched_items"),
                                         ("--source-dataset", "source_dataset"))
                 if getattr(args, name, None)]
        if given or requested is not None:  # e.g. --match-items-by ","
            raise ValueError(f"{', '.join(given) or '--match-items-by'}: needs item fields to "
                             "match by, e.g. --match-items-by movie_title,release_year")
        return None
    if method == "scratch":
        raise ValueError("--match-items-by carries pretrained item vectors, and --from-scratch "
                         "uses no pretrained weights; drop one of them")
    source = load_source_dataset(base_dir, base.dataset_fingerprint,
                                 getattr(args, "source_dataset", None), args.cache_dir)
    return match_items(source, data, fields)


def encoder_overrides(args: argparse.Namespace) -> dict:
    """Item-encoder settings replaced for the target (its image store, a moved encoder)."""
    overrides = {}
    if getattr(args, "encoder", None):
        overrides["encoder"] = args.encoder
    if getattr(args, "template", None):
        overrides["template"] = args.template
    if getattr(args, "image_store", None):
        overrides["image_store"] = str(Path(args.image_store).absolute())
    return overrides


def _zero_shot(args, data, config, base_dir, output_dir, run_config, label,
               matching: ItemMatching | None = None, prior: str | float | None = None) -> dict:
    # Checked before evaluating: metrics.json must not silently replace another run's.
    check_run_folder(output_dir, run_config, args.resume, with_later_settings)
    accelerator = build_accelerator(training_config(args, output_dir))
    model = build_target_model(config, base_dir, data, getattr(args, "encoder_cache_dir", None))
    if matching is not None:  # unmatched items: the average source item (none is known)
        carried = carry_matched_rows(model, base_dir, matching, unmatched="source_mean")
        accelerator.print(f"{matching.summary()}; carried {', '.join(carried)}; the "
                          "others scored as the average source item")
    if prior is None:
        metrics = evaluate_model(model, data, protocol_config(args), args.eval_batch_size,
                                 accelerator)
    else:
        metrics, chosen = evaluate_with_prior(model, data, protocol_config(args),
                                              args.eval_batch_size, accelerator, prior)
        metrics["popularity_prior"] = chosen
        accelerator.print(f"popularity prior: weight {chosen['weight']:g}")
    if accelerator.is_main_process:
        extra_files = {MATCHING_FILE: matching.to_json()} if matching is not None else {}
        write_run_config(output_dir, run_config, extra_files)
        write_metrics(output_dir, metrics)
        print(format_metrics_table({label: metrics}))
    return metrics

