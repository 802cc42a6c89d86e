"""Counting a model's trainable parameters.

It lives in dataset_tools, the package at the bottom of the import flow (scripts ->
downstream -> pretraining -> {modality_encoders, adapters, dataset_tools}), because both
adapters (the share an adapter trains) and pretraining (every run's log) report it.
"""

from __future__ import annotations

from torch import nn


def trainable_share(model: nn.Module) -> tuple[int, int, float]:
    """(trainable, total, percent) over the model's unique parameters."""
    params = list(model.parameters())  # .parameters() already de-duplicates shared tensors
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return trainable, total, 100.0 * trainable / total if total else 0.0


def format_trainable_share(model: nn.Module) -> str:
    """`trainable params: 1,234 || all params: 56,789 || trainable%: 2.17`"""
    trainable, total, percent = trainable_share(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {percent:.2f}"
