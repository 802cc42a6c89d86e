"""Content + ID item encoders (`text+id`, `image+id`): a content vector plus an ID vector.

The item vector combines the content encoder's vector c (encoder, pooling, head: everything
a `text` / `image` encoder does, in every mode: cached, end to end, partial) with a row e
of a per-item embedding table (`fusion`):

- `sum`:  c + e (UniSRec's transductive item vector);
- `gate`: c + g * e with g = sigmoid(W [c; e] + b) per item and dimension: how much of its
  ID vector each item takes, learned from both vectors. A gated residual rather than the
  convex g * c + (1 - g) * e: with e = 0 the output is exactly c, whatever the gate.
- `scaled`: e + s * c with s a learned vector (one scale per dimension), zero at start
  (as ReZero starts its residual branches): the model starts as an ID model and takes in
  as much of the content as helps. Why: with `sum`, items with similar texts start with
  similar vectors, and at an equal budget the ID part had not yet learned to tell them
  apart (ML-1M: training loss above the ID model's, test 89-90% of it). Its table starts
  as an ID model's.

The ID table starts at zero (row 0, padding, stays zero), so at start and after a
transfer, which restarts the table for the new catalog (`catalog_parameters`), the model
scores exactly as its content part does: zero-shot works, and each new item starts from
the base's content vector while the table learns a per-item correction (`scaled` starts
its table as an ID model does, small random rows: a new item starts from the scaled
content vector plus that small noise). Every other tensor (head, gate, scale; the
encoder's own weights when it is trained) keeps the content encoder's names, so it
transfers as a content model's does.
"""

from __future__ import annotations

import torch
from torch import nn

from peftrec.modality_encoders.base import register_item_encoder, table_rows
from peftrec.modality_encoders.content_encoder import ContentItemEncoder
from peftrec.modality_encoders.id_encoder import init_item_table
from peftrec.modality_encoders.image_encoder import ImageItemEncoder
from peftrec.modality_encoders.text_encoder import TextItemEncoder


class IDFusion(ContentItemEncoder):
    """What `text+id` and `image+id` add to their content encoder (mixed in before it)."""

    catalog_parameters = ("id_embedding.weight",)  # per item: restarted by transfer
    fuses_ids = True

    def __init__(self, num_items: int, output_dim: int, config: dict | None = None,
                 content=None) -> None:
        super().__init__(num_items, output_dim, config, content)
        self.fusion = self.settings.fusion or "sum"
        self.id_embedding = nn.Embedding(num_items + 1, output_dim, padding_idx=0)
        self.fusion_gate = None
        self.content_scale = None
        if self.fusion == "scaled":
            self.content_scale = nn.Parameter(torch.zeros(output_dim))
            # Started as an ID model's table: with the content scaled to zero, zero rows
            # would start every item at the same vector (on ML-100k that cost as much as
            # the content part's drag did: training loss 5.99 against 5.81 at epoch 5).
            init_item_table(self.id_embedding)
        else:
            nn.init.zeros_(self.id_embedding.weight)
        if self.fusion == "gate":
            # Zero at start: g = 1/2 for every item until the ID vectors move.
            self.fusion_gate = nn.Linear(2 * output_dim, output_dim)
            nn.init.zeros_(self.fusion_gate.weight)
            nn.init.zeros_(self.fusion_gate.bias)

    def fuse(self, content: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The item vectors from content vectors and ID vectors (both [..., d])."""
        if self.content_scale is not None:
            return ids + self.content_scale * content
        if self.fusion_gate is None:
            return content + ids
        gate = torch.sigmoid(self.fusion_gate(torch.cat([content, ids], -1)))
        return content + gate * ids

    def catalog(self) -> torch.Tensor:
        return self.fuse(self.content_catalog(), table_rows(self.id_embedding, self.num_items + 1))

    def encode_items(self, items: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.content_vectors(items), self.id_embedding(items))

    @classmethod
    def resolve_config(cls, config: dict) -> dict:
        resolved = super().resolve_config(config)
        resolved["fusion"] = resolved["fusion"] or "sum"
        return resolved


@register_item_encoder("text+id")
class TextIDItemEncoder(IDFusion, TextItemEncoder):
    """Item text vector + item ID vector."""


@register_item_encoder("image+id")
class ImageIDItemEncoder(IDFusion, ImageItemEncoder):
    """Item image vector + item ID vector."""
