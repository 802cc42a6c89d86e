"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021).

A bottleneck (down to d / reduction_factor, non-linearity, up) is added with a residual
at each chosen site of each chosen layer:

- sequential: `out = site(x, ...); out + bottleneck(out)`
- parallel:   `out = site(x, ...); out + bottleneck(x)`

`up` starts at zero, so a freshly injected adapter leaves the model's outputs unchanged.
Houlsby = both sites (`attn`, `ffn`), swish; Pfeiffer = `ffn` only, relu.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import nn

from peftrec.adapters.base import (
    AdapterConfig,
    AdapterLayer,
    register_adapter,
    replace_submodule,
    select_sites,
)
from peftrec.adapters.placement import parse_sites

NON_LINEARITIES: dict[str, type[nn.Module]] = {"swish": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU}


@dataclass(frozen=True)
class HoulsbyConfig(AdapterConfig):
    # A field with help text is a flag of the adapter scripts (pretraining.cli).
    method: str = "houlsby"
    sites: tuple[str, ...] = field(default=("attn", "ffn"), metadata={
        "help": "where in each chosen layer, comma-separated names of the model's adapter "
        "sites: attn (after the attention output), ffn (after the feed-forward); projection "
        "(a content encoder's output head)"})
    reduction_factor: int = field(default=16, metadata={
        "help": "bottleneck width = hidden size // reduction factor (at least 1)"})
    non_linearity: str = field(default="swish", metadata={
        "choices": NON_LINEARITIES, "help": "the bottleneck's activation"})
    parallel: bool = field(default=False, metadata={
        "help": "add the bottleneck of the site's input instead of its output"})

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "sites", parse_sites(self.sites))
        if isinstance(self.reduction_factor, bool) or not isinstance(self.reduction_factor, int):
            raise ValueError(f"reduction_factor must be an int, got {self.reduction_factor!r}")
        if self.reduction_factor < 1:
            raise ValueError(f"reduction_factor must be >= 1, got {self.reduction_factor}")
        if self.non_linearity not in NON_LINEARITIES:
            raise ValueError(
                f"unknown non_linearity {self.non_linearity!r}; choose one of "
                f"{', '.join(NON_LINEARITIES)}"
            )

    def placement(self) -> tuple[str, ...]:
        return self.sites


HOULSBY_FIELDS = {setting.name: setting for setting in fields(HoulsbyConfig)}  # help, choices


@dataclass(frozen=True)
class PfeifferConfig(HoulsbyConfig):
    """Pfeiffer preset: one bottleneck after the feed-forward only, relu."""

    method: str = "pfeiffer"
    sites: tuple[str, ...] = field(default=("ffn",), metadata=HOULSBY_FIELDS["sites"].metadata)
    non_linearity: str = field(default="relu",
                               metadata=HOULSBY_FIELDS["non_linearity"].metadata)


class Bottleneck(AdapterLayer):
    """in_features -> bottleneck -> non-linearity -> out_features; `up` zero-initialised."""

    def __init__(self, in_features: int, out_features: int, bottleneck_size: int,
                 non_linearity: str = "swish") -> None:
        super().__init__()
        self.down = nn.Linear(in_features, bottleneck_size)
        self.activation = NON_LINEARITIES[non_linearity]()
        self.up = nn.Linear(bottleneck_size, out_features)
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.activation(self.down(x)))


class BottleneckSite(nn.Module):
    """Wraps a site module (kept as `.base`) and adds a bottleneck with a residual."""

    def __init__(self, base: nn.Module, adapter: Bottleneck, parallel: bool) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.parallel = parallel

    def forward(self, *args, **kwargs):
        out = self.base(*args, **kwargs)
        if self.parallel:
            if not args:
                raise ValueError("a parallel adapter needs the site's input as first positional")
            return out + self.adapter(args[0])
        return out + self.adapter(out)


@register_adapter("houlsby", HoulsbyConfig)
@register_adapter("pfeiffer", PfeifferConfig)
class HoulsbyInjector:
    def inject(self, host: nn.Module, config: HoulsbyConfig) -> None:
        for _, path in select_sites(host, config.layers, config.sites):
            site = host.get_submodule(path)
            linears = [m for m in site.modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise ValueError(
                    f"site {path!r} holds no nn.Linear to infer its width from"
                )
            first, last = linears[0], linears[-1]
            in_features = first.in_features if config.parallel else last.out_features
            size = max(1, last.out_features // config.reduction_factor)
            adapter = Bottleneck(in_features, last.out_features, size, config.non_linearity)
            adapter.to(device=last.weight.device, dtype=last.weight.dtype)
            replace_submodule(host, path, BottleneckSite(site, adapter, config.parallel))
