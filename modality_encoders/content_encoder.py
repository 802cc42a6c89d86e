"""What text and image item encoders share: a `transformers` encoder, pooling, a head.

Three ways to run, chosen by `freeze` and `trainable_layers`:
- frozen (default): the catalog is encoded once (chunked, no grad) and cached on disk;
  `catalog()` = projection(cached pooled outputs). The encoder is not part of the
  module, so checkpoints hold the head only and refer to the encoder by path +
  fingerprint. `whitening` (whitening.py) whitens the cached outputs with the catalog's
  own statistics. Adapters can still reach the output head: the module declares one
  adapter site, `projection` (`HEAD_SITE`), also its LoRA target (every nn.Linear of
  the head).
- end-to-end (`freeze=False`, all layers): the encoder runs inside the training step on
  the items a batch needs (`encodes_on_demand`), in chunks of items of similar input length
  (`encode_pooled`); evaluation re-encodes the catalog once per evaluation (memoised while
  in eval mode).
- partial (`freeze=False`, `trainable_layers=k`): the hidden states below the top k
  layers are cached on disk and only the top k layers run in the step.

The head, `projection`, is one of `heads.HEADS` (`head`: linear, mlp, moe). `catalog()` and
`encode_items()` give the content vectors; an encoder that adds more to them (the content +
ID fusion encoders, `fusion.py`) overrides those two and builds on `content_catalog()` and
`content_vectors()`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from peftrec.modality_encoders.cache import cache_key, cache_path, cached
from peftrec.modality_encoders.content import ItemContent
from peftrec.modality_encoders.heads import (
    DEFAULT_EXPERTS,
    DEFAULT_HEAD,
    HEAD_SETTINGS,
    HEADS,
    build_head,
    check_head_settings,
    head_shapes,
)
from peftrec.modality_encoders.transformer import (
    POOLINGS,
    EncoderMismatchError,
    TransformerStages,
    encoder_fingerprint,
    load_encoder_config,
    pool,
    resolve_encoder_path,
)
from peftrec.modality_encoders.whitening import WHITENINGS, whiten

# How the content + ID encoders (`fusion.py`) combine the two vectors.
FUSIONS = ("sum", "gate", "scaled")
# How `--token-vectors` combines the vectors of an item's word pieces.
TOKEN_POOLINGS = ("mean", "sum")


@dataclass
class ContentEncoderSettings:
    """`RecommenderConfig.item_encoder_config` of text and image encoders."""

    # A field with help text is a flag of the content scripts (pretraining.cli).
    encoder: str = field(metadata={
        "help": "text: a transformers encoder folder, a hub name already in the local cache, "
        "or 'minilm' (the installed all-MiniLM-L6-v2); image: a ViT or ViTMAE model folder "
        "(or a hub name in the local cache)"})
    pooling: str = field(default="mean", metadata={
        "choices": POOLINGS, "help": "CLS token, or the mean over tokens (text: the attention "
        "mask; images: the patches)"})
    # Frozen with cached outputs, or trained inside the step.
    freeze: bool = field(default=True, metadata={
        "flag": "freeze-encoder", "help": "keep the encoder frozen and cache its outputs",
        "off_flag": ("train-encoder", "train the encoder end to end (sampled softmax over the "
                     "items each batch needs; see --trainable-layers), as --no-freeze-encoder")})
    trainable_layers: int = field(default=-1, metadata={
        "help": "with --train-encoder: train only the top K layers and cache the hidden "
        "states below them (-1: all layers)"})
    encode_batch_size: int = field(default=64, metadata={
        "help": "items encoded at once when building caches and catalogs, and by a trained "
        "encoder in the step (chunks of similar text length)"})
    encoder_fingerprint: str | None = None  # recorded at build time, checked on load
    encoder_hidden_size: int | None = None
    template: str | None = field(default=None, metadata={  # text: an ItemTextTemplate
        "flag": "text-template", "help": "item text from item table columns, e.g. "
        "'{title}. {genre}' (unset: the built-in dataset's template)"})
    max_text_length: int = field(default=64, metadata={"help": "text: tokens per item"})
    image_store: str | None = field(default=None, metadata={
        "help": "LMDB image store keyed by the dataset's item ids "
        "(scripts/build_image_store.py)"})
    head: str = field(default=DEFAULT_HEAD, metadata={
        "flag": "item-head", "choices": HEADS,
        "help": "output head above the pooled encoder outputs: linear (one affine map), mlp "
        "(linear shortcut + a GELU MLP), moe (UniSRec's mixture of whitening experts)"})
    head_hidden_size: int | None = field(default=None, metadata={
        "help": "--item-head mlp: hidden width (unset: the encoder's hidden size)"})
    num_experts: int | None = field(default=None, metadata={
        "help": f"--item-head moe: experts (unset: {DEFAULT_EXPERTS})"})
    head_dropout: float = field(default=0.0, metadata={
        "help": "--item-head mlp/moe: dropout inside the head"})
    moe_noise: bool = field(default=False, metadata={
        "help": "--item-head moe: UniSRec's noisy gating in training"})
    fusion: str | None = field(default=None, metadata={
        "choices": FUSIONS,
        "help": "--item-encoder text+id or image+id: content + ID vector (sum; unset: sum), "
        "content + a learned sigmoid gate times the ID vector (gate), or ID vector + a "
        "learned per-dimension scale, zero at start, times the content vector (scaled)"})
    token_vectors: bool = field(default=False, metadata={
        "help": "text: add to each item's head output the mean (or sum: --token-pooling) of "
        "learned vectors of its word pieces (one per tokenizer entry, zero at start, shared "
        "by every catalog that uses the tokenizer)"})
    token_pooling: str = field(default="mean", metadata={
        "choices": TOKEN_POOLINGS,
        "help": "--token-vectors: their mean over an item's word pieces, or their sum (each "
        "word's vector counts in full, however long the text)"})
    token_dropout: float = field(default=0.0, metadata={
        "help": "--token-vectors: in training, drop each of an item's word pieces with this "
        "probability (the others scaled by 1/(1-p)), so the model learns to score items "
        "whose words it knows only in part, as a new catalog's"})
    whitening: str = field(default="none", metadata={
        "choices": WHITENINGS,
        "help": "frozen encoder: whiten its cached outputs with the catalog's own statistics "
        "before the head (center: subtract the mean; zca: mean and covariance); recomputed "
        "on each dataset, so a transferred model sees the target's catalog whitened"})

    @classmethod
    def from_dict(cls, config: dict | None) -> ContentEncoderSettings:
        config = dict(config or {})
        unknown = sorted(set(config) - {f.name for f in fields(cls)})
        if unknown or "encoder" not in config:
            raise ValueError(f"item encoder settings {sorted(config)}: unknown {unknown}"
                             if unknown else "item encoder settings need 'encoder' (a folder)")
        return cls(**config)

    def __post_init__(self) -> None:
        for flag, value, choices in (("--pooling", self.pooling, POOLINGS),
                                     ("--token-pooling", self.token_pooling, TOKEN_POOLINGS),
                                     ("--whitening", self.whitening, WHITENINGS)):
            if value not in choices:
                raise ValueError(f"unknown {flag} {value!r}; choose one of {', '.join(choices)}")
        if self.trainable_layers == 0 or self.trainable_layers < -1:
            raise ValueError(f"--trainable-layers must be >= 1 (or -1: all), got "
                             f"{self.trainable_layers}; use --freeze-encoder for none")
        if self.encode_batch_size < 1 or self.max_text_length < 2:
            raise ValueError("encode_batch_size must be >= 1 and max_text_length >= 2")
        if self.fusion is not None and self.fusion not in FUSIONS:
            raise ValueError(f"unknown --fusion {self.fusion!r}; choose one of "
                             f"{', '.join(FUSIONS)}")
        if self.token_pooling != "mean" and not self.token_vectors:
            raise ValueError(f"--token-pooling {self.token_pooling} pools --token-vectors; "
                             "add --token-vectors or drop it")
        if not 0.0 <= self.token_dropout < 1.0:
            raise ValueError(f"--token-dropout must be in [0, 1), got {self.token_dropout}")
        if self.token_dropout and not self.token_vectors:
            raise ValueError(f"--token-dropout {self.token_dropout} drops word pieces of "
                             "--token-vectors; add --token-vectors or drop it")
        if self.whitening != "none" and not self.freeze:
            raise ValueError(f"--whitening {self.whitening} whitens the cached outputs of a "
                             "frozen encoder; drop it or drop --train-encoder")
        if self.head == "moe" and self.num_experts is None:
            self.num_experts = DEFAULT_EXPERTS
        check_head_settings(self.head, self.head_settings())

    def head_settings(self) -> dict:
        """The head's settings (keys of `heads.HEAD_SETTINGS`)."""
        return {name: getattr(self, name) for name in HEAD_SETTINGS}


