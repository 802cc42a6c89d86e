"""Whitening of a catalog's cached encoder outputs, before the item head (`--whitening`).

Pre-trained sentence vectors are anisotropic: they share a large common component and
a few dominant directions, so items' vectors are close to one another (mean pairwise
cosine ~0.3-0.5 for MiniLM on movie titles), and a new domain's vectors sit elsewhere
than the source's. Whitening the catalog's vectors with the catalog's own statistics
(Su et al. 2021, "Whitening sentence representations"; WhitenRec, Zhang et al. 2024,
for text-based sequential recommendation) removes both:

- `center`: subtract the catalog mean;
- `zca`: subtract the mean and map the covariance to the identity with ZCA,
  `W = U diag(1 / sqrt(lambda + eps)) U^T`. ZCA rather than PCA whitening because it is the
  whitening closest to the input: PCA's axes (eigenvector order and signs) differ from one
  catalog to the next, so a head trained on one domain's PCA axes would read another
  domain's in an unrelated basis, while ZCA keeps every domain in the encoder's own axes.

The statistics come from the item content alone (no interactions), once per catalog: a
model fine-tuned or evaluated zero-shot on another dataset whitens that dataset's
catalog with its own statistics, which is the point on transfer (the target's vectors
are moved to where the source's were). The learned counterpart is the `moe` head's
per-expert centre; the two combine.

Written here because neither `transformers` nor `sklearn` (not a dependency) whitens
a tensor in place on the model's device; it is a few lines of `torch.linalg`.
"""

from __future__ import annotations

import torch

WHITENINGS = ("none", "center", "zca")
# Eigenvalue floor, relative to the mean eigenvalue: directions with almost no variance
# (a catalog smaller than the encoder width has some of exactly zero) are not blown up
# into unit-variance noise.
RELATIVE_EPS = 1e-2


def whiten(vectors: torch.Tensor, mode: str) -> torch.Tensor:
    """`vectors` [N, H] whitened with their own statistics (`mode`: one of WHITENINGS)."""
    if mode not in WHITENINGS:
        raise ValueError(f"unknown --whitening {mode!r}; choose one of {', '.join(WHITENINGS)}")
    if mode == "none":
        return vectors
    x = vectors.double()
    centred = x - x.mean(0, keepdim=True)
    if mode == "center":
        return centred.to(vectors.dtype)
    covariance = centred.T @ centred / max(len(x) - 1, 1)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    eigenvalues = eigenvalues.clamp(min=0.0)
    floor = RELATIVE_EPS * eigenvalues.mean().clamp(min=torch.finfo(x.dtype).tiny)
    transform = eigenvectors @ torch.diag((eigenvalues + floor).rsqrt()) @ eigenvectors.T
    return (centred @ transform).to(vectors.dtype)
