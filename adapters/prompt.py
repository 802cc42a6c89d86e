"""Prompt tuning with zero-initialised gates: learned tokens each chosen layer attends to.

`num_tokens` learned vectors, in the hidden space of the model, are prepended to the
input of each chosen layer's self-attention (deep prompts, as in P-tuning v2 and
LLaMA-Adapter's adaption prompts): the layer's own frozen key and value projections turn
them into keys and values, which the real positions see only through a zero-initialised
gate per head (the machinery of `adapters.prefix`):

    out = attn(q, K, V) + gate * attn(q, key(prompt), value(prompt))

so injection leaves the outputs bit-for-bit unchanged. The prompt positions are never
part of the sequence the host computes, so its outputs keep their shape. Unlike `prefix`,
which learns keys and values directly (2 x width per token and layer), a prompt learns
one hidden vector per token and layer, and works wherever `prefix` does (SASRec and
DiffRec backbones, BERT-family and ViT/ViTMAE content encoders).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from peftrec.adapters.base import AdapterConfig, register_adapter
from peftrec.adapters.prefix import (
    GatedPrefixAttention,
    check_positive_int,
    linear_of,
    wrap_attention,
)


@dataclass(frozen=True)
class PromptConfig(AdapterConfig):
    method: str = "prompt"
    # A field with help text is a flag of the adapter scripts (pretraining.cli).
    num_tokens: int = field(default=10, metadata={
        "help": "learned prompt tokens per chosen layer"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("num_tokens", self.num_tokens)


class PromptAttention(GatedPrefixAttention):
    """Gated attention to learned prompt tokens, projected by the module's own key/value."""

    def __init__(self, base: nn.Module, num_tokens: int) -> None:
        super().__init__(base)
        hidden_size = linear_of(self.projection("key")).in_features
        # Unit scale, like the (layer-normed) hidden states the projections expect.
        self.tokens = nn.Parameter(self.gate.new_empty(num_tokens, hidden_size).normal_())

    def prefix_key_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.projection("key")(self.tokens), self.projection("value")(self.tokens)


@register_adapter("prompt", PromptConfig)
class PromptInjector:
    def inject(self, host: nn.Module, config: PromptConfig) -> None:
        wrap_attention(host, config.layers,
                       lambda module: PromptAttention(module, config.num_tokens))
