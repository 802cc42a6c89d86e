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
    seen_ids: torch.Tensor | None = None,
    seen_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy over every real item, averaged over positions that have a target.

    states [..., d], catalog [N + 1, d] (row 0 = padding, never a candidate), targets [...]
    in 1..N, or 0 where there is no target (ignored). `item_offsets` are added to each
    position's logits: [..., N + 1], one row per position, or [N + 1], shared by all.
    `seen_bias` (a scalar) is added to the logits of the items `seen_ids` [..., S] lists
    for each position (0: none; an item listed twice gets it once): the repeat bias,
    without its [..., N + 1] offsets.

    The logits are made a block of positions at a time (`logit_block_rows`), and each block
    goes straight to its loss and, when a gradient is needed, to its share of the gradients
    (`_BlockwiseCrossEntropy`). `F.cross_entropy` over the whole logits made them, their
    log-softmax and both their gradients, each [positions, N], every step: on CPU that
    took as long as the three matrix products (benchmarks/roofline.py). Now no [positions,
    N] tensor outlives its block, but the gradient of per-position offsets that need one.
    """
    width = states.shape[-1]
    states, targets = states.reshape(-1, width), targets.reshape(-1)
    if item_offsets is not None and item_offsets.dim() > 1:
        item_offsets = item_offsets.reshape(len(states), -1)
    if seen_ids is not None:
        seen_ids = seen_ids.reshape(len(states), -1)
    inputs = (states, catalog, item_offsets, seen_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return _BlockwiseCrossEntropy.apply(states, catalog, targets, item_offsets, seen_ids,
                                            seen_bias)
    return blockwise_cross_entropy(states, catalog, targets, item_offsets, seen_ids,
                                   seen_bias)[0]


def logit_block_rows(num_items: int, device: torch.device) -> int:
    """Positions whose logits are made at once: about 2M logits (8 MB) on CPU, which stays
    in the cache and under glibc's 32 MB mmap threshold (a larger block is a fresh mapping,
    page-faulted in, every time); 64M (256 MB) on an accelerator, one block for most
    catalogs, as one matrix product was before."""
    logits = 2**21 if device.type == "cpu" else 2**26
    return max(1, logits // num_items)


def blockwise_cross_entropy(
    states: torch.Tensor,
    catalog: torch.Tensor,
    targets: torch.Tensor,
    item_offsets: torch.Tensor | None,
    seen_ids: torch.Tensor | None = None,
    seen_bias: torch.Tensor | None = None,
    gradients: tuple[str, ...] = (),
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean cross-entropy of states [P, d] over items 1..N of catalog [N + 1, d] (plus
    the offsets [P, N + 1] or [N + 1], and the bias of the items seen_ids [P, S] lists),
    and its gradients with respect to those of "states", "catalog", "offsets" and
    "seen_bias" named in `gradients`, computed one block of positions at a time."""
    items = catalog[1:]
    has_target = targets > 0
    count = has_target.sum()
    weight = has_target / count  # each position's share of the mean: 1 / count, or 0
    total = states.new_zeros((), dtype=torch.float32)
    inputs = {"states": states, "catalog": catalog, "offsets": item_offsets,
              "seen_bias": seen_bias}
    grads = {name: torch.zeros_like(inputs[name]) for name in gradients}
    rows = logit_block_rows(len(items), states.device)
    for start in range(0, len(states), rows):
        block = slice(start, start + rows)
        block_states, block_targets = states[block], (targets[block] - 1).clamp_min(0)[:, None]
        logits = (block_states @ items.T).float()
        if item_offsets is not None:
            logits += item_offsets[1:] if item_offsets.dim() == 1 else item_offsets[block, 1:]
        if seen_ids is not None:
            block_ids = seen_ids[block]
            seen = block_ids.new_zeros((len(block_ids), len(catalog)), dtype=torch.bool)
            seen = seen.scatter_(1, block_ids, True)[:, 1:]
            logits += seen_bias * seen
        # One softmax kernel, then log-sum-exp = max - log(the largest probability): exact
        # where -log(probability of the target) would underflow.
        probs = torch.softmax(logits, dim=1)
        log_sum_exp = logits.amax(1) - probs.amax(1).log()
        losses = log_sum_exp - logits.gather(1, block_targets).squeeze(1)
        total += torch.where(has_target[block], losses, 0.0).sum()
        if not gradients:
            continue
        # d loss / d logits = (softmax - one-hot of the target) * weight
        block_weight = weight[block][:, None]
        grad = probs.mul_(block_weight).scatter_add_(1, block_targets, -block_weight)
        grad = grad.to(items.dtype)
        if "states" in grads:
            grads["states"][block] = grad @ items
        if "catalog" in grads:
            # In place, so autocast does not cast: bf16 states meet a float32 table under
            # --mixed-precision bf16.
            grads["catalog"][1:].addmm_(grad.T, block_states.to(grad.dtype))
        if "offsets" in grads and item_offsets.dim() == 1:
            grads["offsets"][1:] += grad.sum(0)
        elif "offsets" in grads:
            grads["offsets"][block, 1:] = grad
        if "seen_bias" in grads:
            grads["seen_bias"] += (grad * seen).sum()
    return total / count, grads


class _BlockwiseCrossEntropy(torch.autograd.Function):
    """`blockwise_cross_entropy` whose gradients are made in the forward, block by block,
    and only scaled by the incoming gradient in the backward."""

    inputs = ("states", "catalog", "targets", "offsets", "seen_ids", "seen_bias")  # in order

    @staticmethod
    def forward(ctx, states, catalog, targets, item_offsets, seen_ids, seen_bias):
        needed = tuple(name for name, needs in zip(_BlockwiseCrossEntropy.inputs,
                                                   ctx.needs_input_grad, strict=True) if needs)
        loss, grads = blockwise_cross_entropy(states, catalog, targets, item_offsets, seen_ids,
                                              seen_bias, needed)
        ctx.needed = needed
        ctx.save_for_backward(*grads.values())
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grads = dict(zip(ctx.needed, ctx.saved_tensors, strict=True))
        return tuple(grads[name] * grad_loss if name in grads else None
                     for name in _BlockwiseCrossEntropy.inputs)


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
    every item and uniform q this is exactly the full softmax). `item_offsets` are added to
    the logits: [P, N + 1] (one row per target, one column per catalog row), or [N + 1],
    shared by every target.
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
    if item_offsets is not None and item_offsets.dim() == 1:
        pos_logits = pos_logits + item_offsets[targets]
        neg_logits = neg_logits + item_offsets[negatives]
    elif item_offsets is not None:
        pos_logits = pos_logits + item_offsets.gather(1, targets[:, None]).squeeze(1)
        neg_logits = neg_logits + item_offsets[:, negatives]
    neg_logits = neg_logits.masked_fill(negatives[None, :] == targets[:, None], float("-inf"))
    logits = torch.cat([pos_logits[:, None], neg_logits], dim=1)
    return F.cross_entropy(logits, torch.zeros_like(targets))
