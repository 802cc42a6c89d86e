"""The adapter registry, one call to apply a method, freezing and the trainable share.

A method is a config dataclass (subclass of `AdapterConfig`, which holds the placement
shared by every method) and an injector class, registered under a lowercase name:

    @register_adapter("houlsby", HoulsbyConfig)
    class HoulsbyInjector:
        def inject(self, host: nn.Module, config) -> None: ...

`get_adapted_model(model, config)` finds the modules that declare `adapter_sites` in the
component `config.adapt` names (`backbone`, `item_encoder` or `both`; the model itself if
it is such a host), runs the method's injector on each, then freezes everything not owned
by an adapter except the parameter groups named in `config.extras` (see `EXTRAS`).

Ownership: every adapter-owned module subclasses `AdapterLayer` or is one of peft's tuner
layers; its parameters are adapter parameters, except those under its `base` attribute
(peft's: `base_layer`), the wrapped pretrained module (e.g. `GatedPrefixAttention.base`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from torch import nn

from peftrec.adapters.placement import (
    LAYER_SPEC_HELP,
    check_known,
    check_layer_spec,
    parse_layers,
    parse_sites,
)

# name -> (config class, injector class)
ADAPTERS: dict[str, tuple[type, type]] = {}
# --adapt choices: which part of a recommender receives adapters.
COMPONENTS = ("backbone", "item_encoder", "both")

# What each trainable extra unfreezes, by module type or attribute name.
EXTRAS: dict[str, str] = {
    "layernorm": "parameters of nn.LayerNorm (and nn.RMSNorm) modules",
    "bias": "every parameter named `bias` (BitFit)",
    "embeddings": "parameters of nn.Embedding modules (item ID table, positions)",
    "projection": "parameters of modules named `projection` (content encoders' output head)",
}


@dataclass(frozen=True)
class AdapterConfig:
    """Placement and extras, the same for every method; methods subclass it."""

    # A field with help text is a flag of the adapter scripts (pretraining.cli).
    method: str = ""
    adapt: str = field(default="backbone", metadata={
        "choices": COMPONENTS, "help": "which part receives adapters"})
    layers: str = field(default="all", metadata={"help": LAYER_SPEC_HELP})
    extras: tuple[str, ...] = field(default=(), metadata={  # keys of EXTRAS
        "flag": "tune", "metavar": "EXTRA[,EXTRA...]",
        "help": f"also train: comma-separated {list(EXTRAS)}"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "extras", tuple(self.extras))
        check_known((self.adapt,), COMPONENTS, "--adapt component", "choose one of")
        check_layer_spec(self.layers)
        check_known(self.extras, EXTRAS, "trainable extra(s)", "valid")

    def placement(self) -> tuple[str, ...]:
        """The site or module names this config places adapters at; empty: the host's
        defaults (every method that takes `sites` or `target_modules` overrides it)."""
        return ()

    def replace(self, **changes) -> AdapterConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class AdapterLayer(nn.Module):
    """Marker base class: a module whose parameters (outside `.base`) belong to an adapter."""


def register_adapter(name: str, config_class: type) -> Callable[[type], type]:
    """Class decorator: register an injector class and its config class under `name`."""

    def decorator(cls: type) -> type:
        if name in ADAPTERS and ADAPTERS[name] != (config_class, cls):
            raise ValueError(f"adapter method {name!r} is already registered")
        ADAPTERS[name] = (config_class, cls)
        return cls

    return decorator


def adapter_config_from_dict(values: dict) -> AdapterConfig:
    """Rebuild a method's config from `AdapterConfig.to_dict()` output (e.g. a JSON file)."""
    values = dict(values)
    method = values.get("method")
    config_class, _ = _registered(method)
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown settings {unknown} for adapter method {method!r}")
    for name, value in values.items():
        if isinstance(value, list):  # JSON has no tuples
            values[name] = tuple(value)
    return config_class(**values)


