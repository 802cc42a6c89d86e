"""Prefix tuning (Li & Liang, 2021) with a zero-initialised gate per head.

Each chosen layer's self-attention gets `num_virtual_tokens` learned keys and values.
Prepending them to the real keys would change the softmax normalisation, so the model's
outputs would move at injection. Instead, as in LLaMA-Adapter (Zhang et al., 2023), the
queries attend to the prefix in a separate softmax whose result is scaled by a learned
gate per head, initialised at zero:

    out = attn(q, K, V) + gate * attn(q, K_prefix, V_prefix)

so a freshly injected adapter leaves the outputs bit-for-bit unchanged. While the gate
is zero the prefixes get no gradient; the gates do, and the prefixes follow once the
gates leave zero.

`GatedPrefixAttention` wraps a self-attention module (kept as `.base`, run unchanged with
whatever mask it receives: 4-D bool, additive float or None) and adds the gated term,
computed from the queries of the module's own query projection (projected once more:
the module does not expose them). When the module applies an output projection itself
(SASRec's and ViT's `o_proj`; BERT's comes after the module), the term goes through that
projection's linear part. Where a host keeps its self-attention modules is its
`attention_modules` pattern (e.g. `pretraining.sasrec.SASRec.attention_modules`).

With `reparameterize`, the prefix is `MLP(embedding)` during training (more stable, as in
the paper); `fold_prefixes(model)` then replaces each MLP by the tensor it produces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from peftrec.adapters.base import (
    AdapterConfig,
    AdapterLayer,
    num_layers,
    register_adapter,
    replace_submodule,
)
from peftrec.adapters.placement import parse_layers

# Self-attention layouts this module knows: (query, key, value) projection names.
# SASRec and ViT/ViTMAE (transformers 5) use q_proj..., BERT-family models query...
PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))
HEAD_COUNTS = ("num_heads", "num_attention_heads")  # attribute holding the head count


@dataclass(frozen=True)
class PrefixConfig(AdapterConfig):
    # A field with help text is a flag of the adapter scripts (pretraining.cli).
    method: str = "prefix"
    num_virtual_tokens: int = field(default=10, metadata={
        "help": "prefix keys/values per chosen layer"})
    reparameterize: bool = field(default=False, metadata={
        "help": "produce the prefix by an MLP while training"})
    reparameterize_hidden: int | None = field(default=None, metadata={
        "help": "--reparameterize: the MLP's width (unset: the attention width)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("num_virtual_tokens", self.num_virtual_tokens)
        if not isinstance(self.reparameterize, bool):
            raise ValueError(f"reparameterize must be True or False, got {self.reparameterize!r}")
        if self.reparameterize_hidden is not None:
            check_positive_int("reparameterize_hidden", self.reparameterize_hidden)


def check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


class GatedPrefixAttention(AdapterLayer):
    """`base(x, ...) + gate * attn(q(x), K_prefix, V_prefix)`; subclasses say where the
    prefix keys and values come from (`prefix_key_values`)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        # The projections stay in `base` and are looked up by name on use, so that their
        # parameters count once (as frozen) and another adapter may still wrap them later.
        paths = [name for name, module in base.named_modules() if _is_attention(module)]
        if not paths:
            raise ValueError(
                f"{type(base).__name__} is no self-attention module these adapters know: "
                "expected query/key/value projections named "
                f"{' or '.join('/'.join(names) for names in PROJECTIONS)}"
            )
        self.core_path = paths[0]
        core = base.get_submodule(self.core_path)
        names = next(n for n in PROJECTIONS if all(hasattr(core, a) for a in n))
        self.projection_names = dict(zip(("query", "key", "value"), names, strict=True))
        self.num_heads = next(getattr(core, name) for name in HEAD_COUNTS if hasattr(core, name))
        query = linear_of(self.projection("query"))
        self.width = query.out_features
        # Adapter tensors are created like the gate: on the device and dtype of the layer.
        self.gate = nn.Parameter(query.weight.new_zeros(self.num_heads))

    def projection(self, role: str) -> nn.Module | None:
        """The module's `query`, `key`, `value` or `output` projection (None: no output)."""
        core = self.base.get_submodule(self.core_path)
        if role == "output":  # BERT's output projection comes after the module
            return getattr(core, "o_proj", None)
        return getattr(core, self.projection_names[role])

    def prefix_key_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix keys and values, [P, width] each."""
        raise NotImplementedError

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = self.base(hidden_states, *args, **kwargs)
        extra = self.gated_prefix_attention(hidden_states)
        if isinstance(out, tuple):  # transformers modules also return attention weights
            return (out[0] + extra, *out[1:])
        return out + extra

    def gated_prefix_attention(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        q = self._split_heads(self.projection("query")(hidden_states))
        keys, values = (self._split_heads(t[None]).expand(batch, -1, -1, -1)
                        for t in self.prefix_key_values())
        # Every query sees every prefix position: no mask.
        heads = F.scaled_dot_product_attention(q, keys, values) * self.gate[:, None, None]
        extra = heads.transpose(1, 2).reshape(batch, length, self.width)
        output = self.projection("output")
        if output is None:
            return extra
        # The module already applies the projection (and its bias) to the real attention;
        # the prefix term needs only its linear part, f(y) - f(0) (also with LoRA on it).
        return output(extra) - output(extra.new_zeros(self.width))

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, width] -> [B, h, T, d]
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, -1).transpose(1, 2)


class PrefixAttention(GatedPrefixAttention):
    """Learned prefix keys and values, optionally produced by an MLP (`fold` removes it)."""

    def __init__(self, base: nn.Module, num_tokens: int, reparameterize: bool = False,
                 hidden: int | None = None) -> None:
        """`hidden`: the MLP's width (default: the attention width)."""
        super().__init__(base)
        if not reparameterize:
            self.key_value = nn.Parameter(self.gate.new_empty(num_tokens, 2 * self.width).normal_())
            self.mlp = None
            return
        self.key_value = None
        hidden = hidden or self.width
        self.embedding = nn.Parameter(self.gate.new_empty(num_tokens, self.width).normal_())
        self.mlp = nn.Sequential(
            nn.Linear(self.width, hidden), nn.Tanh(), nn.Linear(hidden, 2 * self.width)
        ).to(self.gate)

    def prefix_key_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        key_value = self.key_value if self.mlp is None else self.mlp(self.embedding)
        return key_value.chunk(2, dim=-1)

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the MLP and its input by the prefix they produce (after training)."""
        if self.mlp is None:
            return
        key_value = self.mlp(self.embedding)
        del self.mlp, self.embedding
        self.mlp = None
        self.key_value = nn.Parameter(key_value)


def fold_prefixes(model: nn.Module) -> nn.Module:
    """Fold every reparameterised prefix of `model` (in place; outputs unchanged)."""
    for module in model.modules():
        if isinstance(module, PrefixAttention):
            module.fold()
    return model


def wrap_attention(host: nn.Module, layers: str,
                   make: Callable[[nn.Module], GatedPrefixAttention]) -> None:
    """Replace the self-attention of each chosen layer of `host` by `make(module)`."""
    pattern = getattr(host, "attention_modules", None)
    if not pattern:
        raise ValueError(
            f"{type(host).__name__} declares no `attention_modules` (where its self-attention "
            "modules are), so prefix and prompt adapters cannot attach to it; choose another "
            "adapter method or --adapt component"
        )
    for index in parse_layers(layers, num_layers(host)):
        path = pattern.format(i=index)
        replace_submodule(host, path, make(host.get_submodule(path)))


@register_adapter("prefix", PrefixConfig)
class PrefixInjector:
    def inject(self, host: nn.Module, config: PrefixConfig) -> None:
        wrap_attention(host, config.layers, lambda module: PrefixAttention(
            module, config.num_virtual_tokens, config.reparameterize,
            config.reparameterize_hidden))


def _is_attention(module: nn.Module) -> bool:
    """A self-attention module of a known layout (possibly inside another adapter)."""
    return any(all(hasattr(module, name) for name in names) for names in PROJECTIONS)


def linear_of(module: nn.Module) -> nn.Linear:
    """The nn.Linear of a projection (itself, or the one an adapter such as LoRA wraps)."""
    return next(m for m in module.modules() if isinstance(m, nn.Linear))
