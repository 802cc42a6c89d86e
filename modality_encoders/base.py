"""The item-encoder contract and the registry that maps encoder names to classes."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class ItemEncoder(Protocol):
    """Maps item indices (0 = padding) to vectors of size `output_dim`."""

    output_dim: int

    def forward(self, item_indices: torch.Tensor) -> torch.Tensor:
        """[...] long -> [..., output_dim]."""
        ...

    def catalog(self) -> torch.Tensor:
        """Vectors of every item, row 0 being padding: [num_items + 1, output_dim]."""
        ...


ITEM_ENCODERS: dict[str, type[nn.Module]] = {}


def register_item_encoder(name: str):
    """Class decorator adding an encoder to `ITEM_ENCODERS` under `name`."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        ITEM_ENCODERS[name] = cls
        return cls

    return wrap


def build_item_encoder(
    name: str, num_items: int, output_dim: int, config: dict | None = None, content=None
) -> nn.Module:
    """Build the encoder registered as `name` for a catalog of `num_items` items.

    `config` holds the encoder's own settings (`RecommenderConfig.item_encoder_config`);
    `content` the items' texts / images (`modality_encoders.ItemContent`) for content
    encoders.
    """
    return _encoder_class(name)(
        num_items=num_items, output_dim=output_dim, config=config or {}, content=content
    )


def resolve_item_encoder_config(name: str, config: dict) -> dict:
    """`config` completed with what a checkpoint must record (e.g. the encoder fingerprint)."""
    resolve = getattr(_encoder_class(name), "resolve_config", None)
    return resolve(config) if resolve is not None else dict(config)


def item_encoder_modality(name: str) -> str | None:
    """The content an encoder reads, "text" or "image" (`text`, `text+id`, ...), or None for
    one that reads none (`id`, or a name not registered): the one place that knows which
    encoders are content-based."""
    return getattr(ITEM_ENCODERS.get(name), "modality", None) or None


def normalize_item_encoder_config(name: str, config: dict) -> dict:
    """`config` with the settings it lacks at their defaults, so that a config recorded
    before a setting existed compares equal to the same one recorded after."""
    normalize = getattr(ITEM_ENCODERS.get(name), "normalize_config", None)
    return normalize(config) if normalize is not None and config else dict(config)


def check_item_encoder_weights(name: str, config: dict, output_dim: int,
                               shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Why a checkpoint's item-encoder tensors (`shapes`: name under the encoder -> shape)
    do not fit the encoder `config` describes, in one line; None if they do, or if the
    encoder has no such check."""
    check = getattr(ITEM_ENCODERS.get(name), "check_weights", None)
    return check(config, output_dim, shapes) if check is not None else None


def lookup_table_names(name: str) -> tuple[str, ...]:
    """The module names of encoder `name`'s lookup tables: its per-item tables (from its
    `catalog_parameters`: `embedding` for `id`, `id_embedding` for `text+id`) and its
    `vocabulary_tables` (a text encoder's `token_vectors`)."""
    encoder = _encoder_class(name)
    parameters = getattr(encoder, "catalog_parameters", ())
    return (tuple(p.removesuffix(".weight") for p in parameters if p.endswith(".weight"))
            + tuple(getattr(encoder, "vocabulary_tables", ())))


def table_rows(table: nn.Module, num_rows: int) -> torch.Tensor:
    """Every row [num_rows, d] of a per-item table: a plain nn.Embedding's weight, or, when an
    adapter wraps the table (LoRA on the item table adds a low-rank update to each row it
    looks up), the rows the wrapper looks up, so the whole catalog is scored as adapted."""
    if isinstance(table, nn.Embedding):
        return table.weight
    device = next(table.parameters()).device
    return table(torch.arange(num_rows, device=device))


def _encoder_class(name: str) -> type[nn.Module]:
    if name not in ITEM_ENCODERS:
        raise ValueError(
            f"unknown item encoder {name!r}; choose one of {sorted(ITEM_ENCODERS)}"
        )
    return ITEM_ENCODERS[name]
