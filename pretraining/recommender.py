"""A sequential recommender = item encoder + sequence backbone + dot-product scorer.

The model contract used by the Trainer and the evaluator:
- `loss(batch) -> {"loss": tensor, ...}` (several named losses may be returned; a loss
  of several terms also returns them, undetached, as `"terms"`: {name: tensor}, which sum
  to "loss", for `--pcgrad`),
- `query(batch)` once per batch, then `score_items(query, item_ids)` for any block
  of candidates (the evaluator walks the catalog in chunks, so memory is bounded by
  the chunk, not the catalog); `scores(batch)` = all items at once, column 0 being
  padding, which is never ranked.
Generative backbones (DiffRec) define `training_losses` and `sample_predictions`; the
recommender then trains them with their own losses plus the cross-entropy of
softmax(h0_hat @ catalog^T + b) over the catalog (one learned bias per item,
`item_bias`, owned by the recommender), and scores candidates by the seed-averaged
softmax probability (see `score_items`).
Batches are dicts of `input_ids` [B, L] (left-padded with 0) and `target_ids`
([B, L] next items for training, 0 = no target; [B] for evaluation).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from safetensors.torch import load_model, save_file
from torch import nn

from adapters.base import current_parameter_name, extra_parameter_ids, layer_path, num_layers
from dataset_tools import atomic_directory
from modality_encoders import (
    EncoderMismatchError,
    ItemContent,
    build_item_encoder,
    check_item_encoder_weights,
)
from pretraining.diffrec import DiffRec, DiffRecConfig, DiffusionQuery
from pretraining.diffurec import DiffuRec, DiffuRecConfig
from pretraining.losses import full_softmax_loss, sampled_softmax_loss
from pretraining.sasrec import SASRec, SASRecConfig

BACKBONES: dict[str, tuple[type, type[nn.Module]]] = {
    "sasrec": (SASRecConfig, SASRec),
    "diffrec": (DiffRecConfig, DiffRec),
    "diffurec": (DiffuRecConfig, DiffuRec),
}

LOSSES = ("full", "sampled")  # softmax over the catalog, or sampled softmax
NEGATIVE_SAMPLING = ("uniform", "popularity")
GENERATIVE_NORMALIZER_ELEMENTS = 1 << 24  # logits held at once when normalising over items
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
class HistoryQuery:
    """What a scorer with a repeat bias scores candidates against: the last state [B, d]
    and the inputs [B, L], whose items get the bias (looked up per batch of candidates by
    `seen_items`, so memory follows the candidates, not the catalog)."""

    state: torch.Tensor
    input_ids: torch.Tensor

    def __len__(self) -> int:
        return len(self.state)

    @property
    def device(self) -> torch.device:
        return self.state.device


def history_indicator(input_ids: torch.Tensor, num_columns: int, causal: bool) -> torch.Tensor:
    """Which items each row has seen: [B, num_columns], or [B, L, num_columns] up to each
    position when `causal` (bool). Items index the columns; padding (0) marks column 0,
    which is never a candidate."""
    if causal:
        length = input_ids.shape[-1]
        upto = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
        input_ids = torch.where(upto, input_ids[..., None, :], 0)  # [B, L(t), L(s)]: s <= t
    seen = input_ids.new_zeros((*input_ids.shape[:-1], num_columns), dtype=torch.bool)
    return seen.scatter_(-1, input_ids, True)


def seen_items(input_ids: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
    """Whether each row's inputs [B, L] hold each candidate of `item_ids` [C] (repeats
    allowed): [B, C], the columns `item_ids` of `history_indicator(input_ids, N + 1, False)`
    (padding marks item 0 alike) without building its [B, N + 1] table."""
    candidates, columns = torch.unique(item_ids, return_inverse=True)  # sorted
    position = torch.searchsorted(candidates, input_ids).clamp_max(len(candidates) - 1)
    found = candidates[position] == input_ids
    # Inputs that are no candidate all mark one spare column, left out at the end.
    seen = input_ids.new_zeros((len(input_ids), len(candidates) + 1), dtype=torch.bool)
    seen.scatter_(1, torch.where(found, position, len(candidates)), True)
    return seen[:, columns]


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed, or does not fit the model or data."""


