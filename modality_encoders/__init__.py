"""Item encoders: turn item indices into vectors (ID, text, image, text+id, image+id).

Every encoder follows the `ItemEncoder` protocol so backbones never care which one
they get. Encoders are looked up by name in `ITEM_ENCODERS`; content encoders get
their settings as a dict and the items' texts / images as an `ItemContent`.
"""

from modality_encoders.base import (
    ITEM_ENCODERS,
    ItemEncoder,
    build_item_encoder,
    check_item_encoder_weights,
    item_encoder_modality,
    normalize_item_encoder_config,
    register_item_encoder,
    resolve_item_encoder_config,
)
from modality_encoders.content import ItemContent, build_item_content, item_table_content
from modality_encoders.content_encoder import FUSIONS, ContentEncoderSettings, ContentItemEncoder
from modality_encoders.fusion import ImageIDItemEncoder, TextIDItemEncoder
from modality_encoders.heads import HEADS, MoEHead, build_head
from modality_encoders.id_encoder import IDEncoder
from modality_encoders.image_encoder import ImageItemEncoder
from modality_encoders.text_encoder import TextItemEncoder
from modality_encoders.transformer import EncoderMismatchError
from modality_encoders.whitening import WHITENINGS, whiten

__all__ = [
    "FUSIONS",
    "HEADS",
    "ITEM_ENCODERS",
    "WHITENINGS",
    "ContentEncoderSettings",
    "ContentItemEncoder",
    "EncoderMismatchError",
    "IDEncoder",
    "ImageIDItemEncoder",
    "ImageItemEncoder",
    "ItemContent",
    "ItemEncoder",
    "MoEHead",
    "TextIDItemEncoder",
    "TextItemEncoder",
    "build_head",
    "build_item_content",
    "build_item_encoder",
    "check_item_encoder_weights",
    "item_encoder_modality",
    "item_table_content",
    "normalize_item_encoder_config",
    "register_item_encoder",
    "resolve_item_encoder_config",
    "whiten",
]
