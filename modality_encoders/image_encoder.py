"""Image item encoder: LMDB image -> ViT / ViTMAE -> CLS/mean pooling -> head (`projection`).

ViTMAE runs with mask ratio 0 and a fixed patch order (see `transformer.py`), so item
vectors are deterministic. Images are read from the store when needed (never all in
memory) and preprocessed by the model's image processor, or, for a folder without one,
by a `ViTImageProcessor` at the model's `image_size`.
"""

from __future__ import annotations

import torch

from peftrec.modality_encoders.base import register_item_encoder
from peftrec.modality_encoders.content_encoder import ContentEncoderSettings, ContentItemEncoder


@register_item_encoder("image")
class ImageItemEncoder(ContentItemEncoder):
    modality = "image"

    def check_settings(self, settings: ContentEncoderSettings) -> None:
        if not settings.image_store:
            raise ValueError("the image item encoder needs an image store (--image-store DIR)")
        if settings.token_vectors:
            raise ValueError("--token-vectors: images have no word pieces; drop it or use "
                             "--item-encoder text")

    def prepare_inputs(self, encoder_config) -> None:
        from transformers import AutoImageProcessor

        try:  # the PIL backend needs no torchvision
            from transformers import ViTImageProcessorPil as ViTImageProcessor
        except ImportError:
            from transformers import ViTImageProcessor

        if not hasattr(encoder_config, "image_size") or not hasattr(encoder_config, "patch_size"):
            raise ValueError(
                f"item encoder {self.settings.encoder!r} is a {encoder_config.model_type} model, "
                "which the image encoder does not support; pass a ViT or ViTMAE model folder")
        if self.content.images is None:
            raise ValueError("the image item encoder needs an image store in its ItemContent")
        try:
            self.processor = AutoImageProcessor.from_pretrained(str(self.path),
                                                                local_files_only=True)
        except (OSError, ValueError):
            size = encoder_config.image_size
            self.processor = ViTImageProcessor(size={"height": size, "width": size})
        self.image_size = encoder_config.image_size
        patch = encoder_config.patch_size
        self.num_tokens = (self.image_size // patch) ** 2 + 1

    def inputs(self, indices: torch.Tensor, trim: bool = True,
               width: int | None = None) -> dict[str, torch.Tensor]:
        images = [self.content.images[self.content.item_ids[i - 1]] for i in indices.tolist()]
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels.to(self.head_parameter().device)}

    def hidden_shape(self) -> tuple[int, int, int]:
        return (self.num_items, self.num_tokens, self.hidden_size)

    def input_settings(self) -> dict:
        return {"processor": self.processor.to_dict()}
