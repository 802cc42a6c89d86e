"""Output heads of the content item encoders: pooled encoder output [N, H] -> item vector [N, d].

A head sits above the (cached) pooled outputs of a text or image encoder, under the
module name `projection` (`HEAD_SITE`): the adapter site of a frozen encoder, the LoRA
target `projection` (every nn.Linear inside the head) and the `--tune projection` extra
(every parameter of the head). Heads are registered by name (`--item-head`):

- `linear`: one affine map, the original head (an `nn.Linear`, so checkpoints holding
  `projection.weight` / `projection.bias` load unchanged).
- `mlp`: `shortcut(x) + fc2(dropout(gelu(fc1(x))))`. The encoder width H rarely equals the
  backbone width d, so the residual is a learned linear shortcut (the linear head) and the
  two-layer branch adds a non-linear correction to it: the head can always fall back to
  the linear one. Width `head_hidden_size` (default: H).
- `moe`: UniSRec's MoE adaptor (Hou et al., KDD 2022): n experts, each a parametric
  whitening `W_k (dropout(x) - b_k)` (learned centre b_k of size H, no bias on W_k), mixed
  by a softmax gate over `x @ w_gate` (zero at start: every expert weighs 1/n).

`HEAD_SETTINGS` lists the settings of every head, the flag that sets each and its "not
given" value; a setting given to a head that does not take it is an error naming the flag.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

DEFAULT_HEAD = "linear"
DEFAULT_EXPERTS = 8
# setting -> (its flag, its value when not given)
HEAD_SETTINGS: dict[str, tuple[str, object]] = {
    "head_hidden_size": ("--head-hidden-size", None),
    "num_experts": ("--num-experts", None),
    "head_dropout": ("--head-dropout", 0.0),
    "moe_noise": ("--moe-noise", False),
}
HEADS: dict[str, type[nn.Module]] = {}


def register_head(name: str):
    """Class decorator adding a head to `HEADS`; the class lists its `settings` (keys of
    `HEAD_SETTINGS`) and takes them as keyword arguments after (in_features, out_features)."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        HEADS[name] = cls
        return cls

    return wrap


def check_head_settings(head: str, values: dict) -> None:
    """Raise ValueError naming the flag of a bad head setting (`values`: setting -> value)."""
    if head not in HEADS:
        raise ValueError(f"unknown item head {head!r} (--item-head); choose one of "
                         f"{', '.join(HEADS)}")
    own = HEADS[head].settings
    for name, (flag, unset) in HEAD_SETTINGS.items():
        value = values.get(name, unset)
        if name not in own and value != unset:
            owners = "/".join(h for h, cls in HEADS.items() if name in cls.settings)
            given = flag if isinstance(value, bool) else f"{flag} {value}"
            raise ValueError(f"{given}: a setting of --item-head {owners}, not of "
                             f"--item-head {head}; drop it or choose that head")
    experts, width = values.get("num_experts"), values.get("head_hidden_size")
    if experts is not None and (isinstance(experts, bool) or not isinstance(experts, int)
                                or experts < 1):
        raise ValueError(f"--num-experts must be an int >= 1 (experts of --item-head {head}), "
                         f"got {experts!r}")
    if width is not None and (isinstance(width, bool) or not isinstance(width, int)
                              or width < 1):
        raise ValueError(f"--head-hidden-size must be an int >= 1, got {width!r}")
    dropout = values.get("head_dropout", 0.0)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"--head-dropout must be in [0, 1), got {dropout}")


def build_head(head: str, in_features: int, out_features: int, values: dict) -> nn.Module:
    """The head `head` from encoder width `in_features` to `out_features`, with its own
    settings taken from `values` (unset ones at the head's defaults)."""
    check_head_settings(head, values)
    cls = HEADS[head]
    settings = {name: values[name] for name in cls.settings if values.get(name) is not None}
    return cls(in_features, out_features, **settings)


def head_shapes(head: str, in_features: int, out_features: int,
                values: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the head's tensors (built on the meta device: no memory)."""
    with torch.device("meta"):
        module = build_head(head, in_features, out_features, values)
    return {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}


@register_head("linear")
class LinearHead(nn.Linear):
    """The original head: one affine map (state dict `weight`, `bias`)."""

    settings: tuple[str, ...] = ()

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)


@register_head("mlp")
class MLPHead(nn.Module):
    """`shortcut(x) + fc2(dropout(gelu(fc1(x))))`: a linear head plus a non-linear branch."""

    settings = ("head_hidden_size", "head_dropout")

    def __init__(self, in_features: int, out_features: int, head_hidden_size: int | None = None,
                 head_dropout: float = 0.0) -> None:
        super().__init__()
        width = head_hidden_size or in_features
        # Registration order matters to adapters that read the head's width from its
        # Linear layers: the first takes the encoder width, the last gives the output.
        self.shortcut = nn.Linear(in_features, out_features)
        self.fc1 = nn.Linear(in_features, width)
        self.activation = nn.GELU()
        self.dropout = nn.Dropout(head_dropout)
        self.fc2 = nn.Linear(width, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.fc2(self.dropout(self.activation(self.fc1(x))))


class WhiteningExpert(nn.Module):
    """One parametric whitening map: `linear(dropout(x) - bias)`, no bias on the Linear."""

    def __init__(self, in_features: int, out_features: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.bias = nn.Parameter(torch.zeros(in_features))
        self.linear = nn.Linear(in_features, out_features, bias=False)
        nn.init.normal_(self.linear.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(x) - self.bias)


@register_head("moe")
class MoEHead(nn.Module):
    """A softmax-gated mixture of whitening experts: `sum_k gate_k(x) * expert_k(x)`.

    Noisy gating (`moe_noise`, off by default): in training only, the gate logits get
    Gaussian noise of a learned, input-dependent scale (softplus(x @ w_noise) + 0.01), as
    UniSRec does. It is off by default because without top-k routing it balances nothing
    (every expert runs on every item anyway), it only jitters the mixture; and because
    its scale starts at softplus(0) = 0.69, large next to logits that start at zero.
    """

    settings = ("num_experts", "head_dropout", "moe_noise")

    def __init__(self, in_features: int, out_features: int, num_experts: int = DEFAULT_EXPERTS,
                 head_dropout: float = 0.0, moe_noise: bool = False) -> None:
        super().__init__()
        self.experts = nn.ModuleList(WhiteningExpert(in_features, out_features, head_dropout)
                                     for _ in range(num_experts))
        # Plain parameters, not Linear layers: the Linear layers of the head are the
        # experts' (LoRA's `projection` target, and the widths adapters read).
        self.gate_weight = nn.Parameter(torch.zeros(in_features, num_experts))
        self.noise_weight = (nn.Parameter(torch.zeros(in_features, num_experts))
                             if moe_noise else None)

    def gate_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Each item's mixture weights over the experts: [..., num_experts], summing to 1."""
        logits = x @ self.gate_weight
        if self.noise_weight is not None and self.training:
            scale = F.softplus(x @ self.noise_weight) + 1e-2
            logits = logits + torch.randn_like(logits) * scale
        return logits.softmax(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = torch.stack([expert(x) for expert in self.experts], dim=-2)  # [..., n, d]
        return (self.gate_weights(x).unsqueeze(-1) * outputs).sum(-2)
