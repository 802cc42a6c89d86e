"""Item encoders: turn item indices into vectors (ID, text, image, text+id, image+id).

Every encoder follows the `ItemEncoder` protocol so backbones never care which one
they get. Encoders are looked up by name in `ITEM_ENCODERS`; content encoders get
their settings as a dict and the items' texts / images as an `ItemContent`.
"""

from peftrec.modality_encoders.base import (
    ITEM_ENCODERS,
    ItemEncoder,
    build_item_encoder,
    check_item_encoder_weights,
    item_encoder_modality,
    normalize_item_encoder_config,
    register_item_encoder,
    resolve_item_encoder_config,
)
from peftrec.modality_encoders.content import ItemContent, build_item_content, item_table_content
from peftrec.modality_encoders.content_encoder import (
    FUSIONS,
    ContentEncoderSettings,
    ContentItemEncoder,
)
from peftrec.modality_encoders.fusion import ImageIDItemEncoder, TextIDItemEncoder
from peftrec.modality_encoders.heads import HEADS, MoEHead, build_head
from peftrec.modality_encoders.id_encoder import IDEncoder
from peftrec.modality_encoders.image_encoder import ImageItemEncoder
from peftrec.modality_encoders.text_encoder import TextItemEncoder
from peftrec.modality_encoders.transformer import EncoderMismatchError
from peftrec.modality_encoders.whitening import WHITENINGS, whiten

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