def get_adapted_model(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Inject the adapter `config` describes into `model` (in place) and freeze the rest.

    Returns `model`. Adapter layers are created on the device/dtype of the layers they
    attach to.
    """
    _, injector_cls = _registered(config.method)
    injector = injector_cls()
    # A method that also adapts per-item tables (LoRA) does them first; a component
    # holding only a table (an ID item encoder) then needs no layers.
    tables = injector.inject_tables(model, config) if adapts_item_tables(config) else []
    for host in adapter_hosts(model, config.adapt, required=not tables):
        injector.inject(host, config)
    freeze_except_adapters(model, extras=config.extras)
    return model


def adapts_item_tables(config: AdapterConfig) -> bool:
    """Whether `config`'s method can adapt per-item tables (an ID item table), not only
    layers: its injector has `inject_tables(model, config)` (LoRA's)."""
    return hasattr(_registered(config.method)[1], "inject_tables")


def lookup_tables(model: nn.Module, adapt: str = "both") -> list[tuple[nn.Module, str]]:
    """(owner, attribute) of every lookup table within the component `adapt` that LoRA may
    adapt: the per-item nn.Embedding tables that modules declare in `catalog_parameters`
    (an ID item encoder's `embedding`, a content + ID encoder's `id_embedding`), and the
    tables they declare in `vocabulary_tables` (a text encoder's word-piece vectors, an
    nn.EmbeddingBag indexed by the tokenizer), where the module has built them."""
    check_known((adapt,), COMPONENTS, "--adapt component", "choose one of")
    tables = []
    for name, module in model.named_modules():
        inside = adapt == "both" or name == adapt or name.startswith(adapt + ".")
        if module is not model and not inside:
            continue
        for parameter in getattr(module, "catalog_parameters", ()):
            attribute, _, kind = parameter.rpartition(".")
            if kind == "weight" and isinstance(getattr(module, attribute, None), nn.Embedding):
                tables.append((module, attribute))
        for attribute in getattr(module, "vocabulary_tables", ()):
            if isinstance(getattr(module, attribute, None), nn.EmbeddingBag):
                tables.append((module, attribute))
    return tables


def _registered(method: str | None) -> tuple[type, type]:
    if method not in ADAPTERS:
        raise ValueError(
            f"unknown adapter method {method!r}; registered: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[method]


def adapter_hosts(model: nn.Module, adapt: str = "both", required: bool = True
                  ) -> list[nn.Module]:
    """`model` if it declares `adapter_sites`, else its outermost submodules that do,
    within the component `adapt` (the submodule of that name; `both`: anywhere).
    `required`: none is an error."""
    check_known((adapt,), COMPONENTS, "--adapt component", "choose one of")
    if _declares_sites(model):
        return [model]
    hosts: list[nn.Module] = []
    prefixes: list[str] = []
    for name, module in model.named_modules():
        inside = adapt == "both" or name == adapt or name.startswith(adapt + ".")
        if (inside and _declares_sites(module)
                and not any(name.startswith(p + ".") for p in prefixes)):
            hosts.append(module)
            prefixes.append(name)
    if not hosts and required:
        where = type(model).__name__
        if adapt != "both":
            where = f"the {adapt} of {where}"
        raise ValueError(
            f"{where} has no layers to adapt: no module there declares `adapter_sites` "
            "(an ID item table has none); choose another --adapt component"
        )
    return hosts


def _declares_sites(module: nn.Module) -> bool:
    return isinstance(getattr(module, "adapter_sites", None), dict)


def num_layers(host: nn.Module, adapter_sites: dict[str, str] | None = None) -> int:
    """How many layers the host has: the count of consecutive `{i}` that resolve; a host
    whose site patterns have no `{i}` (a content encoder's output head) is one layer.
    `adapter_sites`: site patterns other than the host's own (default `host.adapter_sites`)."""
    patterns = list((adapter_sites or host.adapter_sites).values())
    if not any("{i}" in p for p in patterns):
        return 1
    count = 0
    while any(_has_submodule(host, p.format(i=count)) for p in patterns):
        count += 1
    return count


def layer_path(host: nn.Module, index: int) -> str:
    """The module path of layer `index`: a site pattern cut just after `{i}`."""
    pattern = next(iter(host.adapter_sites.values()))
    head, marker, _ = pattern.partition("{i}")
    return f"{head}{index}" if marker else pattern


def select_sites(host: nn.Module, layers: str, sites: Iterable[str],
                 adapter_sites: dict[str, str] | None = None) -> list[tuple[int, str]]:
    """(layer index, module path) of every chosen site in the chosen layers, of
    `adapter_sites` (default: the host's own `adapter_sites`)."""
    adapter_sites = adapter_sites or host.adapter_sites
    site_names = parse_sites(tuple(sites), valid=adapter_sites)
    indices = parse_layers(layers, num_layers(host, adapter_sites))
    return [(i, adapter_sites[s].format(i=i)) for i in indices for s in site_names]


def replace_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, new)


def adapter_parameter_ids(model: nn.Module) -> set[int]:
    """ids of adapter-owned parameters: those of our `AdapterLayer`s and of peft's tuner
    layers (LoRA A and B, ...), except the wrapped pretrained module's."""
    owned: set[int] = set()
    for module in model.modules():
        wrapped = _wrapped_module_name(module)
        if wrapped is not None:
            owned.update(
                id(p) for name, p in module.named_parameters()
                if not name.startswith(wrapped + ".")
            )
    return owned


def _wrapped_module_name(module: nn.Module) -> str | None:
    """The attribute holding the pretrained module an adapter layer wraps (ours: `base`,
    peft's: `base_layer`); None if `module` is no adapter layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer  # lazy: importing peft is slow

    if isinstance(module, AdapterLayer):
        return "base"
    if isinstance(module, BaseTunerLayer):
        return "base_layer"
    return None


def current_parameter_name(model: nn.Module, name: str) -> str:
    """Parameter `name` as `model` names it now: an adapter layer that wraps the module
    holding it (peft's LoRA on an item table) moves `x.weight` to `x.base_layer.weight`."""
    owner, _, attribute = name.rpartition(".")
    wrapped = _wrapped_module_name(model.get_submodule(owner))
    return f"{owner}.{wrapped}.{attribute}" if wrapped and owner else name


def extra_parameter_ids(model: nn.Module, extras: Iterable[str]) -> set[int]:
    extras = tuple(extras)
    check_known(extras, EXTRAS, "trainable extra(s)", "valid")
    norm_types = tuple(t for t in (nn.LayerNorm, getattr(nn, "RMSNorm", None)) if t)
    ids: set[int] = set()
    for module_name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if "layernorm" in extras and isinstance(module, norm_types):
            ids.update(id(p) for _, p in own)
        if "embeddings" in extras and isinstance(module, nn.Embedding):
            ids.update(id(p) for _, p in own)
        if "bias" in extras:
            ids.update(id(p) for name, p in own if name == "bias")
        if "projection" in extras and module_name.rpartition(".")[2] == "projection":
            ids.update(id(p) for p in module.parameters())
    return ids


def freeze_except_adapters(model: nn.Module, extras: Iterable[str] = ()) -> nn.Module:
    """Set requires_grad=False on every parameter not owned by an adapter, except the
    groups named in `extras` (keys of `EXTRAS`). Returns `model`."""
    keep = adapter_parameter_ids(model) | extra_parameter_ids(model, extras)
    for param in model.parameters():
        param.requires_grad_(id(param) in keep)
    return model


def _has_submodule(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True
