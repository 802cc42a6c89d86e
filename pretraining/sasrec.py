"""SASRec: a causal Transformer over item sequences (Kang & McAuley, 2018).

Pre-layer-norm blocks, learned absolute positions counted from the right end of
the sequence (so the last item always has position `max_len - 1`, whatever the
batch's padded length), attention through `scaled_dot_product_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from peftrec.pretraining.scoring import DotProductScorer


@dataclass
class SASRecConfig:
    # The help text of each field is its command-line flag's (pretraining.cli).
    hidden_size: int = field(default=64, metadata={"help": "width of the item vectors and of "
                                                   "the Transformer"})
    num_layers: int = field(default=2, metadata={"help": "Transformer layers"})
    num_heads: int = field(default=2, metadata={"help": "attention heads per layer"})
    ffn_size: int = field(default=256, metadata={"help": "hidden width of the feed-forward"})
    max_len: int = field(default=200, metadata={"help": "longest input sequence"})
    dropout: float = field(default=0.2, metadata={"help": "dropout rate"})

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"--hidden-size {self.hidden_size} is not divisible by --num-heads "
                f"{self.num_heads}; pick sizes where it is"
            )
        for name in ("hidden_size", "num_layers", "num_heads", "ffn_size", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)

    def key_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, heads, L, d / heads] of positions `x` (what DiffRec caches)."""
        return self._split_heads(self.k_proj(x)), self._split_heads(self.v_proj(x))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`past`: keys and values of earlier positions (`key_values`), attended before x's."""
        q = self._split_heads(self.q_proj(x))
        k, v = self.key_values(x)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        # Attention dropout would force SDPA's slow path on CPU; dropout is applied
        # on the residual branches instead.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        batch, _, length, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class FeedForward(nn.Module):
    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.ffn_size)
        self.fc2 = nn.Linear(config.ffn_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SASRecBlock(nn.Module):
    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.hidden_size)
        self.attention = CausalSelfAttention(config)
        self.ffn_norm = nn.LayerNorm(config.hidden_size)
        self.feed_forward = FeedForward(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`past`: cached keys and values of earlier positions (see `CausalSelfAttention`)."""
        x = x + self.dropout(self.attention(self.attn_norm(x), attn_mask, past))
        return x + self.dropout(self.feed_forward(self.ffn_norm(x)))


class SASRec(nn.Module):
    """Sequence backbone: item vectors [B, L, d] -> contextual states [B, L, d].

    Position t only sees positions <= t, and padding (left side) is never attended.
    """

    # Where adapters may attach, by module-name pattern ({i} = layer index):
    # `attn` after the attention output projection, `ffn` after the feed-forward.
    adapter_sites = {"attn": "layers.{i}.attention", "ffn": "layers.{i}.feed_forward"}
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")
    attention_modules = "layers.{i}.attention"  # the self-attention (prefix, prompt)
    scorer = DotProductScorer()  # scores = last state . item vectors (pretraining.scoring)

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        self.position_embedding = nn.Embedding(config.max_len, config.hidden_size)
        self.input_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(SASRecBlock(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size)
        self.apply(_init_weights)

    def forward(self, item_vectors: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """`padding_mask` is True at real items, False at padding; both [B, L]."""
        length = item_vectors.shape[1]
        if length > self.config.max_len:
            raise ValueError(
                f"sequence length {length} exceeds max_len {self.config.max_len}; "
                "truncate inputs to the model's max_len"
            )
        positions = torch.arange(
            self.config.max_len - length, self.config.max_len, device=item_vectors.device
        )
        keep = padding_mask.unsqueeze(-1).to(item_vectors.dtype)
        x = item_vectors * self.config.hidden_size**0.5 + self.position_embedding(positions)
        x = self.input_dropout(x) * keep
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        # [B, 1, L, L]: query t may see key s when s <= t and s is a real item.
        attn_mask = causal & padding_mask[:, None, None, :]
        for layer in self.layers:
            x = layer(x, attn_mask) * keep
        return self.final_norm(x)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
