"""Item content handed to content encoders: texts and/or an image store, plus identity.

Built from a dataset folder by `build_item_content` (or from any item table by
`item_table_content`); row i - 1 of every list is item index i (0 = padding has no content).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from peftrec.dataset_tools import ImageStore, ItemTextTemplate, SequenceData
from peftrec.modality_encoders.base import item_encoder_modality


@dataclass
class ItemContent:
    item_ids: list[str]  # original ids; row i - 1 = item index i
    dataset_fingerprint: str
    cache_dir: Path  # where frozen-encoder outputs are cached
    texts: list[str] | None = None
    images: Any = None  # an ImageStore: images[item_id] -> PIL image
    content_fingerprint: str = ""  # identity of the texts or images (part of cache keys)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)


def build_item_content(
    data: SequenceData, item_encoder: str, item_encoder_config: dict,
    cache_dir: str | Path | None = None,
) -> ItemContent | None:
    """The content the encoder `item_encoder` needs from `data` (None for ID encoders)."""
    if item_encoder_modality(item_encoder) is None:
        return None
    return item_table_content(data.items.to_pandas(), data.fingerprint,
                              Path(cache_dir) if cache_dir else Path(data.path) / "cache",
                              item_encoder, item_encoder_config)


def item_table_content(
    items: pd.DataFrame, fingerprint: str, cache_dir: str | Path, item_encoder: str,
    item_encoder_config: dict,
) -> ItemContent | None:
    """The content the encoder `item_encoder` needs from an item table (`item_id` plus the
    fields its text template names; row i = item index i + 1): a dataset's, or a catalog the
    model never trained on, identified by `fingerprint`. None for ID encoders."""
    modality = item_encoder_modality(item_encoder)
    if modality is None:
        return None
    content = ItemContent(
        item_ids=items["item_id"].astype(str).tolist(),
        dataset_fingerprint=fingerprint,
        cache_dir=Path(cache_dir),
    )
    if modality == "text":
        template = ItemTextTemplate(item_encoder_config["template"])
        content.texts = list(template.render(items))
        content.content_fingerprint = _digest("\n".join(content.texts))
    elif modality == "image":
        store = ImageStore(item_encoder_config["image_store"])
        absent = [i for i in content.item_ids if i not in store]
        if absent:
            shown = ", ".join(map(repr, absent[:5])) + (", ..." if len(absent) > 5 else "")
            raise ValueError(
                f"image store {store.path} has no image for {len(absent)} of "
                f"{len(content.item_ids)} items ({shown}); rebuild it with "
                "scripts/build_image_store.py for this dataset's item ids"
            )
        content.images = store
        content.content_fingerprint = image_store_fingerprint(store)
    return content


def image_store_fingerprint(store: ImageStore) -> str:
    """Identity of a store's files: path, metadata, size and modification time of data.mdb."""
    stat = (Path(store.path) / "data.mdb").stat()
    return _digest(f"{store.path}|{sorted(store.meta.items())}|{stat.st_size}|{stat.st_mtime_ns}")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
