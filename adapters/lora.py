"""LoRA (Hu et al., 2021): a low-rank update added to existing layers, through `peft`.

peft's LoRA layers go on every layer chosen here: the Linear layers of SASRec and DiffRec
blocks, of a content encoder's output head and of a `transformers` encoder, and the
per-item tables (`nn.Embedding`: an ID model's item table, a content + ID model's ID
part), and a text encoder's word-piece table (`--token-vectors`, an `nn.EmbeddingBag`,
through `lora_embedding_bag.py`) when a target names it. peft keeps the pretrained layer
(as `base_layer`, never re-initialised) and adds `dropout(x) @ A^T @ B^T * alpha / rank`
with B zero (a table's A is zero instead), so the output is unchanged at injection;
`merge()` folds the update into the weight.

Placement is decided here and peft receives the exact module names, so one rule decides
where LoRA goes: the chosen layers' Linear modules whose names end with one of
`target_modules` (default: the model's `lora_targets`), and the tables they name (default:
those their owner lists in `lora_targets`, as the ID item encoder does). A host that wraps
a `transformers` model as `.model` (the content encoders' `TransformerStages`) gets its
layers named under that model, so its LoRA state dict is peft's own.

Every layer peft reaches is a plain `nn.Linear`, `nn.Embedding` or `nn.EmbeddingBag` (no
fused projection such as a QKV matrix), so loralib's `MergedLinear` has nothing to adapt
and loralib is no dependency.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Container
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from peftrec.adapters.base import (
    AdapterConfig,
    AdapterLayer,
    layer_path,
    lookup_tables,
    num_layers,
    register_adapter,
)
from peftrec.adapters.placement import parse_layers

ADAPTER_NAME = "default"  # peft's name for a model's one adapter (`lora_A.default`)
PEFT_FOLDER = "peft"  # in an adapter checkpoint: a peft adapter folder per transformers model
PEFT_MODEL_PREFIX = "base_model.model."  # how a PeftModel names the model it wraps


@dataclass(frozen=True)
class LoRAConfig(AdapterConfig):
    # A field with help text is a flag of the adapter scripts (pretraining.cli).
    method: str = "lora"
    rank: int = field(default=8, metadata={"help": "rank r of the low-rank update"})
    alpha: float = field(default=16, metadata={"help": "the update is scaled by alpha / rank"})
    dropout: float = field(default=0.0, metadata={
        "help": "dropout on the LoRA branch's input only"})
    target_modules: tuple[str, ...] | None = field(default=None, metadata={
        "help": "Linear layers to adapt, comma-separated module names (unset: the model's "
        "own list, its `lora_targets`)"})
    rank_pattern: tuple[str, ...] | None = field(default=None, metadata={
        "help": "other ranks for some of the adapted layers, comma-separated NAME=RANK "
        "(e.g. fc1=2,fc2=2: those layers at rank 2, the rest at --rank); alpha scales with "
        "the rank, so every layer's update keeps the scale alpha / rank"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_modules is not None:
            targets = self.target_modules
            if isinstance(targets, str):
                targets = targets.split(",")
            targets = tuple(t.strip() for t in targets)
            if not targets or not all(targets):
                raise ValueError(f"malformed target_modules {self.target_modules!r}")
            object.__setattr__(self, "target_modules", targets)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {self.rank!r}")
        if self.rank_pattern is not None:
            object.__setattr__(self, "rank_pattern", _parse_rank_pattern(self.rank_pattern))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def placement(self) -> tuple[str, ...]:
        return self.target_modules or ()


@register_adapter("lora", LoRAConfig)
class LoRAInjector:
    def __init__(self) -> None:
        self.table_names: set[str] = set()  # the tables `inject_tables` adapted

    def inject_tables(self, model: nn.Module, config: LoRAConfig) -> list[str]:
        """peft's LoRA on the lookup tables (`lookup_tables`: per-item tables, a word-piece
        table) of the component `config.adapt` that the targets name (unset: those the
        table's owner lists in its `lora_targets`, as the ID item encoder does); returns
        their attribute names."""
        adapted = []
        for owner, table in lookup_tables(model, config.adapt):
            targets = config.target_modules or getattr(owner, "lora_targets", None) or ()
            if table in targets:
                _inject_peft(owner, [table], config)
                adapted.append(table)
        self.table_names.update(adapted)
        return adapted

    def inject(self, host: nn.Module, config: LoRAConfig) -> None:
        if config.target_modules:
            # Targets that named item tables were used by `inject_tables`.
            layer_targets = tuple(t for t in config.target_modules if t not in self.table_names)
            if not layer_targets:
                return
            config = config.replace(target_modules=layer_targets)
        paths = target_paths(host, config)
        model = getattr(host, "model", None)
        if _is_transformers_model(model):
            # The host's module paths start with `model.`; peft sees names under `model`.
            _inject_peft(model, [path.removeprefix("model.") for path in paths], config)
            return
        # peft draws A from the global RNG in its own order (its layers' constructors draw
        # A and B, then A again); drawn here, one A per layer in placement order, as the
        # hand-written layer that peft replaced did, a fixed-seed run stays what it was.
        with torch.random.fork_rng(devices=[]):
            _inject_peft(host, paths, config)
        for path in paths:
            lora_A = host.get_submodule(path).lora_A[ADAPTER_NAME]
            nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))


def save_peft_adapters(model: nn.Module, directory: str | Path,
                       state_dict: dict[str, torch.Tensor] | None = None) -> list[Path]:
    """Write the LoRA of every `transformers` model inside `model` (a content encoder's) as
    a peft adapter folder, `directory/peft/<its module path>`, which plain peft loads:

        encoder = PeftModel.from_pretrained(AutoModel.from_pretrained(ENCODER),
                                            "runs/x/best_model/peft/item_encoder.encoder.model")

    `state_dict`: the model's (gathered under FSDP/DeepSpeed; default `model.state_dict()`).
    Returns the folders written."""
    from peft import get_peft_model_state_dict
    from peft.utils import SAFETENSORS_WEIGHTS_NAME

    from peftrec.dataset_tools import atomic_directory  # lazy: only a checkpoint's writer needs it

    state = model.state_dict() if state_dict is None else state_dict
    folders = []
    for path, module in model.named_modules():
        if not (_is_transformers_model(module)
                and ADAPTER_NAME in getattr(module, "peft_config", {})):
            continue
        prefix = f"{path}." if path else ""
        own = {name.removeprefix(prefix): tensor for name, tensor in state.items()
               if name.startswith(prefix)}
        tensors = get_peft_model_state_dict(module, state_dict=own, adapter_name=ADAPTER_NAME)
        config = dataclasses.replace(module.peft_config[ADAPTER_NAME], inference_mode=True,
                                     base_model_name_or_path=module.name_or_path)
        folder = Path(directory) / PEFT_FOLDER / (path or "model")
        with atomic_directory(folder) as tmp:
            config.save_pretrained(str(tmp))
            save_file({PEFT_MODEL_PREFIX + name: tensor.detach().contiguous()
                       for name, tensor in tensors.items()},
                      str(tmp / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
        folders.append(folder)
    return folders


def peft_tensor_name(name: str, parameters: Container[str]) -> str:
    """`name` from an adapter checkpoint written before LoRA came from peft, by peftrec's
    own LoRA layer (`x.lora_A`, `x.base.bias`), as peft names it (`x.lora_A.default.weight`,
    `x.base_layer.bias`) where `parameters` (the model's) has that; otherwise `name`."""
    renamed = re.sub(r"\.lora_([AB])$", rf".lora_\1.{ADAPTER_NAME}.weight", name)
    renamed = renamed.replace(".base.", ".base_layer.")
    return renamed if name not in parameters and renamed in parameters else name


def target_paths(host: nn.Module, config: LoRAConfig) -> list[str]:
    """Module paths (under `host`) of the Linear layers LoRA adapts: those in the chosen
    layers whose names end with one of the targets, and every one inside a layer that a
    target names itself (a content encoder's output head, `projection`, whichever Linear
    layers the head holds)."""
    model_type = getattr(host, "model_type", None) or type(host).__name__
    targets = config.target_modules or getattr(host, "lora_targets", None)
    if not targets:
        raise ValueError(
            f"no known LoRA target modules for model type {model_type!r}; pass "
            "--target-modules with the names of its Linear layers (e.g. query,value)"
        )
    paths: list[str] = []
    linears: list[str] = []  # every Linear of the chosen layers, for the error message
    for index in parse_layers(config.layers, num_layers(host)):
        prefix = layer_path(host, index)
        layer = host.get_submodule(prefix)
        whole = any(prefix == t or prefix.endswith("." + t) for t in targets)
        for name, module in layer.named_modules():
            if not isinstance(module, nn.Linear) or _inside_adapter(layer, name):
                continue
            # The layer itself may be the Linear (a content encoder's output head).
            path = f"{prefix}.{name}" if name else prefix
            linears.append(name or prefix)
            if whole or any(path == t or path.endswith("." + t) for t in targets):
                paths.append(path)
    if not paths:
        raise ValueError(
            f"no nn.Linear in the chosen layers ({config.layers}) of {model_type!r} matches "
            f"target_modules {tuple(targets)}; its layers hold: "
            f"{', '.join(dict.fromkeys(linears)) or 'no nn.Linear'}"
        )
    return paths


def _is_transformers_model(module: nn.Module | None) -> bool:
    from transformers import PreTrainedModel  # lazy: SASRec/DiffRec hosts do not need it

    return isinstance(module, PreTrainedModel)


def _inject_peft(model: nn.Module, names: list[str], config: LoRAConfig) -> None:
    """peft LoRA layers on exactly the modules `names` (full names under `model`)."""
    from peft import LoraConfig, inject_adapter_in_model

    # peft matches a pattern against the end of a module's name, as target_modules does;
    # only the patterns of this call's modules go to peft (it warns of the others).
    ranks = {pattern: rank for pattern, rank in
             (entry.split("=") for entry in config.rank_pattern or ())
             if any(name == pattern or name.endswith("." + pattern) for name in names)}
    peft_config = LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
        target_modules=names,
        rank_pattern={name: int(rank) for name, rank in ranks.items()},
        alpha_pattern={name: config.alpha * int(rank) / config.rank
                       for name, rank in ranks.items()})
    if any(isinstance(model.get_submodule(name), nn.EmbeddingBag) for name in names):
        from peftrec.adapters.lora_embedding_bag import LoraEmbeddingBag  # lazy, as peft is

        peft_config._register_custom_module({nn.EmbeddingBag: LoraEmbeddingBag})
    with warnings.catch_warnings():
        # A component with a table and layers (a text encoder's word pieces and head) gets
        # one peft injection for each, on purpose; peft warns at the second.
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(peft_config, model, adapter_name=ADAPTER_NAME)


def _parse_rank_pattern(pattern: str | tuple[str, ...]) -> tuple[str, ...]:
    """`fc1=2,fc2=2` (or its entries) as a tuple of checked `NAME=RANK` entries."""
    entries = pattern.split(",") if isinstance(pattern, str) else pattern
    parsed = []
    for entry in entries:
        name, _, rank = entry.strip().partition("=")
        if not name or not rank.isdigit() or int(rank) < 1:
            raise ValueError(f"malformed rank_pattern entry {entry!r}: expected NAME=RANK with "
                             "a module name and a rank >= 1, e.g. fc1=2")
        parsed.append(f"{name.strip()}={int(rank)}")
    return tuple(parsed)


def _inside_adapter(root: nn.Module, name: str) -> bool:
    """True if module `name` lies inside an adapter's own modules (e.g. a bottleneck)."""
    parts = name.split(".")
    module = root
    for part in parts[:-1]:
        module = getattr(module, part)
        if isinstance(module, AdapterLayer):
            return True
    return False
