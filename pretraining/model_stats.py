"""What a trained model's numbers say about it: the statistics that reveal a collapsed item
embedding space, and its parameters split into embedding and non-embedding ones.

    stats = embedding_statistics(model.item_encoder.catalog()[1:])   # row 0 is padding
    stats.effective_rank, stats.mean_cosine, stats.norm_std
    parameter_split(model)   # {"total", "embedding", "non_embedding", "trainable", ...}

A collapsed space (every item vector pointing the same way, or a few directions carrying
everything) shows as an effective rank far below the width, a mean pairwise cosine near 1,
or norms spread far apart (a few long vectors that out-score every other item).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

# Singular values below this share of the largest count as zero: float32 item vectors
# carry about 7 significant digits, so smaller ones are rounding, not directions.
RELATIVE_SINGULAR_VALUE_FLOOR = 1e-6
CHUNK_ROWS = 65_536  # rows of a catalog summed at once (memory: chunk x width, float64)


@dataclass(frozen=True)
class EmbeddingStatistics:
    num_vectors: int
    dim: int
    effective_rank: float  # between 1 and min(num_vectors, dim); 0 for all-zero vectors
    mean_cosine: float  # over all pairs of distinct vectors; nan for fewer than two
    norm_mean: float
    norm_std: float  # population standard deviation
    norm_min: float
    norm_max: float

    @property
    def norm_cv(self) -> float:
        """Coefficient of variation of the norms, std / mean: their spread, scale-free."""
        return self.norm_std / self.norm_mean if self.norm_mean > 0 else math.nan

    def to_dict(self) -> dict:
        return {**asdict(self), "norm_cv": self.norm_cv}


def singular_values(vectors: torch.Tensor) -> torch.Tensor:
    """Singular values of `vectors` [n, d] (float64, descending), from the d x d Gram
    matrix summed over row chunks, so a million-item catalog needs no n x n or n x d
    float64 copy. Values below RELATIVE_SINGULAR_VALUE_FLOOR of the largest are 0."""
    vectors = _matrix(vectors)
    gram = vectors.new_zeros((vectors.shape[1], vectors.shape[1]), dtype=torch.float64)
    for start in range(0, len(vectors), CHUNK_ROWS):
        chunk = vectors[start:start + CHUNK_ROWS].double()
        gram += chunk.T @ chunk
    values = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(0)
    if len(values) and values[0] > 0:
        values[values < values[0] * RELATIVE_SINGULAR_VALUE_FLOOR] = 0
    return values


def effective_rank(vectors: torch.Tensor) -> float:
    """Roy & Vetterli (2007): exp of the entropy of the singular values normalised to sum
    to 1. 1 when every vector lies on one line (identical vectors), the width d for d
    orthonormal vectors (or any set with equal singular values); 0 for all-zero vectors."""
    values = singular_values(vectors)
    values = values[values > 0]
    if not len(values):
        return 0.0
    shares = values / values.sum()
    return math.exp(float(-(shares * shares.log()).sum()))


def mean_pairwise_cosine(vectors: torch.Tensor) -> float:
    """The mean cosine similarity over all pairs of distinct vectors (the diagonal left
    out), in O(n d): the sum of all cosines is |sum of the unit vectors|^2. A zero vector
    has cosine 0 with every other. nan for fewer than two vectors."""
    vectors = _matrix(vectors)
    count = len(vectors)
    if count < 2:
        return math.nan
    total = vectors.new_zeros(vectors.shape[1], dtype=torch.float64)
    nonzero = 0
    for start in range(0, count, CHUNK_ROWS):
        chunk = vectors[start:start + CHUNK_ROWS].double()
        norms = chunk.norm(dim=1, keepdim=True)
        nonzero += int((norms > 0).sum())
        total += (chunk / norms.clamp_min(torch.finfo(torch.float64).tiny)).sum(0)
    return float((total @ total - nonzero) / (count * (count - 1)))


def embedding_statistics(vectors: torch.Tensor) -> EmbeddingStatistics:
    """Effective rank, mean pairwise cosine and norm spread of `vectors` [n, d]."""
    vectors = _matrix(vectors)
    norms = vectors.double().norm(dim=1)
    nan = math.nan
    return EmbeddingStatistics(
        num_vectors=len(vectors), dim=vectors.shape[1],
        effective_rank=effective_rank(vectors), mean_cosine=mean_pairwise_cosine(vectors),
        norm_mean=float(norms.mean()) if len(norms) else nan,
        norm_std=float(norms.std(correction=0)) if len(norms) else nan,
        norm_min=float(norms.min()) if len(norms) else nan,
        norm_max=float(norms.max()) if len(norms) else nan,
    )


def _matrix(vectors) -> torch.Tensor:
    vectors = torch.as_tensor(vectors).detach()
    if vectors.dim() != 2:
        raise ValueError(f"expected vectors [n, d], got shape {list(vectors.shape)}")
    return vectors.cpu()


def embedding_parameter_ids(model: nn.Module) -> set[int]:
    """The embedding parameters of `model`: those of its nn.Embedding modules (item ID
    tables, learned positions, a text encoder's token embeddings) and its per-item
    parameters (`catalog_parameter_names`: a generative item bias, an untied output table).
    Their count grows with the catalog or the vocabulary, not with the network's depth."""
    ids = {id(param) for module in model.modules() if isinstance(module, nn.Embedding)
           for param in module.parameters(recurse=False)}
    for name in getattr(model, "catalog_parameter_names", list)():
        owner, _, attribute = name.rpartition(".")
        module = model.get_submodule(owner)
        if parametrize.is_parametrized(module, attribute):  # frozen matched rows + the others
            ids.update(id(param) for param in module.parametrizations[attribute].parameters())
        else:
            ids.add(id(module.get_parameter(attribute)))
    return ids


def parameter_split(model: nn.Module) -> dict[str, int]:
    """Parameter counts of `model` (shared tensors once), total and trainable
    (`requires_grad`), each split into embedding parameters (`embedding_parameter_ids`) and
    the rest (non-embedding: the backbone, content heads, adapters), as scaling studies of
    sequential recommenders report model size."""
    embedding = embedding_parameter_ids(model)
    counts = dict.fromkeys(("total", "embedding", "non_embedding", "trainable",
                            "trainable_embedding", "trainable_non_embedding"), 0)
    for param in model.parameters():  # already de-duplicated
        kind = "embedding" if id(param) in embedding else "non_embedding"
        counts["total"] += param.numel()
        counts[kind] += param.numel()
        if param.requires_grad:
            counts["trainable"] += param.numel()
            counts[f"trainable_{kind}"] += param.numel()
    return counts
