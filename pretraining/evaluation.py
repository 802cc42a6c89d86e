"""Full-ranking evaluation: every real item is a candidate for every user.

The rank of the target is the number of other candidates scoring at least as high
(ties count against the model, so a constant scorer gets the worst rank, not the
best). Ranks are computed per batch of users (memory bounded by batch x catalog),
gathered across processes with `gather_for_metrics`, and turned into metrics by
small pure functions, so N processes give exactly the metrics of one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm


@dataclass(frozen=True)
class EvaluationProtocol:
    ranking: str = "full"  # every item in the catalog is a candidate
    mask_history: bool = False  # exclude items already in the input sequence
    ks: tuple[int, ...] = (5, 10, 20)
    ties: str = "pessimistic"

    def describe(self, num_users: int, num_processes: int) -> dict:
        return {**asdict(self), "ks": list(self.ks), "num_users": num_users,
                "num_processes": num_processes}


def target_ranks(
    scores: torch.Tensor,
    targets: torch.Tensor,
    history: torch.Tensor | None = None,
) -> torch.Tensor:
    """0-based rank of each target among items 1..N.

    scores [B, N + 1] (column 0 = padding, never ranked), targets [B] in 1..N,
    history [B, L] item indices to exclude (the target itself is never excluded).
    """
    scores = scores.float().clone()
    scores[:, 0] = float("-inf")
    target_scores = scores.gather(1, targets[:, None])
    if history is not None:
        scores.scatter_(1, history, float("-inf"))
        scores.scatter_(1, targets[:, None], target_scores)
    # Items tied with the target rank above it; the "- 1" removes the target itself.
    return (scores >= target_scores).sum(1) - 1


def ranking_metrics(ranks: torch.Tensor, ks: tuple[int, ...] = (5, 10, 20)) -> dict[str, float]:
    """HR@K, NDCG@K (one relevant item, so IDCG = 1) and MRR from 0-based ranks."""
    ranks = ranks.double()
    metrics: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        metrics[f"hr@{k}"] = hit.double().mean().item()
        metrics[f"ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(ranks + 2), 0.0).mean().item()
    metrics["mrr"] = (1.0 / (ranks + 1)).mean().item()
    return metrics


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataloader: DataLoader,
    accelerator: Accelerator,
    protocol: EvaluationProtocol = EvaluationProtocol(),
    description: str = "eval",
) -> dict:
    """Metrics over every user in `dataloader` plus the protocol that produced them."""
    scorer = accelerator.unwrap_model(model)
    was_training = scorer.training
    scorer.eval()
    all_ranks = []
    for batch in tqdm(dataloader, desc=description, leave=False,
                      disable=not accelerator.is_local_main_process):
        scores = scorer.scores(batch)
        history = batch["input_ids"] if protocol.mask_history else None
        ranks = target_ranks(scores, batch["target_ids"], history)
        all_ranks.append(accelerator.gather_for_metrics(ranks))
    scorer.train(was_training)
    ranks = torch.cat(all_ranks) if all_ranks else torch.empty(0)
    if not len(ranks):
        raise ValueError("no users to evaluate: every sequence is too short for this split")
    metrics = ranking_metrics(ranks.cpu(), protocol.ks)
    metrics["protocol"] = protocol.describe(len(ranks), accelerator.num_processes)
    return metrics
