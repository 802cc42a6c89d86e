"""How a recommender trains and scores with its backbone: the `Scorer` contract, and the
dot-product scorer of encoder backbones (SASRec).

`SequentialRecommender` composes item encoder + backbone + scorer; the scorer is the
backbone's (its class attribute `scorer`), so the recommender holds no branch on the
backbone. A scorer keeps no state: every call gets the recommender (`model`), whose
item encoder, backbone, repeat bias and settings it reads. The per-item parameters it
needs (a bias, an output table) it declares in `catalog_parameters`; the recommender
registers them under those names, which are the checkpoints' key names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from peftrec.pretraining.losses import full_softmax_loss, sampled_softmax_loss

if TYPE_CHECKING:  # the type only: the recommender imports the backbones, which import this
    from peftrec.pretraining.recommender import RecommenderConfig, SequentialRecommender


class Scorer(Protocol):
    """What a backbone's scorer answers for the recommender (see docs/architecture.md)."""

    losses: tuple[str, ...]  # the --loss values it trains with (recommender.LOSSES)
    inference_settings: tuple[str, ...]  # backbone settings `set_inference` may change
    # A learned score offset per item (`model.item_bias`, declared in `catalog_parameters`):
    # "flag" when the scorer declares one with --item-bias, "always" when it always does; a
    # scorer without the attribute takes none.
    item_bias: str

    def catalog_parameters(self, config: RecommenderConfig,
                           backbone_config: Any) -> dict[str, nn.Parameter]:
        """New per-item parameters ([config.num_items + 1, ...], row 0 = padding) by name;
        one named `output_items` is an output table kept equal to the item vectors at
        start."""

    def loss(self, model: SequentialRecommender,
             batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{"loss": total, ...}: the training loss, plus any named parts to log."""

    def query(self, model: SequentialRecommender, batch: dict[str, torch.Tensor]) -> Any:
        """What candidates are scored against, once per batch: a [B, ...] object with
        `len()` and `.device` (a tensor, or a dataclass such as `HistoryQuery`)."""

    def score_items(self, model: SequentialRecommender, query: Any,
                    item_ids: torch.Tensor) -> torch.Tensor:
        """Scores [B, C] of shared candidates `item_ids` [C]; memory follows C, not the
        catalog (the evaluator walks the catalog in chunks)."""


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
        input_ids = inputs_so_far(input_ids)
    seen = input_ids.new_zeros((*input_ids.shape[:-1], num_columns), dtype=torch.bool)
    return seen.scatter_(-1, input_ids, True)


def inputs_so_far(input_ids: torch.Tensor) -> torch.Tensor:
    """[B, L(t), L(s)]: the inputs [B, L] up to each position t (s <= t), 0 after it."""
    length = input_ids.shape[-1]
    upto = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
    return torch.where(upto, input_ids[..., None, :], 0)


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


# On CPU, `DotProductScorer.query` encodes at most this many positions (users x padded
# length) at once: at feed-forward width 256 the widest activation is then 16 MB, below
# glibc's 32 MB mmap threshold. A larger tensor is a fresh mapping, page-faulted in by
# the kernel each time it is made: ML-1M's evaluation forward (200 positions) took 1.6x
# its FLOP bound at 256 users a batch against 1.4x at 64 (benchmarks/roofline.py), and
# the same at both with glibc's threshold raised. An accelerator takes the whole batch.
CPU_QUERY_POSITIONS = 2**14


class DotProductScorer:
    """Scores = the state at the last position . the item vectors (+ the repeat bias);
    trained with the full or sampled softmax on every position's next item. For backbones
    that map item vectors [B, L, d] to states [B, L, d] (`model.encode`)."""

    losses = ("full", "sampled")
    inference_settings = ()
    item_bias = "flag"

    def catalog_parameters(self, config: RecommenderConfig,
                           backbone_config: Any) -> dict[str, nn.Parameter]:
        if not config.item_bias:
            return {}
        return {"item_bias": nn.Parameter(torch.zeros(config.num_items + 1))}

    @staticmethod
    def item_offsets(model: SequentialRecommender) -> torch.Tensor | None:
        """The per-item score offsets [N + 1] (--item-bias), or None."""
        return model.item_bias if model.config.item_bias else None

    def loss(self, model: SequentialRecommender,
             batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if model.config.loss == "sampled" or (
            model.training and getattr(model.item_encoder, "encodes_on_demand", False)
        ):
            return self.loss_on_needed_items(model, batch)
        input_ids, targets = batch["input_ids"], batch["target_ids"]
        states = model.encode(input_ids)
        catalog = model.item_encoder.catalog()
        # The repeat bias goes to the loss as the items seen so far, [B, L, L], not as
        # [B, L, N + 1] offsets.
        seen_ids = inputs_so_far(input_ids) if model.config.repeat_bias else None
        if states.device.type == "cpu":
            # Skip padding positions: their logits cost as much as real ones. (On an
            # accelerator this boolean selection would wait for the device every step, so
            # there the loss ignores padding targets instead.)
            has_target = targets > 0
            states, targets = states[has_target], targets[has_target]
            seen_ids = None if seen_ids is None else seen_ids[has_target]
        loss = full_softmax_loss(states, catalog, targets, self.item_offsets(model), seen_ids,
                                 model.repeat_bias if seen_ids is not None else None)
        return {"loss": loss}

    def loss_on_needed_items(self, model: SequentialRecommender,
                             batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
        config, sampling_probs = model.config, model.sampling_probs
        num_items, device = config.num_items, input_ids.device
        if config.loss == "full":
            negatives = torch.arange(1, num_items + 1, device=device)
        elif sampling_probs is None:
            negatives = torch.randint(1, num_items + 1, (config.num_negatives,), device=device)
        else:
            negatives = torch.multinomial(sampling_probs, config.num_negatives,
                                          replacement=True) + 1
        needed = torch.cat([input_ids.new_zeros(1), input_ids.flatten(), targets[has_target],
                            negatives])
        items, local = torch.unique(needed, return_inverse=True)  # items[0] = 0 (padding)
        catalog = model.item_encoder.encode_items(items)
        sizes = [1, input_ids.numel(), int(has_target.sum()), len(negatives)]
        _, local_inputs, local_targets, local_negatives = local.split(sizes)
        local_inputs = local_inputs.view_as(input_ids)
        states = model.backbone(catalog[local_inputs], input_ids > 0)[has_target]
        offsets = model.repeat_offsets(input_ids, len(items), local_inputs)
        offsets = None if offsets is None else offsets[has_target]
        item_bias = self.item_offsets(model)
        if item_bias is not None:  # in the local catalog's numbering
            offsets = item_bias[items] if offsets is None else offsets + item_bias[items]
        if sampling_probs is None or config.loss == "full":
            probs = catalog.new_full((len(items) - 1,), 1.0 / num_items)
        else:
            probs = sampling_probs[items[1:] - 1]
        loss = sampled_softmax_loss(states, catalog, local_targets, len(negatives), probs,
                                    negatives=local_negatives, item_offsets=offsets)
        return {"loss": loss}

    def query(self, model: SequentialRecommender,
              batch: dict[str, torch.Tensor]) -> torch.Tensor | HistoryQuery:
        """The state at the last position [B, d]; with --repeat-bias, a `HistoryQuery` that
        also knows the inputs' items."""
        input_ids = batch["input_ids"]
        rows = len(input_ids)
        if input_ids.device.type == "cpu":
            rows = max(1, CPU_QUERY_POSITIONS // input_ids.shape[1])
        state = torch.cat([model.encode(part)[:, -1] for part in input_ids.split(rows)])
        return HistoryQuery(state, input_ids) if model.config.repeat_bias else state

    def score_items(self, model: SequentialRecommender, query: torch.Tensor | HistoryQuery,
                    item_ids: torch.Tensor) -> torch.Tensor:
        candidates = self.candidate_vectors(model, item_ids)
        if isinstance(query, HistoryQuery):
            scores = (query.state @ candidates.T
                      + model.repeat_bias * seen_items(query.input_ids, item_ids))
        else:
            scores = query @ candidates.T
        item_bias = self.item_offsets(model)
        return scores if item_bias is None else scores + item_bias[item_ids]

    def candidate_vectors(self, model: SequentialRecommender,
                          item_ids: torch.Tensor) -> torch.Tensor:
        """The vectors [C, d] of the candidates `item_ids` [C] that the query is scored
        against: the item encoder's (a subclass may map them, e.g. onto the unit sphere)."""
        return model.item_encoder.catalog()[item_ids]
