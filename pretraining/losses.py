"""Next-item losses over the catalog: full softmax, or sampled softmax with logQ correction."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def full_softmax_loss(
    states: torch.Tensor,
    catalog: torch.Tensor,
    targets: torch.Tensor,
    item_offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy over every real item, averaged over positions that have a target.

    states [..., d], catalog [N + 1, d] (row 0 = padding, never a candidate), targets [...]
    in 1..N, or 0 where there is no target (ignored). `item_offsets` [..., N + 1] are
    added to each position's logits (e.g. the repeat bias of already-seen items).
    """
    logits = states @ catalog[1:].T
    if item_offsets is not None:
        logits = logits + item_offsets[..., 1:]
    return F.cross_entropy(logits.flatten(0, -2), (targets - 1).flatten(), ignore_index=-1)


def sampled_softmax_loss(
    states: torch.Tensor,
    catalog: torch.Tensor,
    targets: torch.Tensor,
    num_negatives: int,
    sampling_probs: torch.Tensor | None = None,
    negatives: torch.Tensor | None = None,
    item_offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax over each target plus negatives shared by the whole batch.

    Negatives come from `sampling_probs` over items 1..N (uniform when None). Each
    negative logit is corrected by -log(num_negatives * q(item)), its expected count,
    so the sum over negatives estimates the full partition function without bias
    (Bengio & Senecal, 2008; Jean et al., 2015); a negative equal to the row's target
    is masked out. `negatives` fixes the negative items instead of sampling them (with
    every item and uniform q this is exactly the full softmax). `item_offsets` [P, N + 1]
    (one row per target, one column per catalog row) are added to the logits.
    """
    num_items = catalog.shape[0] - 1
    if negatives is None and sampling_probs is None:
        negatives = torch.randint(1, num_items + 1, (num_negatives,), device=states.device)
    elif negatives is None:
        negatives = torch.multinomial(sampling_probs, num_negatives, replacement=True) + 1
    if sampling_probs is None:
        log_q = torch.full((len(negatives),), -math.log(num_items), device=states.device)
    else:
        log_q = sampling_probs.clamp_min(1e-12).log()[negatives - 1]
    pos_logits = (states * catalog[targets]).sum(-1)
    neg_logits = states @ catalog[negatives].T - log_q - math.log(len(negatives))
    if item_offsets is not None:
        pos_logits = pos_logits + item_offsets.gather(1, targets[:, None]).squeeze(1)
        neg_logits = neg_logits + item_offsets[:, negatives]
    neg_logits = neg_logits.masked_fill(negatives[None, :] == targets[:, None], float("-inf"))
    logits = torch.cat([pos_logits[:, None], neg_logits], dim=1)
    return F.cross_entropy(logits, torch.zeros_like(targets))
