"""ID item encoder: one learned vector per item."""

from __future__ import annotations

import torch
from torch import nn

from peftrec.modality_encoders.base import register_item_encoder, table_rows


def init_item_table(table: nn.Embedding) -> None:
    """An ID item table's start: small random rows (std 0.02), row 0 (padding) zero."""
    nn.init.normal_(table.weight, std=0.02)
    with torch.no_grad():
        table.weight[0].zero_()


@register_item_encoder("id")
class IDEncoder(nn.Module):
    """An embedding table with row 0 reserved for padding (kept at zero)."""

    # Parameters with one row per item: they belong to this catalog and cannot be moved
    # to another domain's items (transfer starts them afresh).
    catalog_parameters = ("embedding.weight",)
    # LoRA's default target here (`--adapt item_encoder`): a low-rank update of the table.
    lora_targets = ("embedding",)

    def __init__(self, num_items: int, output_dim: int, config: dict | None = None,
                 content=None) -> None:
        super().__init__()
        if config:
            raise ValueError(f"the ID item encoder takes no settings, got {sorted(config)}")
        if num_items < 1:
            raise ValueError(f"an ID encoder needs at least one item, got num_items={num_items}")
        self.output_dim = output_dim
        self.num_items = num_items
        self.embedding = nn.Embedding(num_items + 1, output_dim, padding_idx=0)
        init_item_table(self.embedding)

    def forward(self, item_indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(item_indices)

    def encode_items(self, items: torch.Tensor) -> torch.Tensor:
        """Vectors [U, d] of item indices [U] (index 0 gives the zero padding row)."""
        return self.embedding(items)

    def catalog(self) -> torch.Tensor:
        return table_rows(self.embedding, self.num_items + 1)
