"""PCGrad (Yu et al., 2020, "Gradient Surgery for Multi-Task Learning") over a loss's terms.

Where two terms' gradients of the shared parameters conflict (negative inner product),
each is projected onto the normal plane of the other before they are summed, so neither
undoes the other's progress; gradients that do not conflict are summed unchanged. The
shared parameters are those every term reaches; a parameter only some terms reach (e.g.
the item bias, read by the cross-entropy alone) gets the plain sum of their gradients.
The other terms are taken in a fixed order (the paper shuffles them; with two terms, as
in a diffusion backbone's MSE + cross-entropy, the order does not matter).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def project_conflicting(gradients: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each flat gradient [P] with its conflicting component against every other removed:
    g_i <- g_i - (g_i . g_j) / |g_j|^2 g_j where g_i . g_j < 0 (g_j as given)."""
    projected = []
    for i, gradient in enumerate(gradients):
        result = gradient.clone()
        for j, other in enumerate(gradients):
            if i != j:  # clamped: no projection (and no host sync) where there is no conflict
                conflict = (result @ other).clamp(max=0)
                result -= conflict / (other @ other).clamp_min(1e-20) * other
        projected.append(result)
    return projected


def pcgrad_objective(terms: Sequence[torch.Tensor],
                     parameters: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """A scalar whose gradient with respect to `parameters` is PCGrad's combination of the
    terms' gradients. Backpropagating it (e.g. `accelerator.backward`, which scales it for
    gradient accumulation and lets DDP all-reduce the result) sets the combined gradients;
    its value means nothing. Each term's own gradients are computed here, one pass each."""
    per_term = [torch.autograd.grad(term, parameters, retain_graph=True, allow_unused=True)
                for term in terms]
    shared = [index for index in range(len(parameters))
              if all(gradients[index] is not None for gradients in per_term)]
    combined = {}
    if shared:
        flat = [torch.cat([gradients[index].flatten() for index in shared])
                for gradients in per_term]
        summed = torch.stack(project_conflicting(flat)).sum(0)
        sizes = [parameters[index].numel() for index in shared]
        combined = dict(zip(shared, summed.split(sizes), strict=True))
    objective = terms[0].new_zeros(())
    for index, parameter in enumerate(parameters):
        if index in combined:
            gradient = combined[index].view_as(parameter)
        else:  # reached by some terms only (or none): their plain sum
            reached = [gradients[index] for gradients in per_term if gradients[index] is not None]
            gradient = sum(reached) if reached else torch.zeros_like(parameter)
        # Every parameter stays in the graph (zero where no term reaches it), so DDP sees
        # each one's gradient as computed.
        objective = objective + (gradient.detach() * parameter).sum()
    return objective
