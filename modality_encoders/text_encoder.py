"""Text item encoder: item text -> BERT-like encoder -> CLS/mean pooling -> head (`projection`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peftrec.modality_encoders.base import register_item_encoder
from peftrec.modality_encoders.content_encoder import ContentEncoderSettings, ContentItemEncoder


@register_item_encoder("text")
class TextItemEncoder(ContentItemEncoder):
    """Item texts (`ItemContent.texts`) are tokenised once, padded to the longest."""

    modality = "text"
    # Indexed by the tokenizer, not by item: it moves to any catalog as it is, and LoRA
    # may adapt it when a target names it (adapters.base.lookup_tables).
    vocabulary_tables = ("token_vectors",)

    def check_settings(self, settings: ContentEncoderSettings) -> None:
        if not settings.template:
            raise ValueError("the text item encoder needs a text template (--text-template)")

    def prepare_inputs(self, encoder_config) -> None:
        from transformers import AutoTokenizer

        if not hasattr(encoder_config, "vocab_size"):
            raise ValueError(
                f"item encoder {self.settings.encoder!r} is a {encoder_config.model_type} model, "
                "which the text encoder does not support; pass a BERT-like text model folder")
        if self.content.texts is None:
            raise ValueError("the text item encoder needs item texts in its ItemContent")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        except (OSError, ValueError, TypeError) as error:
            raise ValueError(f"item encoder {self.settings.encoder!r} ({self.path}) has no "
                             f"usable tokenizer ({error}); save one next to the model") from None
        limit = min(self.settings.max_text_length,
                    getattr(encoder_config, "max_position_embeddings", 512))
        tokens = tokenizer(list(self.content.texts), padding="longest", truncation=True,
                           max_length=limit, return_tensors="pt", return_special_tokens_mask=True)
        self.register_buffer("input_ids", tokens["input_ids"], persistent=False)
        self.register_buffer("attention_mask", tokens["attention_mask"], persistent=False)
        self.register_buffer("token_counts", tokens["attention_mask"].sum(1), persistent=False)
        self.token_vectors: nn.EmbeddingBag | None = None
        if self.settings.token_vectors:
            self.add_token_vectors(encoder_config.vocab_size,
                                   tokens["attention_mask"] * (1 - tokens["special_tokens_mask"]))

    def add_token_vectors(self, vocab_size: int, word_pieces: torch.Tensor) -> None:
        """`--token-vectors`: a learned vector per tokenizer entry (zero at start, so the
        model starts as its head alone), and each item's weights over its word pieces
        (`word_pieces`: 1 where a position holds one, not padding or [CLS]/[SEP]): 1/count
        for `token_pooling` mean, 1 for sum.

        Why: a frozen encoder's pooled vector places items with similar titles, years and
        genres close together, and a head over it cannot tell them apart much better; the
        encoder's own input embeddings, trained, could, but training them means running
        the encoder in the step. A bag of learned word-piece vectors is that signal at the
        cost of a lookup. The table is indexed by the tokenizer, not by item, so it moves
        to any catalog the tokenizer reads: a new item starts from the vectors its words
        learned."""
        # A weighted bag per item, summed inside the lookup: a catalog's [N, T, d] word-piece
        # vectors are never materialised (at a million items that is gigabytes).
        self.token_vectors = nn.EmbeddingBag(vocab_size, self.output_dim, mode="sum")
        nn.init.zeros_(self.token_vectors.weight)
        weights = word_pieces.float()
        if self.settings.token_pooling == "mean":
            weights = weights / weights.sum(1, keepdim=True).clamp(min=1)
        self.register_buffer("token_weights", weights, persistent=False)

    def extra_vectors(self, items: torch.Tensor) -> torch.Tensor | None:
        if self.token_vectors is None:
            return None
        weights = self.token_weights[items - 1]
        if self.training and self.settings.token_dropout:
            # Word dropout: a new catalog's items come with words the source never saw
            # (their vectors zero); trained on items with words missing, the head and the
            # backbone learn not to lean on every word being known.
            weights = F.dropout(weights, self.settings.token_dropout)
        return self.token_vectors(self.input_ids[items - 1], per_sample_weights=weights)

    def inputs(self, indices: torch.Tensor, trim: bool = True,
               width: int | None = None) -> dict[str, torch.Tensor]:
        ids = self.input_ids[indices - 1]
        mask = self.attention_mask[indices - 1]
        if trim:
            width = int(self.token_counts[indices - 1].max()) if width is None else width
            ids, mask = ids[:, :width], mask[:, :width]
        return {"input_ids": ids, "attention_mask": mask}

    def input_lengths(self) -> torch.Tensor:
        return self.token_counts

    def hidden_shape(self) -> tuple[int, int, int]:
        return (self.num_items, self.input_ids.shape[1], self.hidden_size)

    def input_settings(self) -> dict:
        return {"max_text_length": self.settings.max_text_length,
                "template": self.settings.template}
