"""peft's LoRA for an `nn.EmbeddingBag` (a text encoder's word-piece table, `--token-vectors`).

peft adapts `nn.Embedding` but not `nn.EmbeddingBag`; it takes a layer class for any other
module type through `LoraConfig._register_custom_module`, and this is that class. It is
peft's own LoRA `Embedding` (the same A [r, V] zero at start, B [d, r], scaling, merge and
state-dict names), with the lookup done as a bag: a bag is linear in the table, so the bag
of the update's rows is the bag of A's rows times B, and no [V, d] update is built in the
step. Imported only when such a table is adapted (peft takes seconds to import).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Embedding
from torch import nn


class LoraEmbeddingBag(Embedding):
    """LoRA on an `nn.EmbeddingBag`: `bag(W)(x) + bag(A^T)(x) @ B^T * alpha / r`."""

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.num_embeddings, module.embedding_dim

    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        if self.disable_adapters and self.merged:
            self.unmerge()
        result = self.base_layer(input, offsets, per_sample_weights)
        if self.disable_adapters or self.merged:
            return result
        base = self.get_base_layer()
        for adapter in self.active_adapters:
            if adapter not in self.lora_embedding_A:
                continue
            codes = F.embedding_bag(input, self.lora_embedding_A[adapter].T, offsets,
                                    mode=base.mode, per_sample_weights=per_sample_weights,
                                    padding_idx=base.padding_idx)
            result = result + codes @ self.lora_embedding_B[adapter].T * self.scaling[adapter]
        return result
