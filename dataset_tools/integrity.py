"""Content hashes of written files: `checksums.json` lists the SHA-256 of every file of a
folder (checkpoints, training states, dataset folders); `tensor_sha256` hashes one tensor
(the encoder caches store it in their file's metadata).

A writer hashes its files once, last, inside the temporary folder of `atomic_directory`; a
reader verifies them before use, so a truncated or altered file is refused by name instead
of loading as garbage. A file's hash is remembered per process (keyed by its size and
modification time), so loading a folder several times hashes it once. Folders written
before checksums existed have no `checksums.json` and load unverified.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # dataset_tools itself runs without importing torch
    import torch

CHECKSUMS = "checksums.json"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes (remembered until the file changes)."""
    stat = os.stat(path)
    return _sha256(str(Path(path).absolute()), stat.st_size, stat.st_mtime_ns, stat.st_ino)


@lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int, inode: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(folder: str | os.PathLike[str]) -> None:
    """Record the SHA-256 of every file under `folder` (call it after the last write)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    hashes = {p.relative_to(folder).as_posix(): file_sha256(p) for p in files}
    (folder / CHECKSUMS).write_text(json.dumps({"sha256": hashes}, indent=2) + "\n")


def recorded_checksums(folder: str | os.PathLike[str]) -> dict[str, str] | None:
    """The hashes `write_checksums` recorded for `folder`; None for a folder without them."""
    path = Path(folder) / CHECKSUMS
    if not path.is_file():
        return None
    try:
        return dict(json.loads(path.read_text())["sha256"])
    except (ValueError, KeyError, TypeError):  # a damaged list damages the folder
        return {CHECKSUMS: "unreadable"}


def damaged_file(folder: str | os.PathLike[str]) -> str | None:
    """Why `folder` fails its recorded checksums (the first missing, truncated or altered
    file, by path), or None when every file verifies or none were recorded."""
    folder = Path(folder)
    recorded = recorded_checksums(folder)
    for name, expected in (recorded or {}).items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if file_sha256(path) != expected:
            return (f"{path} is truncated or altered (its SHA-256 differs from the one "
                    "recorded when it was written)")
    return None


def tensor_sha256(tensor: torch.Tensor) -> str:
    """The SHA-256 of a tensor's bytes (its dtype's raw values, in row-major order)."""
    import torch

    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()
