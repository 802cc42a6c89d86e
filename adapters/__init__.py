"""Parameter-efficient adapters, one module per method, registered by name.

    model = get_adapted_model(model, HoulsbyConfig(layers="top:1", sites=("ffn",)))
    print(format_trainable_share(model))

Backbones declare where adapters may attach (`adapter_sites`, e.g.
`pretraining.sasrec.SASRec.adapter_sites`) and which Linear layers LoRA targets
(`lora_targets`), and where their self-attention modules are (`attention_modules`, for
`prefix` and `prompt`). Implemented: `houlsby`, `pfeiffer`, `lora`, `diffusion_step`,
`prefix`, `prompt`.
"""

from peftrec.adapters.base import (
    ADAPTERS,
    EXTRAS,
    AdapterLayer,
    freeze_except_adapters,
    get_adapted_model,
    register_adapter,
)
from peftrec.adapters.diffusion_step import DiffusionStepConfig, StepModulatedBottleneck
from peftrec.adapters.houlsby import Bottleneck, BottleneckSite, HoulsbyConfig, PfeifferConfig
from peftrec.adapters.lora import LoRAConfig
from peftrec.adapters.placement import parse_layers, parse_sites
from peftrec.adapters.prefix import (
    GatedPrefixAttention,
    PrefixAttention,
    PrefixConfig,
    fold_prefixes,
)
from peftrec.adapters.prompt import PromptAttention, PromptConfig
from peftrec.dataset_tools.parameters import format_trainable_share, trainable_share

__all__ = [
    "ADAPTERS",
    "EXTRAS",
    "AdapterLayer",
    "Bottleneck",
    "BottleneckSite",
    "DiffusionStepConfig",
    "GatedPrefixAttention",
    "HoulsbyConfig",
    "LoRAConfig",
    "PfeifferConfig",
    "PrefixAttention",
    "PrefixConfig",
    "PromptAttention",
    "PromptConfig",
    "StepModulatedBottleneck",
    "fold_prefixes",
    "format_trainable_share",
    "freeze_except_adapters",
    "get_adapted_model",
    "parse_layers",
    "parse_sites",
    "register_adapter",
    "trainable_share",
]
