"""Zero-shot scores plus a popularity prior: a training-free use of the target's counts.

A model that never trained on the target knows nothing of which of its items are popular,
and on a new catalog that is much of what there is to know (on ml-1m-new, 18% of the test
items are among the 50 most popular training items; text alone scores below popularity).
`--zero-shot --popularity-prior` adds `weight * log(1 + count)` to every item's score,
`count` being the item's interactions in the target's training part (what the popularity
baseline ranks by). No parameter is trained: the weight is given, or chosen on validation
from `WEIGHT_GRID` (`auto`), and the test split is scored at that weight only.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from peftrec.pretraining.data import SequenceData, item_frequencies
from peftrec.pretraining.evaluation import EvaluationProtocol
from peftrec.pretraining.pipeline import evaluate_model
from peftrec.pretraining.recommender import SequentialRecommender

AUTO = "auto"
# log(1 + count) spans 0-8 on MovieLens; a model's scores span ~10-20: the grid goes from
# a nudge to popularity deciding all but the ties.
WEIGHT_GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
METRIC = "ndcg@10"


def parse_prior(value: str | float | None) -> str | float | None:
    """`auto`, a weight >= 0, or None (no prior); anything else is refused in one line."""
    if value is None or value == AUTO:
        return value
    try:
        weight = float(value)
    except (TypeError, ValueError):
        weight = -1.0
    if not weight >= 0.0:  # also refuses nan
        raise ValueError(f"--popularity-prior {value!r}: expected '{AUTO}' (a weight chosen on "
                         "validation) or a weight >= 0, e.g. 0.5")
    return weight


class PopularityPrior(nn.Module):
    """`model` with `weight * log(1 + count)` added to each item's score; answers what the
    evaluator asks (`config`, `query`, `score_items`)."""

    def __init__(self, model: SequentialRecommender, counts: torch.Tensor, weight: float) -> None:
        super().__init__()
        self.model = model
        self.weight = weight
        self.register_buffer("log_counts", torch.log1p(counts.float()), persistent=False)

    @property
    def config(self) -> Any:
        return self.model.config

    def query(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.model.query(batch)

    def score_items(self, query: Any, item_ids: torch.Tensor) -> torch.Tensor:
        scores = self.model.score_items(query, item_ids)
        return scores + self.weight * self.log_counts[item_ids].to(scores.dtype)


def evaluate_with_prior(model: SequentialRecommender, data: SequenceData,
                        protocol: EvaluationProtocol, batch_size: int, accelerator: Accelerator,
                        prior: str | float) -> tuple[dict, dict]:
    """Metrics of `model` with the target's popularity prior (`prior`: a weight, or `auto`
    to choose it on validation), and what metrics.json records of the choice."""
    scored = PopularityPrior(model, item_frequencies(data), 0.0)
    if prior != AUTO:
        scored.weight = float(prior)
        metrics = evaluate_model(scored, data, protocol, batch_size, accelerator)
        return metrics, {"weight": scored.weight, "counts": "target training split"}
    valid = {}  # weight -> validation metrics
    for weight in WEIGHT_GRID:
        scored.weight = weight
        valid[weight] = evaluate_model(scored, data, protocol, batch_size, accelerator,
                                       splits=("valid",))["valid"]
        accelerator.print(f"popularity prior weight {weight:g}: valid {METRIC} "
                          f"{valid[weight][METRIC]:.4f}")
    # The first best on ties; its validation metrics are kept, only test is scored again.
    scored.weight = max(WEIGHT_GRID, key=lambda weight: valid[weight][METRIC])
    test = evaluate_model(scored, data, protocol, batch_size, accelerator, splits=("test",))
    metrics = {"valid": valid[scored.weight], "test": test["test"], "protocol": test["protocol"]}
    record = {"weight": scored.weight, "chosen_on": f"valid {METRIC}",
              "valid_by_weight": {f"{w:g}": scores[METRIC] for w, scores in valid.items()},
              "counts": "target training split"}
    return metrics, record
