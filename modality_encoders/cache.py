"""On-disk cache of a frozen encoder's outputs (safetensors), keyed by what produced them.

The key (a SHA-256 of encoder fingerprint, pooling or layer, item content and dataset
fingerprint) names the file and is also stored inside it, with the SHA-256 of the tensor
itself; a file whose stored key, content hash or shape differs, or that cannot be read, is
never used: it is rebuilt and replaced.
Files are written to a temporary name and renamed, so readers never see half a file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from peftrec.dataset_tools.integrity import tensor_sha256

logger = logging.getLogger(__name__)
TENSOR = "outputs"


def cache_key(**parts) -> str:
    """A stable SHA-256 of JSON-serialisable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def cache_path(cache_dir: Path, kind: str, key: str) -> Path:
    return Path(cache_dir) / f"item_encoder-{kind}-{key[:16]}.safetensors"


def load_cached(path: Path, key: str, shape: tuple[int, ...] | None = None) -> torch.Tensor | None:
    """The cached tensor if `path` holds one written under `key` (and of `shape`), else None."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            stored = metadata.get("key")
            if stored != key:
                logger.warning("ignoring %s: written for another encoder or data (key %s, "
                               "expected %s); rebuilding it", path, str(stored)[:12], key[:12])
                return None
            tensor = handle.get_tensor(TENSOR)
    except (SafetensorError, OSError, ValueError) as error:
        logger.warning("ignoring unreadable cache %s (%s); rebuilding it", path, error)
        return None
    # Caches written before content hashes were stored have none.
    if "sha256" in metadata and tensor_sha256(tensor) != metadata["sha256"]:
        logger.warning("ignoring %s: truncated or altered (its content's SHA-256 differs from "
                       "the one recorded when it was written); rebuilding it", path)
        return None
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        logger.warning("ignoring %s: shape %s, expected %s; rebuilding it",
                       path, tuple(tensor.shape), tuple(shape))
        return None
    return tensor


def save_cached(path: Path, key: str, tensor: torch.Tensor, info: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        tensor = tensor.detach().contiguous().cpu()
        metadata = {"key": key, "sha256": tensor_sha256(tensor),
                    "info": json.dumps(info or {}, default=str)}
        save_file({TENSOR: tensor}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cached(path: Path, key: str, shape: tuple[int, ...], build: Callable[[], torch.Tensor],
           info: dict | None = None) -> torch.Tensor:
    """Load the tensor cached under `key`, or build, save and return it."""
    tensor = load_cached(path, key, shape)
    if tensor is None:
        tensor = build()
        if tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"cache build produced shape {tuple(tensor.shape)}, not {shape}")
        save_cached(path, key, tensor, info)
    return tensor
