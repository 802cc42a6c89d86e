"""Full-ranking evaluation: every real item is a candidate for every user.

The rank of the target is the number of other candidates scoring at least as high
(ties count against the model, so a constant scorer gets the worst rank, not the
best). Ranks are counted per batch of users and per chunk of items, so memory is
bounded by batch x chunk, not by the catalog; they are gathered across processes
with `gather_for_metrics` and turned into metrics by small pure functions, so N
processes give exactly the metrics of one. Under FSDP the parameters are gathered for the
evaluation (`unsharded`): it calls the model's `query` and `score_items`, not `forward`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm


@dataclass(frozen=True)
class EvaluationProtocol:
    # A field with help text is a command-line flag (pretraining.cli).
    ranking: str = "full"  # every item in the catalog is a candidate
    # The batches need `history_ids`.
    mask_history: bool = field(default=False, metadata={
        "help": "exclude every item the user has seen before the target (the whole history, "
        "not only the --max-len inputs) from the ranking, as RecBole does"})
    ks: tuple[int, ...] = (5, 10, 20)
    ties: str = "pessimistic"
    item_chunk_size: int = field(default=100_000, metadata={
        "help": "items scored at once (bounds memory; metrics do not depend on it)"})
    max_users: int | None = field(default=None, metadata={
        "flag": "eval-users", "metavar": "N",
        "help": "evaluate a sample of N users (seeded by --seed, recorded in metrics)"})
    user_sample_seed: int = 0

    def __post_init__(self) -> None:
        if self.item_chunk_size < 1:
            raise ValueError(f"--item-chunk-size must be >= 1, got {self.item_chunk_size}")
        if self.max_users is not None and self.max_users < 1:
            raise ValueError(f"--eval-users must be >= 1, got {self.max_users}")

    def describe(self, num_users: int, num_processes: int) -> dict:
        # "masked_items" tells these metrics from those of runs that masked the inputs only.
        return {**asdict(self), "ks": list(self.ks),
                "masked_items": "whole_history" if self.mask_history else "none",
                "num_users": num_users, "num_processes": num_processes}


def item_chunks(num_items: int, chunk_size: int, device: torch.device):
    """Item indices 1..N in consecutive blocks of at most `chunk_size` (0 = padding skipped)."""
    for start in range(1, num_items + 1, chunk_size):
        yield torch.arange(start, min(start + chunk_size, num_items + 1), device=device)


def chunked_target_ranks(
    scorer: torch.nn.Module,
    query: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    history: torch.Tensor | None = None,
) -> torch.Tensor:
    """`target_ranks` over the whole catalog, one chunk of items at a time."""
    # [B, B] scores of the batch's targets; the diagonal pairs each row with its own.
    target_scores = scorer.score_items(query, targets).float().diagonal()[:, None]
    ranks = torch.zeros(len(targets), dtype=torch.long, device=query.device)
    for items in item_chunks(scorer.config.num_items, chunk_size, query.device):
        scores = scorer.score_items(query, items).float()
        ranks += _count_at_least(scores, items[0], targets, target_scores, history)
    return ranks


def _count_at_least(scores, first_item, targets, target_scores, history) -> torch.Tensor:
    """Per row, the items of this block (other than the target) scoring >= the target.

    The target's own column is excluded rather than compared with itself, so the count
    does not depend on how its score was rounded.
    """
    local_targets = targets - first_item
    excluded = [local_targets[:, None]]
    if history is not None:
        excluded.append(history - first_item)
    excluded = torch.cat(excluded, dim=1)
    inside = (excluded >= 0) & (excluded < scores.shape[1])
    rows = torch.arange(len(scores), device=scores.device)[:, None].expand_as(excluded)
    scores = scores.clone()
    scores[rows[inside], excluded[inside]] = float("-inf")
    return (scores >= target_scores).sum(1)


def top_k_items(
    scorer: torch.nn.Module,
    query: torch.Tensor,
    k: int,
    chunk_size: int,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best items per row (scores, item indices), merging per-chunk top-k lists.

    Memory is bounded by rows x (chunk + k); `exclude` [B, L] lists items never returned
    (e.g. the history; 0 entries are padding and ignored).
    """
    best_scores = torch.full((len(query), 0), float("-inf"), device=query.device)
    best_items = torch.zeros((len(query), 0), dtype=torch.long, device=query.device)
    for items in item_chunks(scorer.config.num_items, chunk_size, query.device):
        scores = scorer.score_items(query, items).float()
        if exclude is not None:
            local = exclude - items[0]
            inside = (local >= 0) & (local < len(items)) & (exclude > 0)
            rows = torch.arange(len(scores), device=scores.device)[:, None].expand_as(local)
            scores[rows[inside], local[inside]] = float("-inf")
        merged_scores = torch.cat([best_scores, scores], dim=1)
        merged_items = torch.cat([best_items, items.expand(len(scores), -1)], dim=1)
        top = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
        best_scores, best_items = top.values, merged_items.gather(1, top.indices)
    return best_scores, best_items


def target_ranks(
    scores: torch.Tensor,
    targets: torch.Tensor,
    history: torch.Tensor | None = None,
) -> torch.Tensor:
    """0-based rank of each target among items 1..N.

    scores [B, N + 1] (column 0 = padding, never ranked), targets [B] in 1..N,
    history [B, L] item indices to exclude (the target itself is never excluded).
    """
    scores = scores.float()
    target_scores = scores.gather(1, targets[:, None])
    return _count_at_least(scores[:, 1:], 1, targets, target_scores, history)


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
    with unsharded(scorer):
        for batch in tqdm(dataloader, desc=description, leave=False,
                          disable=not accelerator.is_local_main_process):
            history = None
            if protocol.mask_history:
                if "history_ids" not in batch:
                    raise ValueError("mask_history needs each user's whole history in the "
                                     "batch: build the dataset with full_history=True")
                history = batch["history_ids"]
            ranks = chunked_target_ranks(scorer, scorer.query(batch), batch["target_ids"],
                                         protocol.item_chunk_size, history)
            all_ranks.append(accelerator.gather_for_metrics(ranks))
    scorer.train(was_training)
    ranks = torch.cat(all_ranks) if all_ranks else torch.empty(0)
    if not len(ranks):
        raise ValueError("no users to evaluate: every sequence is too short for this split")
    metrics = ranking_metrics(ranks.cpu(), protocol.ks)
    metrics["protocol"] = protocol.describe(len(ranks), accelerator.num_processes)
    return metrics


@contextmanager
def unsharded(model: torch.nn.Module) -> Iterator[None]:
    """Gather the parameters FSDP (fully_shard, FSDP2) sharded, for code that calls the
    model's methods rather than `forward`, which alone gathers them (the submodules' own
    forwards still gather and free theirs); a no-op for a model FSDP did not shard."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for module in sharded:
        module.unshard()
    try:
        yield
    finally:
        for module in sharded:
            module.reshard()
