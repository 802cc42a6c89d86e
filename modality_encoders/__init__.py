"""Item encoders: turn item indices into vectors (IDs today; text and images next).

Every encoder follows the `ItemEncoder` protocol so backbones never care which one
they get. Encoders are looked up by name in `ITEM_ENCODERS`.
"""

from modality_encoders.base import ITEM_ENCODERS, ItemEncoder, build_item_encoder
from modality_encoders.id_encoder import IDEncoder

__all__ = ["ITEM_ENCODERS", "IDEncoder", "ItemEncoder", "build_item_encoder"]
