"""Diffusion-step adapters: bottlenecks in the denoiser modulated by the diffusion step.

A diffusion backbone (DiffRec) denoises every noise level n with one network, told the
level only through the step embedding z_n added to its input. This adapter lets each
level be adapted differently: a bottleneck at each chosen site whose hidden activations
are scaled and shifted by a linear map of z_n (as in FiLM / adaLN): for the site's
output y,

    h = act(down(y));  h = h * (1 + scale(z_n)) + shift(z_n);  out = y + up(h)

on the positions that carry the step (the noised ones); the others (the history) get
the plain bottleneck, as they get no step embedding in the backbone either. `up` and the
scale / shift map start at zero, so a freshly injected adapter is the identity.

The bottleneck wraps each site's output projection (its last nn.Linear, whose output is
the site's output) rather than the site: DiffRec's history-caching inference calls the
attention's projections directly, and so runs through the adapter too. The layers read
z_n from the backbone's `step_context`, and refuse to run outside the denoiser's forward
pass, where it holds no step. What a backbone provides for these adapters is
`DiffusionStepHost`, defined here so that backbones follow the adapters' contract. A host
whose denoising layers are not its `adapter_sites` (DreamRec: adapters in its history
encoder, the step read by an MLP after it) names them in `step_adapter_sites`.

`step_mlp_only` instead tunes the backbone's step-embedding MLP (`step_mlp`) alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from peftrec.adapters.base import (
    AdapterConfig,
    AdapterLayer,
    register_adapter,
    replace_submodule,
    select_sites,
)
from peftrec.adapters.houlsby import HOULSBY_FIELDS, Bottleneck, BottleneckSite, HoulsbyConfig
from peftrec.adapters.placement import parse_sites


@dataclass
class StepContext:
    """The step embedding [B, 1, d], or [B, noised, d] with a step per position
    (the output of the host's `step_mlp`), of the rows the host's layers are denoising.

    `active` only while the denoiser's layers run (the host enters `use` around them): on
    noised positions, the last `noised` positions of the layers' input, or on positions
    that carry no step (e.g. DiffRec's history cache: no embedding, `noised` 0). Outside,
    a layer conditioned on the step has none to read: e.g. a recompute by activation
    checkpointing in the backward pass, after the forward pass cleared the context.
    """

    embedding: torch.Tensor | None = None
    noised: int = 0
    active: bool = False

    @contextmanager
    def use(self, embedding: torch.Tensor | None, noised: int) -> Iterator[None]:
        self.embedding, self.noised, self.active = embedding, noised, True
        try:
            yield
        finally:  # do not keep the tensor (and its graph) alive past the forward pass
            self.embedding, self.noised, self.active = None, 0, False


class DiffusionStepHost(Protocol):
    """A diffusion backbone that `diffusion_step` adapters can go into: besides the
    `adapter_sites` of every host, a `step_context` it fills while its layers denoise, the
    `step_mlp` that makes the step embedding (tuned alone with `step_mlp_only`), and
    `config.hidden_size`, the width of that embedding. Optional: `step_adapter_sites`,
    sites as `adapter_sites` names them, where the bottlenecks go instead (the layers that
    run inside `step_context`)."""

    step_context: StepContext
    step_mlp: nn.Module
    config: Any


@dataclass(frozen=True)
class DiffusionStepConfig(AdapterConfig):
    # The bottleneck's settings are Houlsby's (their help and choices too).
    method: str = "diffusion_step"
    sites: tuple[str, ...] = field(default=("attn", "ffn"),
                                   metadata=HOULSBY_FIELDS["sites"].metadata)
    reduction_factor: int = field(default=16,
                                  metadata=HOULSBY_FIELDS["reduction_factor"].metadata)
    non_linearity: str = field(default="swish", metadata=HOULSBY_FIELDS["non_linearity"].metadata)
    step_mlp_only: bool = field(default=False, metadata={
        "help": "tune only the step-embedding MLP: no bottlenecks (--sites unused)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adapt != "backbone":
            raise ValueError(f"diffusion_step adapters go in the denoiser, not the "
                             f"{self.adapt}; use --adapt backbone")
        object.__setattr__(self, "sites", parse_sites(self.sites))
        # The bottleneck's settings are Houlsby's: its config checks them.
        HoulsbyConfig(reduction_factor=self.reduction_factor, non_linearity=self.non_linearity)

    def placement(self) -> tuple[str, ...]:
        return self.sites


class StepModulatedBottleneck(Bottleneck):
    """A bottleneck whose hidden activations are scaled and shifted by the step embedding.

    `context` is the backbone's `StepContext` (shared, not owned): while the denoiser runs,
    its `embedding` [B, 1, d] (or [B, noised, d]: a step per position) belongs to the rows
    of the input, and its last `noised` positions carry the step.
    """

    def __init__(self, context: StepContext, features: int, bottleneck_size: int, step_dim: int,
                 non_linearity: str = "swish") -> None:
        super().__init__(features, features, bottleneck_size, non_linearity)
        self.context = context
        self.modulation = nn.Linear(step_dim, 2 * bottleneck_size)  # -> (scale, shift)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.context.active:  # an empty context would silently drop the modulation
            raise RuntimeError(
                "a diffusion_step adapter ran outside the denoiser's forward pass, with no "
                "diffusion step to read (e.g. a recompute by activation checkpointing); run "
                "the denoiser through DiffRec's methods, without activation checkpointing")
        h = self.activation(self.down(x))
        noised = self.context.noised
        if noised:
            step = self.context.embedding.to(h.dtype)
            scale, shift = self.modulation(step).chunk(2, dim=-1)  # [B, 1 or noised, b]
            h = torch.cat([h[:, :-noised], h[:, -noised:] * (1 + scale) + shift], dim=1)
        return self.up(h)


class TrainableStepMLP(AdapterLayer):
    """The backbone's step-embedding MLP, unchanged; wrapping it in an `AdapterLayer` makes
    its parameters adapter parameters, so freezing leaves them trainable."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.mlp(z)


@register_adapter("diffusion_step", DiffusionStepConfig)
class DiffusionStepInjector:
    def inject(self, host: DiffusionStepHost, config: DiffusionStepConfig) -> None:
        context = getattr(host, "step_context", None)
        if context is None:
            raise ValueError(f"diffusion_step adapters need a diffusion backbone (diffrec, "
                             f"diffurec, adrec, dreamrec); {type(host).__name__} has no "
                             "diffusion step: choose houlsby, lora or prefix")
        if config.step_mlp_only:
            host.step_mlp = TrainableStepMLP(host.step_mlp)
            return
        sites = getattr(host, "step_adapter_sites", host.adapter_sites)
        for _, path in select_sites(host, config.layers, config.sites, sites):
            name, projection = _output_projection(host.get_submodule(path), path)
            size = max(1, projection.out_features // config.reduction_factor)
            adapter = StepModulatedBottleneck(context, projection.out_features, size,
                                              host.config.hidden_size, config.non_linearity)
            adapter.to(device=projection.weight.device, dtype=projection.weight.dtype)
            replace_submodule(host, name, BottleneckSite(projection, adapter, parallel=False))


def _output_projection(site: nn.Module, path: str) -> tuple[str, nn.Linear]:
    """The module path and module of the site's last nn.Linear."""
    linears = [(name, m) for name, m in site.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"site {path!r} holds no nn.Linear to attach to")
    name, projection = linears[-1]
    return f"{path}.{name}" if name else path, projection