# The site (and LoRA target) of a frozen, cached encoder's output head.
HEAD_SITE = "projection"


class ContentItemEncoder(nn.Module):
    """Base of `TextItemEncoder` and `ImageItemEncoder` (see the module docstring)."""

    modality = ""  # "text" or "image"
    catalog_parameters = ()  # nothing per item: the encoder transfers to any catalog
    fuses_ids = False  # True for the content + ID fusion encoders (`fusion` setting)

    def __init__(self, num_items: int, output_dim: int, config: dict | None = None,
                 content: ItemContent | None = None) -> None:
        super().__init__()
        settings = ContentEncoderSettings.from_dict(config)
        self.check_fusion(settings)
        self.check_settings(settings)
        if content is None:
            raise ValueError(f"the {self.modality} item encoder needs the items' content; "
                             "build it with modality_encoders.build_item_content(data, ...)")
        if content.num_items != num_items:
            raise ValueError(f"item content has {content.num_items} items, the model "
                             f"{num_items}; build both from the same dataset")
        self.settings, self.content = settings, content
        self.num_items, self.output_dim = num_items, output_dim
        self.path = resolve_encoder_path(settings.encoder)
        encoder_config = load_encoder_config(self.path, settings.encoder)
        self.fingerprint = _check_encoder(settings, self.path, encoder_config.hidden_size)
        self.hidden_size = encoder_config.hidden_size
        if settings.head == "mlp" and settings.head_hidden_size is None:
            settings.head_hidden_size = self.hidden_size
        self.projection = build_head(settings.head, self.hidden_size, output_dim,
                                     settings.head_settings())
        self.prepare_inputs(encoder_config)
        self._catalog_memo: torch.Tensor | None = None
        self.encoder: TransformerStages | None = None
        self.start = 0  # first layer run in the step (end-to-end / partial modes)
        if settings.freeze:
            outputs = self._cached("pooled", (num_items, self.hidden_size), self._build_pooled)
            # Whitened with this catalog's statistics, recomputed on every build: a model
            # moved to another catalog sees that catalog whitened (whitening.py).
            outputs = whiten(outputs, settings.whitening)
            self.register_buffer("outputs", outputs, persistent=False)
            # An adapter host of one layer: the head above the cache (so adapting it keeps
            # the cache). In the other modes the encoder's transformer is the host.
            self.adapter_sites = {HEAD_SITE: HEAD_SITE}
            self.lora_targets = (HEAD_SITE,)
            return
        self.encoder = TransformerStages(self.path, settings.encoder, self.modality)
        num_layers = self.encoder.num_layers
        if settings.trainable_layers > num_layers:
            raise ValueError(f"--trainable-layers {settings.trainable_layers}: the encoder has "
                             f"only {num_layers} layers")
        if settings.trainable_layers != -1 and settings.trainable_layers < num_layers:
            self.start = num_layers - settings.trainable_layers
            self.encoder.requires_grad_(False)
            for layer in self.encoder.layers[self.start:]:
                layer.requires_grad_(True)
            if self.modality == "image":
                self.encoder.model.layernorm.requires_grad_(True)
            hidden = self._cached(f"layer{self.start}", self.hidden_shape(), self._build_hidden)
            self.register_buffer("hidden_cache", hidden, persistent=False)

    # --- what subclasses provide -------------------------------------------------------
    def check_settings(self, settings: ContentEncoderSettings) -> None:
        """Raise ValueError on settings this modality cannot use."""

    def prepare_inputs(self, encoder_config) -> None:
        """Tokenise the texts once / set up image preprocessing."""
        raise NotImplementedError

    def inputs(self, indices: torch.Tensor, trim: bool = True,
               width: int | None = None) -> dict[str, torch.Tensor]:
        """Model inputs for item indices (1..N) [B]; `trim` drops all-padding columns
        (`width`: the longest input among them, when the caller knows it)."""
        raise NotImplementedError

    def hidden_shape(self) -> tuple[int, int, int]:
        raise NotImplementedError

    def input_settings(self) -> dict:
        """Settings that change the encoder's inputs (part of cache keys)."""
        return {}

    def extra_vectors(self, items: torch.Tensor) -> torch.Tensor | None:
        """What the modality adds to the head's output for real items (1..N) [U]: [U, d],
        or None (text with `token_vectors`: its learned word-piece vectors)."""
        return None

    # --- the ItemEncoder contract --------------------------------------------------------
    @property
    def encodes_on_demand(self) -> bool:
        """True when the encoder is trained: the training step encodes only needed items."""
        return self.encoder is not None

    def forward(self, item_indices: torch.Tensor) -> torch.Tensor:
        if self.encodes_on_demand and self.training:
            unique, inverse = torch.unique(item_indices, return_inverse=True)
            return self.encode_items(unique)[inverse]
        return self.catalog()[item_indices]

    def catalog(self) -> torch.Tensor:
        return self.content_catalog()

    def encode_items(self, items: torch.Tensor) -> torch.Tensor:
        """Vectors [U, d] of item indices [U]; index 0 (padding) gives zeros."""
        return self.content_vectors(items)

    # --- the content vectors: head(pooled encoder outputs) ---------------------------------
    def content_catalog(self) -> torch.Tensor:
        """Content vectors of every item [num_items + 1, d], row 0 (padding) zero.

        In eval mode they are made once and kept until the next `train()`: the evaluator
        and `recommend` score the catalog in chunks, batch after batch, and each chunk
        asked for the whole catalog again (with cached encoder outputs, a head pass over
        every item per chunk: ~400 GFLOP for a moe head at 1M items)."""
        if self.training:
            return self._encode_catalog()
        if self._catalog_memo is None:
            with torch.no_grad():
                self._catalog_memo = self._encode_catalog()
        return self._catalog_memo

    def content_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """Content vectors [U, d] of item indices [U]; index 0 (padding) gives zeros."""
        out = self.head_parameter().new_zeros(len(items), self.output_dim)
        real = (items > 0).nonzero().squeeze(1)
        if len(real):
            out = out.index_copy(0, real, self.head_output(items[real],
                                                           self.encode_pooled(items[real])))
        return out

    def head_output(self, items: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """Content vectors [U, d] of real items [U] from their pooled encoder outputs."""
        vectors = self.projection(pooled)
        extra = self.extra_vectors(items)
        return vectors if extra is None else vectors + extra

    def encode_pooled(self, items: torch.Tensor) -> torch.Tensor:
        """Pooled encoder outputs [B, H] of real items (1..N).

        The trained encoder runs on chunks of `encode_batch_size` items, in order of input
        length (text: tokens per item) so that each chunk is padded only to its own longest
        input: with item texts of 14 tokens on average and 33 at most (ML-100k), one padded
        batch would run 2.4 times the tokens. Padding is masked, so every item's vector is
        the one it gets alone (up to float rounding).
        """
        if self.encoder is None:
            return self.outputs[items - 1]
        size = self.settings.encode_batch_size
        if len(items) <= size:
            return self._encode_chunk(items)
        lengths = self.input_lengths()
        if lengths is None:
            order = torch.arange(len(items), device=items.device)
            widths = [None] * -(-len(items) // size)
        else:
            order = lengths[items - 1].argsort(stable=True)
            # Each chunk's longest input is its last: all widths in one read from the device.
            last = torch.arange(size, len(items) + size, size, device=items.device)
            widths = lengths[items[order[last.clamp(max=len(items)) - 1]] - 1].tolist()
        pooled = torch.cat([self._encode_chunk(items[chunk], width)
                            for chunk, width in zip(order.split(size), widths, strict=True)])
        return pooled[order.argsort()]

    def input_lengths(self) -> torch.Tensor | None:
        """Input length of each item [N] (text: its tokens), or None when every item's input
        has the same length (images)."""
        return None

    def _encode_chunk(self, items: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """Pooled encoder outputs [B, H] of real items, in one forward pass (`width`: their
        longest input, if known)."""
        inputs = self.inputs(items, width=width)
        mask = inputs.get("attention_mask")
        hidden = None
        if self.start > 0:
            hidden = self.hidden_cache[items - 1]
            if mask is not None:
                hidden = hidden[:, : mask.shape[1]]
        states = self.encoder(inputs, self.start, hidden=hidden)
        return pool(states, mask, self.settings.pooling, skip_first=self.modality == "image")

    def head_parameter(self) -> torch.Tensor:
        """A parameter of the head (its device and dtype are the module's)."""
        return next(self.projection.parameters())

    def train(self, mode: bool = True):
        self._catalog_memo = None  # parameters may change from here on
        return super().train(mode)

    # --- building ------------------------------------------------------------------------
    def _encode_catalog(self) -> torch.Tensor:
        if self.encoder is None:  # cached encoder outputs: the head over all of them at once
            items = torch.arange(1, self.num_items + 1, device=self.outputs.device)
            vectors = self.head_output(items, self.outputs)
            return torch.cat([vectors.new_zeros(1, self.output_dim), vectors])
        # In chunks of `encode_batch_size` items, by input length (see `encode_pooled`).
        return self.content_vectors(torch.arange(self.num_items + 1,
                                                 device=self.head_parameter().device))

    def _cached(self, kind: str, shape: tuple[int, ...], build) -> torch.Tensor:
        key = cache_key(
            kind=kind, modality=self.modality, encoder=self.fingerprint,
            pooling=self.settings.pooling if kind == "pooled" else None,
            inputs=self.input_settings(), content=self.content.content_fingerprint,
            dataset=self.content.dataset_fingerprint, num_items=self.num_items,
        )
        path = cache_path(self.content.cache_dir, f"{self.modality}-{kind}", key)
        info = {"encoder": str(self.path), "kind": kind,
                "dataset": self.content.dataset_fingerprint}
        return cached(path, key, shape, build, info)

    @torch.no_grad()
    def _build_pooled(self) -> torch.Tensor:
        stages = TransformerStages(self.path, self.settings.encoder, self.modality).eval()
        out = []
        for chunk in self._chunks():
            inputs = self.inputs(chunk)
            states = stages(inputs)
            out.append(pool(states, inputs.get("attention_mask"), self.settings.pooling,
                            skip_first=self.modality == "image"))
        return torch.cat(out).float()

    @torch.no_grad()
    def _build_hidden(self) -> torch.Tensor:
        was_training = self.encoder.training
        self.encoder.eval()
        out = [self.encoder.hidden_below(self.inputs(chunk, trim=False), self.start)
               for chunk in self._chunks()]
        self.encoder.train(was_training)
        return torch.cat(out).float()

    def _chunks(self):
        return torch.arange(1, self.num_items + 1).split(self.settings.encode_batch_size)

    @classmethod
    def check_fusion(cls, settings: ContentEncoderSettings) -> None:
        if settings.fusion is not None and not cls.fuses_ids:
            raise ValueError(
                f"--fusion {settings.fusion}: only a content + ID item encoder fuses "
                f"(--item-encoder {cls.modality or 'text'}+id); drop --fusion or choose that "
                "encoder")

    @classmethod
    def resolve_config(cls, config: dict) -> dict:
        """Fill in the encoder's fingerprint and hidden size (recorded in checkpoints), and
        the head's defaults that depend on it."""
        settings = ContentEncoderSettings.from_dict(config)
        cls.check_fusion(settings)
        path = resolve_encoder_path(settings.encoder)
        if Path(settings.encoder).expanduser().is_dir():
            settings.encoder = str(path)
        settings.encoder_hidden_size = load_encoder_config(path, settings.encoder).hidden_size
        settings.encoder_fingerprint = encoder_fingerprint(path)
        if settings.head == "mlp" and settings.head_hidden_size is None:
            settings.head_hidden_size = settings.encoder_hidden_size
        return asdict(settings)

    @classmethod
    def normalize_config(cls, config: dict) -> dict:
        """`config` with every setting, those it lacks at their defaults (a config recorded
        before a setting existed compares equal to one recorded after)."""
        return asdict(ContentEncoderSettings.from_dict(config))

    @classmethod
    def check_weights(cls, config: dict, output_dim: int,
                      shapes: dict[str, tuple[int, ...]]) -> str | None:
        """Why a checkpoint's head tensors (`shapes`: name -> shape, names under the item
        encoder) do not fit the head `config` describes; None when they do (or when the
        config does not record the encoder width)."""
        settings = ContentEncoderSettings.from_dict(config)
        if settings.encoder_hidden_size is None:
            return None
        values = settings.head_settings()
        if settings.head == "mlp" and settings.head_hidden_size is None:
            values["head_hidden_size"] = settings.encoder_hidden_size
        prefix = HEAD_SITE + "."
        expected = {prefix + name: shape for name, shape in head_shapes(
            settings.head, settings.encoder_hidden_size, output_dim, values).items()}
        found = {name: tuple(shape) for name, shape in shapes.items() if name.startswith(prefix)}
        if found == expected:
            return None

        def listing(tensors: dict) -> str:
            shown = [f"{name} {list(shape)}" for name, shape in sorted(tensors.items())[:4]]
            return ", ".join(shown) + (", ..." if len(tensors) > 4 else "") or "nothing"

        return (f"its item head does not fit its weights: the config says head "
                f"{settings.head!r} ({listing(expected)}), the weights hold {listing(found)}; "
                "set the item head settings (head, num_experts, head_hidden_size, moe_noise) "
                "the checkpoint was trained with")


def _check_encoder(settings: ContentEncoderSettings, path: Path, hidden_size: int) -> str:
    """The encoder's fingerprint, after checking it against the recorded one."""
    recorded = settings.encoder_hidden_size
    if recorded is not None and recorded != hidden_size:
        raise EncoderMismatchError(
            f"item encoder {settings.encoder!r} has hidden size {hidden_size}, but this model "
            f"was built with an encoder of hidden size {recorded}; pass the encoder it was "
            "trained with"
        )
    fingerprint = encoder_fingerprint(path)
    if settings.encoder_fingerprint is not None and settings.encoder_fingerprint != fingerprint:
        raise EncoderMismatchError(
            f"item encoder {settings.encoder!r} ({path}) is not the encoder this model was built "
            f"with (fingerprint {fingerprint[:12]}, recorded {settings.encoder_fingerprint[:12]}); "
            "pass the original encoder folder"
        )
    return fingerprint
