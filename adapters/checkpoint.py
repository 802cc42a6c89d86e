"""Adapter-only checkpoints: `adapter_config.json` + `adapter_model.safetensors`.

Only what fine-tuning trained is written: the parameters with `requires_grad` (adapter
layers, the extras named by `--tune`, and anything the caller left trainable, such as a
fresh item table for a new catalog). `adapter_config.json` records the adapter's config
and the fingerprint of the base checkpoint the adapter was trained on, so loading it onto
another base is refused rather than silently producing wrong scores.

    save_adapter(model, "runs/x/best_model", config, base_fingerprint)
    config, meta = read_adapter_config("runs/x/best_model")
    model = get_adapted_model(base_model, config)
    load_adapter_weights(model, "runs/x/best_model", base_fingerprint)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from peftrec.adapters.base import AdapterConfig, adapter_config_from_dict
from peftrec.adapters.lora import peft_tensor_name
from peftrec.dataset_tools.checkpoints import (
    CheckpointError,
    load_weights,
    read_json,
    save_checkpoint,
    verify_checkpoint,
)

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


class AdapterCheckpointError(CheckpointError):
    """An adapter checkpoint that is missing, malformed, or meant for another base model."""


def is_adapter_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / ADAPTER_CONFIG_NAME).is_file()


def save_adapter(
    model: nn.Module,
    directory: str | Path,
    config: AdapterConfig | None,
    base_fingerprint: str,
    metadata: dict | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    extra_files: dict[str, str] | None = None,
    write_more: Callable[[Path], object] | None = None,
) -> None:
    """Write the trainable parameters of `model` and the adapter config, atomically.

    `config` None means full fine-tuning (every parameter is written). `metadata` is
    stored beside the config (e.g. how to rebuild the base for the target dataset);
    `state_dict` is the gathered full state dict under FSDP/DeepSpeed; `extra_files`
    (name -> text) are written into the checkpoint folder with them, and `write_more(folder)`
    may write more files there (the peft copy of a LoRA): all are in its checksums, so
    loading the checkpoint refuses any of them damaged.
    """
    state = model.state_dict() if state_dict is None else state_dict
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    missing = [name for name in trainable if name not in state]
    if missing:
        raise AdapterCheckpointError(f"trainable parameters {missing[:3]} are not in the "
                                     "state dict; pass the model's full state dict")
    tensors = {name: state[name] for name in trainable}
    meta = {
        "adapter": None if config is None else config.to_dict(),
        "base_fingerprint": base_fingerprint,
        "parameters": sorted(tensors),
        **(metadata or {}),
    }
    save_checkpoint(directory, ADAPTER_WEIGHTS_NAME, tensors, {ADAPTER_CONFIG_NAME: meta},
                     extra_files, write_more)


def read_adapter_config(directory: str | Path) -> tuple[AdapterConfig | None, dict]:
    """(the adapter config or None for full fine-tuning, the whole adapter_config.json)."""
    directory = Path(directory)
    path = directory / ADAPTER_CONFIG_NAME
    if not path.is_file() or not (directory / ADAPTER_WEIGHTS_NAME).is_file():
        raise AdapterCheckpointError(
            f"{directory} is not an adapter checkpoint (needs {ADAPTER_CONFIG_NAME} and "
            f"{ADAPTER_WEIGHTS_NAME}); pass the best_model folder of a fine-tuning run"
        )
    try:
        verify_checkpoint(directory)
        meta = read_json(path)
    except CheckpointError as error:
        raise AdapterCheckpointError(str(error)) from None
    if "base_fingerprint" not in meta or "adapter" not in meta:
        raise AdapterCheckpointError(f"{path} lacks 'adapter' or 'base_fingerprint'")
    try:
        config = None if meta["adapter"] is None else adapter_config_from_dict(meta["adapter"])
    except (TypeError, ValueError) as error:
        raise AdapterCheckpointError(f"{path}: {error}") from None
    return config, meta


def load_adapter_weights(model: nn.Module, directory: str | Path, base_fingerprint: str) -> None:
    """Load saved adapter tensors into an adapted `model` built on the base whose
    checkpoint has `base_fingerprint`; a different base or a model without exactly the
    saved trainable parameters is refused."""
    directory = Path(directory)
    _, meta = read_adapter_config(directory)
    if meta["base_fingerprint"] != base_fingerprint:
        raise AdapterCheckpointError(
            f"{directory} was trained on another base model (fingerprint "
            f"{meta['base_fingerprint'][:12]}, this base {base_fingerprint[:12]}); load it "
            "onto the pretrained checkpoint it was trained from"
        )
    tensors = load_weights(directory, ADAPTER_WEIGHTS_NAME)
    parameters = dict(model.named_parameters())
    tensors = {peft_tensor_name(name, parameters): tensor for name, tensor in tensors.items()}
    unexpected = sorted(set(tensors) - set(parameters))
    if unexpected:
        raise AdapterCheckpointError(
            f"{directory}: saved tensors {unexpected[:3]} have no place in the model; was the "
            "adapter injected with the same config?"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            if parameters[name].shape != tensor.shape:
                raise AdapterCheckpointError(
                    f"{directory}: {name} has shape {tuple(tensor.shape)}, the model "
                    f"{tuple(parameters[name].shape)}"
                )
            parameters[name].copy_(tensor)
