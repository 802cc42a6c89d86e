"""Write a folder or a file so that readers only ever see the old or the complete new
version."""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# The hidden siblings below: `.NAME.tmp-PID-HEX` (a new folder being written), `.NAME.old-PID-HEX`
# (the folder it replaces, until deleted), `.NAME.partial-PID-HEX` (a new file being written).
_SIBLING = re.compile(r"\.(?P<name>.+)\.(?P<tag>tmp|old|partial)-\d+-[0-9a-f]{8}")


def _sibling(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def clean_interrupted_writes(folder: str | os.PathLike[str]) -> list[str]:
    """Remove the temporary siblings that writes here left when their process was killed
    (a half-written folder or file, a replaced folder not yet deleted), so that a folder
    written again and again (a resumed run's) does not grow. A replaced folder whose
    replacement never got its name (a kill between the two renames) is put back instead:
    it is the last complete version. Call it only while no process writes in `folder`.
    Returns the names cleaned."""
    folder = Path(folder)
    cleaned = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = _SIBLING.fullmatch(path.name)
        if match is None:
            continue
        target = folder / match["name"]
        if match["tag"] == "old" and not target.exists():
            path.rename(target)
        elif path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        cleaned.append(path.name)
    return cleaned


@contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``path``; on success it replaces ``path``.

    A failure (or interrupt) inside the block deletes the temporary folder and leaves
    any previous ``path`` untouched, so a crashed build never damages a good dataset or
    checkpoint. The temporary folder lives in the same parent so the final rename stays
    on one file system.
    """
    target = Path(path).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "tmp")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = _sibling(target, "old") if target.exists() else None
    try:
        if old is not None:
            target.rename(old)
        tmp.rename(target)
    except BaseException:
        if old is not None and not target.exists():
            old.rename(target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` through a temporary sibling renamed into
    place: a crash leaves the previous file whole, never half of the new one."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = _sibling(target, "partial")
    try:
        partial.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
