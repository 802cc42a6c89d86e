"""Parameter-efficient adapters, one module per method, registered by name.

    model = get_adapted_model(model, HoulsbyConfig(layers="top:1", sites=("ffn",)))
    print(format_trainable_share(model))

Backbones declare where adapters may attach (`adapter_sites`, e.g.
`pretraining.sasrec.SASRec.adapter_sites`) and which Linear layers LoRA targets
(`lora_targets`). Implemented: `houlsby`, `pfeiffer`, `lora`.
"""

from adapters.base import (
    ADAPTERS,
    EXTRAS,
    AdapterLayer,
    format_trainable_share,
    freeze_except_adapters,
    get_adapted_model,
    register_adapter,
    trainable_share,
)
from adapters.houlsby import Bottleneck, BottleneckSite, HoulsbyConfig, PfeifferConfig
from adapters.lora import LoRAConfig, LoRALinear
from adapters.placement import parse_layers, parse_sites

__all__ = [
    "ADAPTERS",
    "EXTRAS",
    "AdapterLayer",
    "Bottleneck",
    "BottleneckSite",
    "HoulsbyConfig",
    "LoRAConfig",
    "LoRALinear",
    "PfeifferConfig",
    "format_trainable_share",
    "freeze_except_adapters",
    "get_adapted_model",
    "parse_layers",
    "parse_sites",
    "register_adapter",
    "trainable_share",
]