@dataclass
class RecommenderConfig:
    # A field with help text is a command-line flag (pretraining.cli).
    num_items: int
    backbone: str = field(default="sasrec", metadata={"choices": sorted(BACKBONES),
                                                      "help": "sequence backbone"})
    backbone_config: dict = field(default_factory=dict)
    item_encoder: str = "id"
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
        if self.is_generative and self.loss != "full":
            raise ValueError(f"the {self.backbone} backbone trains with the full softmax only; "
                             "use --loss full")
        self.backbone_settings()  # validates the backbone's own settings now, not mid-run

    @property
    def is_generative(self) -> bool:
        return hasattr(BACKBONES[self.backbone][1], "training_losses")

    def backbone_settings(self):
        return build_backbone_config(self.backbone, self.backbone_config)


INFERENCE_SETTINGS = ("inference", "num_seeds", "inference_steps")  # DiffRec's, see set_inference


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
        if config.is_generative:
            self.item_bias = nn.Parameter(torch.zeros(config.num_items + 1))
        self.output_items = None
        if getattr(backbone_config, "untied_output", False):
            self.output_items = nn.Parameter(torch.empty(config.num_items + 1,
                                                         backbone_config.hidden_size))
            self.copy_items_to_output()
        if config.repeat_bias:
            self.repeat_bias = nn.Parameter(torch.zeros(()))

    def set_inference(self, **settings: int | str) -> None:
        """Score with other DiffRec inference settings (`inference`, `num_seeds`,
        `inference_steps`) and the same weights: a trained model's trade-off of cost
        against quality, chosen at evaluation or serving time without retraining."""
        unknown = sorted(set(settings) - set(INFERENCE_SETTINGS))
        if unknown:
            raise ValueError(f"{unknown} are not inference settings; use {INFERENCE_SETTINGS}")
        if self.config.backbone != "diffrec":
            raise ValueError(f"inference settings {sorted(settings)} are DiffRec's; this model's "
                             f"backbone is {self.config.backbone}, which scores in one pass")
        # Checked like a new config (seed limit, strided steps <= N); the weights are untouched.
        config = replace(self.config,
                         backbone_config={**self.config.backbone_config, **settings})
        self.backbone.config = config.backbone_settings()
        self.config = config

    def catalog_parameter_names(self) -> list[str]:
        """Parameters with one row per item of this catalog (an ID table, the generative
        item bias, an untied output table): they do not transfer to another catalog. Named
        as they are now: under LoRA on the item table, its `base_layer`'s weight."""
        names = [f"item_encoder.{name}"
                 for name in getattr(self.item_encoder, "catalog_parameters", ())]
        names += ["item_bias"] if self.config.is_generative else []
        names += ["output_items"] if self.output_items is not None else []
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
        """Set the untied output table (`untied_output`) to the item encoder's vectors."""
        self.output_items.copy_(self.item_encoder.catalog())

    def output_catalog(self, catalog: torch.Tensor | None = None) -> torch.Tensor:
        """The item vectors a generative softmax scores against: the item encoder's
        (`catalog` when already computed), or the separate output table with
        `untied_output`, which needs no item catalog at all."""
        if self.output_items is not None:
            return self.output_items
        return self.item_encoder.catalog() if catalog is None else catalog

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Contextual states [B, L, d] for left-padded item sequences [B, L]."""
        return self.backbone(self.item_encoder(input_ids), input_ids > 0)

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.config.is_generative:
            return self._generative_loss(batch)
        if self.config.loss == "sampled" or (
            self.training and getattr(self.item_encoder, "encodes_on_demand", False)
        ):
            return self._loss_on_needed_items(batch)
        input_ids, targets = batch["input_ids"], batch["target_ids"]
        states = self.encode(input_ids)
        catalog = self.item_encoder.catalog()
        offsets = self._repeat_offsets(input_ids, len(catalog))
        if states.device.type == "cpu":
            # Skip padding positions: their logits cost as much as real ones. (On an
            # accelerator this boolean selection would wait for the device every step, so
            # there the loss ignores padding targets instead.)
            has_target = targets > 0
            states, targets = states[has_target], targets[has_target]
            offsets = None if offsets is None else offsets[has_target]
        return {"loss": full_softmax_loss(states, catalog, targets, offsets)}

    def _repeat_offsets(self, input_ids: torch.Tensor, num_columns: int,
                        local_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """[B, L, num_columns]: the repeat bias where a column's item is among the inputs up
        to that position (None without --repeat-bias). `local_ids` [B, L] numbers the inputs
        by catalog row when the catalog is a local one."""
        if not self.config.repeat_bias:
            return None
        seen = history_indicator(input_ids if local_ids is None else local_ids, num_columns,
                                 causal=True)
        return self.repeat_bias * seen

    def _loss_on_needed_items(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The loss on the batch's items only: sampled softmax, or a trained item encoder.

        The items of the inputs, the targets and the negatives (all items for the full
        loss, else sampled ones) are encoded once, in one call, into a small local catalog
        (row 0 = padding): one gradient buffer for the item table, so training memory does
        not grow with the catalog. The sampled softmax then runs on it with each negative's
        logQ taken from the global sampling distribution (uniform over all items = full
        softmax).
        """
        input_ids, targets = batch["input_ids"], batch["target_ids"]
        has_target = targets > 0
        num_items, device = self.config.num_items, input_ids.device
        if self.config.loss == "full":
            negatives = torch.arange(1, num_items + 1, device=device)
        elif self.sampling_probs is None:
            negatives = torch.randint(1, num_items + 1, (self.config.num_negatives,),
                                      device=device)
        else:
            negatives = torch.multinomial(self.sampling_probs, self.config.num_negatives,
                                          replacement=True) + 1
        needed = torch.cat([input_ids.new_zeros(1), input_ids.flatten(), targets[has_target],
                            negatives])
        items, local = torch.unique(needed, return_inverse=True)  # items[0] = 0 (padding)
        catalog = self.item_encoder.encode_items(items)
        sizes = [1, input_ids.numel(), int(has_target.sum()), len(negatives)]
        _, local_inputs, local_targets, local_negatives = local.split(sizes)
        local_inputs = local_inputs.view_as(input_ids)
        states = self.backbone(catalog[local_inputs], input_ids > 0)[has_target]
        offsets = self._repeat_offsets(input_ids, len(items), local_inputs)
        offsets = None if offsets is None else offsets[has_target]
        if self.sampling_probs is None or self.config.loss == "full":
            probs = catalog.new_full((len(items) - 1,), 1.0 / num_items)
        else:
            probs = self.sampling_probs[items[1:] - 1]
        loss = sampled_softmax_loss(states, catalog, local_targets, len(negatives), probs,
                                    negatives=local_negatives, item_offsets=offsets)
        return {"loss": loss}

    def _generative_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The backbone's losses plus the cross-entropy of softmax(h0_hat @ catalog^T + b)
        over the catalog (Eq. 8, 13), on each window's last target, or on every position's
        with `every_position`. The total is `mse_weight` * MSE + CE.
        """
        input_ids, targets = batch["input_ids"], batch["target_ids"]
        catalog, backbone = self.item_encoder.catalog(), self.backbone
        if getattr(backbone.config, "every_position", False):  # a DiffRec setting
            repeat = self._repeat_offsets(input_ids, len(catalog))  # [B, L, N + 1] or None
            losses = backbone.every_position_losses(catalog[input_ids], input_ids > 0,
                                                    catalog[targets], targets > 0)
            has_target = losses["has_target"]
            kept = has_target.shape[1]  # the positions the backbone kept, from the right
            predicted, targets = losses["predicted"][has_target], targets[:, -kept:][has_target]
            repeat = None if repeat is None else repeat[:, -kept:][has_target]
        else:
            has_target = targets[:, -1] > 0  # every training window ends with a target
            input_ids, targets = input_ids[has_target], targets[has_target, -1]
            losses = backbone.training_losses(catalog[input_ids], input_ids > 0,
                                              catalog[targets])
            predicted, repeat = losses["predicted"], None
            if self.config.repeat_bias:
                repeat = self.repeat_bias * history_indicator(input_ids, len(catalog), False)
        offsets = self.item_bias if repeat is None else self.item_bias + repeat
        ce = full_softmax_loss(backbone.scoring_vectors(predicted), self.output_catalog(catalog),
                               targets, offsets)
        terms, logged = {"ce": ce}, {"ce": ce.detach()}
        if "mse" in losses:  # DiffRec's; DiffuRec trains on the cross-entropy alone
            terms["mse"] = backbone.config.mse_weight * losses["mse"]
            logged["mse"] = losses["mse"].detach()
        return {"loss": sum(terms.values()), **logged, "terms": terms}

    def query(
        self, batch: dict[str, torch.Tensor]
    ) -> torch.Tensor | HistoryQuery | DiffusionQuery:
        """What the next item is scored against: the state at the last position [B, d]
        (with --repeat-bias, a `HistoryQuery` that also knows the inputs' items); for a
        generative backbone, a `DiffusionQuery` (each seed's predicted h^0 and its
        log-normaliser over the whole catalog)."""
        input_ids = batch["input_ids"]
        if self.config.is_generative:
            return self._generative_query(input_ids)
        state = self.encode(input_ids)[:, -1]
        return HistoryQuery(state, input_ids) if self.config.repeat_bias else state

    def _generative_query(self, input_ids: torch.Tensor) -> DiffusionQuery:
        catalog = self.item_encoder.catalog()
        predicted = self.backbone.sample_predictions(catalog[input_ids], input_ids > 0)
        catalog = self.output_catalog(catalog)  # what the softmax scores against
        predicted = self.backbone.scoring_vectors(predicted)
        history = input_ids if self.config.repeat_bias else None
        rows = predicted.shape[0] * predicted.shape[1]
        chunk = max(1, GENERATIVE_NORMALIZER_ELEMENTS // max(rows, 1))
        log_normalizer = torch.full(predicted.shape[:2], float("-inf"), device=predicted.device)
        for start in range(1, self.config.num_items + 1, chunk):
            items = torch.arange(start, min(start + chunk, self.config.num_items + 1),
                                 device=predicted.device)
            logits = self._generative_logits(predicted, history, catalog, items)
            log_normalizer = torch.logaddexp(log_normalizer, logits.logsumexp(-1))
        return DiffusionQuery(predicted, log_normalizer, history)

    def _generative_logits(self, predicted: torch.Tensor, history: torch.Tensor | None,
                           catalog: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
        """Each seed's logits [B, S, C] (float32) of the candidates `item_ids` [C], from
        the seeds' predictions [B, S, d] and, with a repeat bias, the rows' inputs
        `history` [B, L]."""
        logits = predicted @ catalog[item_ids].T + self.item_bias[item_ids]
        if history is not None:
            logits = logits + self.repeat_bias * seen_items(history, item_ids)[:, None]
        return logits.float()

    def score_items(self, query, item_ids: torch.Tensor) -> torch.Tensor:
        """Scores [B, C] of shared candidates `item_ids` [C].

        For a generative backbone: log of the mean over seeds of each seed's softmax
        probability over the whole catalog, log((1/S) sum_s p_s(item)) -- the ranking of
        the seed-averaged probability (Algorithm 3) without underflow to 0.
        """
        if isinstance(query, DiffusionQuery):
            logits = self._generative_logits(query.predicted, query.input_ids,
                                             self.output_catalog(), item_ids)
            log_probs = logits - query.log_normalizer[..., None]  # [B, S, C]
            return log_probs.logsumexp(1) - math.log(log_probs.shape[1])
        catalog = self.item_encoder.catalog()
        if isinstance(query, HistoryQuery):
            return (query.state @ catalog[item_ids].T
                    + self.repeat_bias * seen_items(query.input_ids, item_ids))
        return query @ catalog[item_ids].T

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
        state_dict = self.state_dict() if state_dict is None else state_dict
        with atomic_directory(directory) as tmp:
            meta = {"architecture": ARCHITECTURE, "config": asdict(self.config)}
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
            tensors = {name: tensor.detach().contiguous() for name, tensor in state_dict.items()}
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})

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
    try:
        meta = json.loads((directory / CONFIG_NAME).read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{directory / CONFIG_NAME} is not valid JSON: {error}") from None
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
    """SHA-256 of the weights file: identifies a base model for adapters and resumes."""
    digest = hashlib.sha256()
    with open(Path(directory) / WEIGHTS_NAME, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def first_line(error: Exception) -> str:
    """The first line of an error's message (PyTorch's load errors run to many)."""
    return str(error).strip().splitlines()[0]
