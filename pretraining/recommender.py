"""A sequential recommender = item encoder + sequence backbone + the backbone's scorer.

The model contract used by the Trainer and the evaluator:
- `loss(batch) -> {"loss": tensor, ...}` (several named losses may be returned; a loss
  of several terms also returns them, undetached, as `"terms"`: {name: tensor}, which sum
  to "loss", for `--pcgrad`),
- `query(batch)` once per batch, then `score_items(query, item_ids)` for any block
  of candidates (the evaluator walks the catalog in chunks, so memory is bounded by
  the chunk, not the catalog); `scores(batch)` = all items at once, column 0 being
  padding, which is never ranked.
The three are the scorer's (`pretraining.scoring.Scorer`, named by the backbone class:
the dot product for SASRec, the seed-averaged softmax for DiffRec), as are the per-item
parameters it declares and the inference settings it lets `set_inference` change.
Batches are dicts of `input_ids` [B, L] (left-padded with 0) and `target_ids`
([B, L] next items for training, 0 = no target; [B] for evaluation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model
from torch import nn

from peftrec.adapters.base import (
    current_parameter_name,
    extra_parameter_ids,
    layer_path,
    num_layers,
)
from peftrec.dataset_tools.checkpoints import (
    CheckpointError,
    read_json,
    save_checkpoint,
    verify_checkpoint,
    weights_fingerprint,
)
from peftrec.modality_encoders import (
    EncoderMismatchError,
    ItemContent,
    build_item_encoder,
    check_item_encoder_weights,
)
from peftrec.pretraining.adrec import ADRec, ADRecConfig
from peftrec.pretraining.diffrec import DiffRec, DiffRecConfig
from peftrec.pretraining.diffurec import DiffuRec, DiffuRecConfig
from peftrec.pretraining.dimerec import DimeRec, DimeRecConfig
from peftrec.pretraining.dreamrec import DreamRec, DreamRecConfig
from peftrec.pretraining.sasrec import SASRec, SASRecConfig
from peftrec.pretraining.scoring import Scorer, history_indicator

# name -> (config dataclass, backbone class); each backbone class names its `scorer`.
BACKBONES: dict[str, tuple[type, type[nn.Module]]] = {
    "sasrec": (SASRecConfig, SASRec),
    "diffrec": (DiffRecConfig, DiffRec),
    "diffurec": (DiffuRecConfig, DiffuRec),
    "dreamrec": (DreamRecConfig, DreamRec),
    "adrec": (ADRecConfig, ADRec),
    "dimerec": (DimeRecConfig, DimeRec),
}

LOSSES = ("full", "sampled")  # softmax over the catalog, or sampled softmax
NEGATIVE_SAMPLING = ("uniform", "popularity")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ARCHITECTURE = "SequentialRecommender"


def build_backbone_config(backbone: str, settings: dict):
    """The backbone's config dataclass from recorded `settings`, naming any setting it lacks
    (a run written by a newer peftrec, or a hand-edited config.json)."""
    config_cls, _ = BACKBONES[backbone]
    unknown = sorted(set(settings) - {known.name for known in fields(config_cls)})
    if unknown:
        raise ValueError(
            f"unknown {backbone} settings {unknown}: written by a newer peftrec, or edited by "
            "hand? Upgrade peftrec or remove them"
        )
    return config_cls(**settings)


@dataclass
class RecommenderConfig:
    # A field with help text is a command-line flag (pretraining.cli).
    num_items: int
    backbone: str = field(default="sasrec", metadata={"choices": sorted(BACKBONES),
                                                      "help": "sequence backbone"})
    backbone_config: dict = field(default_factory=dict)
    # A flag of the content scripts alone, with their modality's choices (pretraining.cli).
    item_encoder: str = field(default="id", metadata={
        "help": "text / image: the content vector; text+id / image+id: plus a learned per-item "
        "ID vector (a table that starts at zero; see --fusion)"})
    item_encoder_config: dict = field(default_factory=dict)  # the encoder's own settings
    loss: str = field(default="full", metadata={
        "choices": LOSSES,
        "help": "softmax over the whole catalog, or sampled softmax with logQ correction"})
    num_negatives: int = field(default=1024, metadata={"help": "for --loss sampled"})
    negative_sampling: str = field(default="uniform", metadata={
        "choices": NEGATIVE_SAMPLING,
        "help": "for --loss sampled: uniform, or by target-item popularity"})
    dataset_fingerprint: str | None = None
    # One learned score offset for items already in the input sequence. A dot product with
    # one query vector cannot push down a whole history of scattered items, yet in some
    # domains users never re-consume (MovieLens: one rating per movie) and in others they
    # mostly do; the offset learns which from the data. Scores only: no item is removed.
    repeat_bias: bool = field(default=False, metadata={
        "help": "learn one score offset for items already in the input sequence (negative "
        "where users rarely re-consume, positive where they repeat)"})
    # A learned score offset per item: what a content model cannot give an item from its
    # text alone (how popular it is here). Per catalog, so a transfer starts it at zero.
    item_bias: bool = field(default=False, metadata={
        "help": "learn one score offset per item (zero at start; per catalog: a transfer "
        "starts it afresh)"})

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(
                f"unknown backbone {self.backbone!r}; choose one of {sorted(BACKBONES)}"
            )
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose 'full' or 'sampled'")
        if self.negative_sampling not in NEGATIVE_SAMPLING:
            raise ValueError(
                f"unknown negative sampling {self.negative_sampling!r}; "
                "choose 'uniform' or 'popularity'"
            )
        if self.loss == "sampled" and self.num_negatives < 1:
            raise ValueError(f"--num-negatives must be >= 1, got {self.num_negatives}")
        scorer = backbone_scorer(self.backbone)
        support = getattr(scorer, "item_bias", "none")
        if self.item_bias and support != "flag":
            why = "always learns one of its own" if support == "always" else "takes none"
            raise ValueError(f"--item-bias: the {self.backbone} backbone {why}; drop the flag")
        losses = scorer.losses
        if self.loss not in losses:
            raise ValueError(f"the {self.backbone} backbone trains with the "
                             f"{' or '.join(losses)} softmax only; use --loss {losses[0]}")
        self.backbone_settings()  # validates the backbone's own settings now, not mid-run

    def backbone_settings(self):
        return build_backbone_config(self.backbone, self.backbone_config)


def backbone_scorer(backbone: str) -> Scorer:
    """How the recommender trains and scores with `backbone` (its class's `scorer`)."""
    return BACKBONES[backbone][1].scorer


def inference_settings() -> tuple[str, ...]:
    """Every registered backbone's inference settings (see `set_inference`)."""
    return tuple(dict.fromkeys(
        name for backbone in BACKBONES for name in backbone_scorer(backbone).inference_settings))


INFERENCE_SETTINGS = inference_settings()  # scripts/evaluate.py's flags


class SequentialRecommender(nn.Module):
    def __init__(
        self,
        config: RecommenderConfig,
        item_frequencies: torch.Tensor | None = None,
        content: ItemContent | None = None,
    ):
        """`content`: the items' texts / images, for content item encoders (text, image)."""
        super().__init__()
        self.config = config
        backbone_config = config.backbone_settings()
        _, backbone_cls = BACKBONES[config.backbone]
        self.backbone = backbone_cls(backbone_config)
        self.item_encoder = build_item_encoder(
            config.item_encoder, config.num_items, backbone_config.hidden_size,
            config.item_encoder_config, content,
        )
        if config.loss == "sampled" and config.negative_sampling == "popularity":
            if item_frequencies is None:
                raise ValueError("popularity negative sampling needs item frequencies")
            probs = item_frequencies[1:].double()
            self.register_buffer("sampling_probs", (probs / probs.sum()).float(), persistent=False)
        else:
            self.sampling_probs = None
        self.scorer = backbone_scorer(config.backbone)
        # The scorer's per-item parameters, registered here: their names are the keys
        # checkpoints hold (`item_bias`, `output_items`).
        self.output_items = None  # a separate output table, if the scorer declares one
        scorer_parameters = self.scorer.catalog_parameters(config, backbone_config)
        for name, parameter in scorer_parameters.items():
            setattr(self, name, parameter)
        self.scorer_catalog_parameters = list(scorer_parameters)
        if self.output_items is not None:
            self.copy_items_to_output()
        if config.repeat_bias:
            self.repeat_bias = nn.Parameter(torch.zeros(()))

    def set_inference(self, **settings: int | str) -> None:
        """Score with other inference settings of the backbone (its scorer's
        `inference_settings`, e.g. DiffRec's `inference`, `num_seeds`, `inference_steps`)
        and the same weights: a trained model's trade-off of cost against quality, chosen
        at evaluation or serving time without retraining."""
        known = inference_settings()
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise ValueError(f"{unknown} are not inference settings; use {known}")
        own = self.scorer.inference_settings
        if not set(settings) <= set(own):
            owners = [backbone_cls.__name__ for _, backbone_cls in BACKBONES.values()
                      if set(settings) & set(backbone_cls.scorer.inference_settings)]
            does = f"has only {list(own)}" if own else "scores in one pass"
            raise ValueError(f"inference settings {sorted(settings)} are "
                             f"{' or '.join(owners)}'s; this model's backbone is "
                             f"{self.config.backbone}, which {does}")
        # Checked like a new config (seed limit, strided steps <= N); the weights are untouched.
        config = replace(self.config,
                         backbone_config={**self.config.backbone_config, **settings})
        self.backbone.config = config.backbone_settings()
        self.config = config

    def catalog_parameter_names(self) -> list[str]:
        """Parameters with one row per item of this catalog (an ID table, the scorer's:
        DiffRec's item bias, an untied output table): they do not transfer to another
        catalog. Named as they are now: under LoRA on the item table, its `base_layer`'s
        weight."""
        names = [f"item_encoder.{name}"
                 for name in getattr(self.item_encoder, "catalog_parameters", ())]
        names += self.scorer_catalog_parameters
        return [current_parameter_name(self, name) for name in names]

    def unfreezing_stages(self) -> list[set[str]]:
        """Progressive unfreezing (gradual unfreezing, top down, as in ULMFiT and SRT): the
        parameter names of each stage after the first, which `--unfreeze-every N` keeps
        frozen until epoch k * N for stage k: the backbone layers below the top one, one a
        stage from the top down, then the pretrained embeddings (every `nn.Embedding`,
        positions included, that is no per-item table of this catalog). The first stage,
        trained from the start, is everything else: the top layer, the final norm, the item
        encoder's head and the per-item tables."""
        named = dict(self.named_parameters())
        layers = [f"backbone.{layer_path(self.backbone, i)}."
                  for i in reversed(range(num_layers(self.backbone) - 1))]
        stages = [{name for name in named if name.startswith(prefix)} for prefix in layers]
        embeddings = extra_parameter_ids(self, ("embeddings",))
        catalog = set(self.catalog_parameter_names())
        stages.append({name for name, p in named.items()
                       if id(p) in embeddings and name not in catalog})
        return stages

    @torch.no_grad()
    def copy_items_to_output(self) -> None:
        """Set the scorer's output table (`output_items`) to the item encoder's vectors."""
        self.output_items.copy_(self.item_encoder.catalog())

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Contextual states [B, L, d] for left-padded item sequences [B, L]."""
        return self.backbone(self.item_encoder(input_ids), input_ids > 0)

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.scorer.loss(self, batch)

    def repeat_offsets(self, input_ids: torch.Tensor, num_columns: int,
                       local_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """[B, L, num_columns]: the repeat bias where a column's item is among the inputs up
        to that position (None without --repeat-bias). `local_ids` [B, L] numbers the inputs
        by catalog row when the catalog is a local one."""
        if not self.config.repeat_bias:
            return None
        seen = history_indicator(input_ids if local_ids is None else local_ids, num_columns,
                                 causal=True)
        return self.repeat_bias * seen

    def query(self, batch: dict[str, torch.Tensor]) -> Any:
        """What the next item is scored against (the scorer's: the state at the last position
        [B, d] for SASRec, a `DiffusionQuery` for DiffRec)."""
        return self.scorer.query(self, batch)

    def score_items(self, query: Any, item_ids: torch.Tensor) -> torch.Tensor:
        """Scores [B, C] of shared candidates `item_ids` [C] (see the scorer's)."""
        return self.scorer.score_items(self, query, item_ids)

    def scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scores of every item [B, num_items + 1] (column 0 = padding)."""
        items = torch.arange(self.config.num_items + 1, device=batch["input_ids"].device)
        return self.score_items(self.query(batch), items)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # DDP only syncs gradients of what runs through forward().
        return self.loss(batch)

    def save_pretrained(
        self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Write `config.json` + `model.safetensors` atomically (old checkpoint kept on failure).

        `state_dict` comes from `accelerator.get_state_dict(model)` when the parameters are
        sharded (FSDP/DeepSpeed); by default it is this module's own.
        """
        meta = {"architecture": ARCHITECTURE, "config": asdict(self.config)}
        save_checkpoint(directory, WEIGHTS_NAME, self.state_dict() if state_dict is None
                        else state_dict, {CONFIG_NAME: meta})

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        item_frequencies: torch.Tensor | None = None,
        content: ItemContent | None = None,
        item_encoder_overrides: dict | None = None,
    ) -> SequentialRecommender:
        """Load a checkpoint; content encoders need the items' `content`.

        `item_encoder_overrides` replaces recorded encoder settings (e.g. the encoder's
        folder after a move); the recorded fingerprint and hidden size are still checked.
        """
        config = load_recommender_config(directory)
        if item_encoder_overrides:
            config.item_encoder_config = {**config.item_encoder_config, **item_encoder_overrides}
        try:
            model = cls(config, item_frequencies, content)
        except EncoderMismatchError as error:
            raise CheckpointError(f"{directory}: {error}") from None
        try:
            weights = str(Path(directory) / WEIGHTS_NAME)
            missing, unexpected = load_model(model, weights, strict=False)
        except RuntimeError as error:  # shape mismatches
            raise CheckpointError(
                f"{directory}: weights do not fit the configured model ({first_line(error)})"
            ) from None
        if missing or unexpected:
            raise CheckpointError(
                f"{directory}: weights do not match the model (missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]}); was it written by another model?"
            )
        return model


def load_recommender_config(directory: str | Path) -> RecommenderConfig:
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
        raise CheckpointError(
            f"{directory} is not a peftrec checkpoint (needs {CONFIG_NAME} and {WEIGHTS_NAME}); "
            "pass the run folder written by a pretraining script"
        )
    verify_checkpoint(directory)  # every load of a checkpoint reads its config first
    meta = read_json(directory / CONFIG_NAME)
    if meta.get("architecture") != ARCHITECTURE:
        raise CheckpointError(
            f"{directory} holds a {meta.get('architecture')!r} checkpoint, not a {ARCHITECTURE}"
        )
    try:
        config = RecommenderConfig(**meta["config"])
        problem = check_item_encoder_weights(
            config.item_encoder, config.item_encoder_config,
            config.backbone_settings().hidden_size, _item_encoder_shapes(directory))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{directory / CONFIG_NAME}: unexpected settings ({error})") from None
    if problem:
        raise CheckpointError(f"{directory}: {problem}")
    return config


def _item_encoder_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Names (under the item encoder) and shapes of a checkpoint's item-encoder tensors,
    read from the file's header; empty if it cannot be read (loading it reports why)."""
    from safetensors import safe_open

    prefix = "item_encoder."
    try:
        with safe_open(str(directory / WEIGHTS_NAME), "pt") as tensors:
            names = tensors.keys()  # a safe_open handle is not iterable itself
            return {name.removeprefix(prefix): tuple(tensors.get_slice(name).get_shape())
                    for name in names if name.startswith(prefix)}
    except Exception:  # noqa: BLE001 - a corrupt file is reported where it is loaded
        return {}


def checkpoint_fingerprint(directory: str | Path) -> str:
    """SHA-256 of a recommender checkpoint's weights file (see dataset_tools.checkpoints)."""
    return weights_fingerprint(directory, WEIGHTS_NAME)


def first_line(error: Exception) -> str:
    """The first line of an error's message (PyTorch's load errors run to many)."""
    return str(error).strip().splitlines()[0]
