"""The scorer of diffusion backbones that predict the target item's vector h^0 (DiffRec,
DiffuRec).

Training: the backbone's own loss (DiffRec's diffusion MSE; DiffuRec has none) plus the
cross-entropy of softmax(h0_hat @ catalog^T + b) over the catalog (Eq. 8, 13), with one
learned bias per item (`item_bias`) and, with DiffRec's `untied_output`, a separate output
table (`output_items`, the paper's W). The total is `mse_weight` * MSE + CE.
Scoring: each of the backbone's seeded samples of h^0 gives a softmax over the whole
catalog; a candidate's score is the log of its seed-averaged probability (Algorithm 3).

A backbone served by this scorer provides what `DiffusionBackbone` lists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from peftrec.pretraining.losses import full_softmax_loss
from peftrec.pretraining.scoring import inputs_so_far, seen_items

if TYPE_CHECKING:  # the type only: the recommender imports the backbones, which import this
    from peftrec.pretraining.recommender import RecommenderConfig, SequentialRecommender

NORMALIZER_ELEMENTS = 1 << 24  # logits held at once when normalising over items


class DiffusionBackbone(Protocol):
    """What `DiffusionScorer` calls on its backbone (DiffRec's methods document the shapes).

    `training_losses` returns {"predicted": h^0 [B, d]} and, where the backbone has one, its
    "mse" (weighted by `config.mse_weight`). `config` has `hidden_size`, and may have
    DiffRec's `untied_output` and `every_position` (then `every_position_losses` is called
    instead); a config without them means False.
    """

    config: Any

    def training_losses(self, item_vectors, padding_mask, target_vectors) -> dict: ...

    def sample_predictions(self, item_vectors, padding_mask) -> torch.Tensor: ...

    def scoring_vectors(self, predicted: torch.Tensor) -> torch.Tensor: ...


@dataclass
class DiffusionQuery:
    """What a diffusion backbone's candidates are scored against.

    `predicted` [B, S, d]: each seed's predicted h^0, as scored (`scoring_vectors`);
    `log_normalizer` [B, S]: each seed's logsumexp of the logits over the whole catalog
    (items 1..N); `input_ids` [B, L]: the rows' inputs, whose items get the repeat bias
    (None without one).
    """

    predicted: torch.Tensor
    log_normalizer: torch.Tensor
    input_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.predicted)

    @property
    def device(self) -> torch.device:
        return self.predicted.device


class DiffusionScorer:
    """See the module doc; `model.backbone` is a `DiffusionBackbone`, whose config fields
    `inference_settings` may change after training (`set_inference`)."""

    losses = ("full",)
    item_bias = "always"

    def __init__(self, inference_settings: tuple[str, ...] = ()) -> None:
        self.inference_settings = inference_settings

    def catalog_parameters(self, config: RecommenderConfig,
                           backbone_config: Any) -> dict[str, nn.Parameter]:
        num_items = config.num_items
        parameters = {"item_bias": nn.Parameter(torch.zeros(num_items + 1))}
        # A separate output table (DiffRec's setting), set to the item vectors by the recommender.
        if getattr(backbone_config, "untied_output", False):
            parameters["output_items"] = nn.Parameter(
                torch.empty(num_items + 1, backbone_config.hidden_size))
        return parameters

    def output_catalog(self, model: SequentialRecommender,
                       catalog: torch.Tensor | None = None) -> torch.Tensor:
        """The item vectors the softmax scores against: the item encoder's (`catalog` when
        already computed), or the separate output table with `untied_output`, which needs
        no item catalog at all."""
        if model.output_items is not None:
            return model.output_items
        return model.item_encoder.catalog() if catalog is None else catalog

    def loss(self, model: SequentialRecommender,
             batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The backbone's losses plus the cross-entropy of softmax(h0_hat @ catalog^T + b)
        over the catalog (Eq. 8, 13), on each window's last target, or on every position's
        with `every_position`. The total is `mse_weight` * MSE + CE; both terms are also
        returned undetached as "terms" (for `--pcgrad`).
        """
        input_ids, targets = batch["input_ids"], batch["target_ids"]
        backbone: DiffusionBackbone = model.backbone
        catalog = model.item_encoder.catalog()
        # The repeat bias goes to the loss as the items each position has seen, [P, L], not
        # as [P, N + 1] offsets (and their gradient, as large).
        repeat_bias = model.config.repeat_bias
        if getattr(backbone.config, "every_position", False):
            seen_ids = inputs_so_far(input_ids) if repeat_bias else None  # [B, L, L]
            losses = backbone.every_position_losses(catalog[input_ids], input_ids > 0,
                                                    catalog[targets], targets > 0)
            has_target = losses["has_target"]
            kept = has_target.shape[1]  # the positions the backbone kept, from the right
            predicted, targets = losses["predicted"][has_target], targets[:, -kept:][has_target]
            seen_ids = None if seen_ids is None else seen_ids[:, -kept:][has_target]
        else:
            has_target = targets[:, -1] > 0  # every training window ends with a target
            input_ids, targets = input_ids[has_target], targets[has_target, -1]
            losses = backbone.training_losses(catalog[input_ids], input_ids > 0,
                                              catalog[targets])
            predicted, seen_ids = losses["predicted"], input_ids if repeat_bias else None
        ce = full_softmax_loss(backbone.scoring_vectors(predicted),
                               self.output_catalog(model, catalog), targets, model.item_bias,
                               seen_ids, model.repeat_bias if repeat_bias else None)
        terms, logged = {"ce": ce}, {"ce": ce.detach()}
        if "mse" in losses:  # DiffRec's; DiffuRec trains on the cross-entropy alone
            terms["mse"] = backbone.config.mse_weight * losses["mse"]
            logged["mse"] = losses["mse"].detach()
        return {"loss": sum(terms.values()), **logged, "terms": terms}

    def query(self, model: SequentialRecommender,
              batch: dict[str, torch.Tensor]) -> DiffusionQuery:
        """Each seed's predicted h^0 and its log-normaliser over the whole catalog."""
        input_ids = batch["input_ids"]
        backbone: DiffusionBackbone = model.backbone
        catalog = model.item_encoder.catalog()
        predicted = backbone.sample_predictions(catalog[input_ids], input_ids > 0)
        catalog = self.output_catalog(model, catalog)  # what the softmax scores against
        predicted = backbone.scoring_vectors(predicted)
        history = input_ids if model.config.repeat_bias else None
        rows = predicted.shape[0] * predicted.shape[1]
        chunk = max(1, NORMALIZER_ELEMENTS // max(rows, 1))
        num_items = model.config.num_items
        log_normalizer = torch.full(predicted.shape[:2], float("-inf"), device=predicted.device)
        for start in range(1, num_items + 1, chunk):
            items = torch.arange(start, min(start + chunk, num_items + 1),
                                 device=predicted.device)
            logits = self.logits(model, predicted, history, catalog, items)
            log_normalizer = torch.logaddexp(log_normalizer, logits.logsumexp(-1))
        return DiffusionQuery(predicted, log_normalizer, history)

    def logits(self, model: SequentialRecommender, predicted: torch.Tensor,
               history: torch.Tensor | None, catalog: torch.Tensor,
               item_ids: torch.Tensor) -> torch.Tensor:
        """Each seed's logits [B, S, C] (float32) of the candidates `item_ids` [C], from
        the seeds' predictions [B, S, d] and, with a repeat bias, the rows' inputs
        `history` [B, L]."""
        logits = predicted @ catalog[item_ids].T + model.item_bias[item_ids]
        if history is not None:
            logits = logits + model.repeat_bias * seen_items(history, item_ids)[:, None]
        return logits.float()

    def score_items(self, model: SequentialRecommender, query: DiffusionQuery,
                    item_ids: torch.Tensor) -> torch.Tensor:
        """Log of the mean over seeds of each seed's softmax probability over the whole
        catalog, log((1/S) sum_s p_s(item)): the ranking of the seed-averaged probability
        (Algorithm 3) without underflow to 0."""
        logits = self.logits(model, query.predicted, query.input_ids,
                             self.output_catalog(model), item_ids)
        log_probs = logits - query.log_normalizer[..., None]  # [B, S, C]
        return log_probs.logsumexp(1) - math.log(log_probs.shape[1])
