"""Item images in one LMDB store: build it from a folder, zip or CSV, and read it from workers.

Layout: an LMDB environment folder (``data.mdb``, ``lock.mdb``); key = the original item
id as UTF-8 bytes, value = the image encoded as JPEG or PNG at ``size`` x ``size``; the
key ``__meta__`` holds JSON {size, format, count, resize, created_with}. One file of
pre-resized images avoids opening a million small files per epoch.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import threading
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
from PIL import Image, ImageOps

from .atomic import atomic_directory
from .errors import DataError
from .folder import _peftrec_version
from .readers import _read_table

META_KEY = b"__meta__"
IMAGE_FORMATS = ("JPEG", "PNG")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
RESIZE = "shorter side to size, then center crop"
_JPEG_QUALITY = 90
_BATCH = 512  # images per write transaction
_MAX_KEY_BYTES = 511  # LMDB's default key size limit
_BAD_IMAGE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

Loader = Callable[[], bytes]  # reads one source image's bytes


@dataclass(kw_only=True)
class ImageStoreSettings:
    """The settings of scripts/build_image_store.py (a flag each, pretraining.cli)."""

    source: Path = field(metadata={
        "help": "folder or zip of <item_id>.<ext> images, or CSV item_id,path"})
    output_dir: Path = field(metadata={"help": "store folder to write (replaced atomically)"})
    size: int = field(default=224, metadata={"help": "side of the square images in pixels"})
    format: str = field(default="JPEG", metadata={"choices": IMAGE_FORMATS,
                                                  "help": "stored encoding"})
    items: Path | None = field(default=None, metadata={
        "help": "dataset folder, or item table (.tsv, .csv, .jsonl, RecBole .item)"})
    item_col: str = field(default="item_id", metadata={
        "help": "item id column of an --items table"})
    skip_bad_images: bool = field(default=False, metadata={
        "help": "store the readable images and list the missing/unreadable ones, instead of "
        "refusing to build"})


@dataclass
class ImageStoreReport:
    """What a build wrote and what it could not: (item id, reason) pairs, never dropped."""

    path: Path
    count: int = 0
    missing: list[tuple[str, str]] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    ignored: int = 0  # source images whose id is not in ``item_ids``

    def problems(self, limit: int = 5) -> str:
        """"N missing, M unreadable: id (reason), ..." with at most ``limit`` examples."""
        bad = self.missing + self.unreadable
        shown = "; ".join(f"{item!r} ({reason})" for item, reason in bad[:limit])
        more = f"; and {len(bad) - limit} more" if len(bad) > limit else ""
        return f"{len(self.missing)} missing, {len(self.unreadable)} unreadable: {shown}{more}"


def _check_id(item_id: str, where: str) -> str:
    if not item_id:
        raise DataError(f"{where}: empty item id; name every image after its item")
    if item_id.encode() == META_KEY:
        raise DataError(f"{where}: item id {item_id!r} is reserved for the store's metadata")
    if len(item_id.encode()) > _MAX_KEY_BYTES:
        raise DataError(f"{where}: item id {item_id[:40]!r}... is longer than "
                        f"{_MAX_KEY_BYTES} UTF-8 bytes, the LMDB key limit")
    return item_id


def _add(found: dict[str, Loader], item_id: str, loader: Loader, where: str) -> None:
    if item_id in found:
        raise DataError(f"{where}: a second image for item {item_id!r}; keep one per item")
    found[item_id] = loader


def _from_folder(folder: Path) -> dict[str, Loader]:
    """Files ``<item_id>.<image suffix>`` directly in ``folder``; other files are ignored."""
    found: dict[str, Loader] = {}
    for file in sorted(folder.iterdir()):
        if file.is_file() and not file.name.startswith(".") \
                and file.suffix.lower() in IMAGE_SUFFIXES:
            _add(found, _check_id(file.stem, str(file)), file.read_bytes, str(file))
    return found


def _from_zip(archive: Path, stack: ExitStack) -> dict[str, Loader]:
    """Members ``[any/folder/]<item_id>.<image suffix>``; ``stack`` closes the archive."""
    try:
        zf = stack.enter_context(zipfile.ZipFile(archive))
    except zipfile.BadZipFile as e:
        raise DataError(f"{archive.name}: not a valid zip file ({e})") from e
    found: dict[str, Loader] = {}
    for info in zf.infolist():
        name = Path(info.filename)
        if info.is_dir() or name.name.startswith(".") or "__MACOSX" in name.parts \
                or name.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        where = f"{archive.name}:{info.filename}"
        _add(found, _check_id(name.stem, where), lambda n=info.filename: zf.read(n), where)
    return found


def _from_csv(table: Path) -> tuple[dict[str, Loader], list[tuple[str, str]]]:
    """Rows ``item_id,path`` (relative paths from the CSV's folder); absent files are missing."""
    df = _read_table(table, ",", header=True)
    for column in ("item_id", "path"):
        if column not in df.columns:
            available = ", ".join(c for c in df.columns if c != "line")
            raise DataError(f"{table.name}: no column {column!r}; expected item_id,path "
                            f"(available columns: {available})")
    repeated = df["item_id"].duplicated().to_numpy()
    if repeated.any():
        i = int(repeated.argmax())
        raise DataError(f"{table.name} line {df['line'].iloc[i]}: a second row for item "
                        f"{df['item_id'].iloc[i]!r}; keep one image per item")
    found: dict[str, Loader] = {}
    missing: list[tuple[str, str]] = []
    for item_id, raw, line in zip(df["item_id"], df["path"], df["line"], strict=True):
        where = f"{table.name} line {line}"
        file = table.parent / raw  # an absolute ``raw`` replaces the parent
        if not raw:
            raise DataError(f"{where}: empty path for item {item_id!r}")
        if file.is_file():
            _add(found, _check_id(item_id, where), file.read_bytes, where)
        else:
            _check_id(item_id, where)
            missing.append((item_id, f"{where}: no file {raw}"))
    return found, missing


def _encode(data: bytes, size: int, fmt: str) -> bytes:
    """Decode, orient, flatten transparency onto white, center-crop to a square, re-encode."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            image = Image.new("RGB", rgba.size, (255, 255, 255))
            image.paste(rgba, mask=rgba.getchannel("A"))
        image = ImageOps.fit(image.convert("RGB"), (size, size), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        options: dict[str, Any] = {"quality": _JPEG_QUALITY} if fmt == "JPEG" else {}
        image.save(out, format=fmt, **options)
        return out.getvalue()


def _encoded(sources: dict[str, Loader], size: int, fmt: str,
             report: ImageStoreReport) -> Iterator[tuple[bytes, bytes]]:
    for item_id, load in sources.items():
        try:
            yield item_id.encode(), _encode(load(), size, fmt)
        except _BAD_IMAGE as e:
            report.unreadable.append((item_id, f"{type(e).__name__}: {e}"))


def _write(env: lmdb.Environment, pairs: Iterable[tuple[bytes, bytes]]) -> int:
    """Write in batches, doubling the map when it fills (its size must be chosen up front)."""
    count, pairs = 0, iter(pairs)
    while True:
        batch = list(itertools.islice(pairs, _BATCH))
        if not batch:
            return count
        while True:
            try:
                with env.begin(write=True) as txn:
                    for key, value in batch:
                        txn.put(key, value)
                break
            except lmdb.MapFullError:
                env.set_mapsize(env.info()["map_size"] * 2)
        count += len(batch)


def build_image_store(
    source: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    size: int = 224,
    fmt: str = "JPEG",
    item_ids: Iterable[str] | None = None,
    skip_bad: bool = False,
) -> ImageStoreReport:
    """Resize every item image to ``size`` x ``size`` and store it in LMDB, atomically.

    ``source``: a folder or zip of ``<item_id>.<ext>`` files, or a CSV ``item_id,path``.
    Images keep their aspect ratio: the shorter side is scaled to ``size`` and the center
    cropped (the usual ViT preprocessing); transparency becomes white. With ``item_ids``
    only those items are stored and any without an image is missing. Missing or
    unreadable images raise DataError and leave ``output_path`` as it was, unless
    ``skip_bad``: then the others are written and the report lists the skipped ones.
    """
    source, output_path = Path(source), Path(output_path)
    fmt = fmt.upper()
    if fmt not in IMAGE_FORMATS:
        raise DataError(f"image format {fmt!r}: choose one of {', '.join(IMAGE_FORMATS)}")
    if size < 1:
        raise DataError(f"image size must be a positive number of pixels, not {size}")
    report = ImageStoreReport(path=output_path)
    with ExitStack() as stack:
        if source.is_dir():
            sources = _from_folder(source)
        elif source.is_file() and source.suffix.lower() == ".csv":
            sources, report.missing = _from_csv(source)
        elif source.is_file() and zipfile.is_zipfile(source):
            sources = _from_zip(source, stack)
        elif source.exists():
            raise DataError(f"{source}: not a folder, zip or CSV (item_id,path) of images")
        else:
            raise FileNotFoundError(f"{source}: no such file or folder")
        if item_ids is not None:
            sources = _select(sources, list(dict.fromkeys(item_ids)), source.name, report)
        if not sources and not report.missing:
            raise DataError(f"{source}: no images found (expected <item_id>.jpg/.png files)")
        _build(sources, source.name, output_path, size, fmt, skip_bad, report)
    return report


def _select(sources: dict[str, Loader], wanted: list[str], source_name: str,
            report: ImageStoreReport) -> dict[str, Loader]:
    """Keep the wanted items; wanted ones without an image join ``report.missing``."""
    keep = set(wanted)
    report.ignored = len(set(sources) - keep)
    report.missing = [m for m in report.missing if m[0] in keep]
    listed = {m[0] for m in report.missing}
    report.missing += [(i, f"no image in {source_name}") for i in wanted
                       if i not in sources and i not in listed]
    return {i: sources[i] for i in wanted if i in sources}


def _build(sources: dict[str, Loader], source_name: str, output_path: Path, size: int,
           fmt: str, skip_bad: bool, report: ImageStoreReport) -> None:
    with atomic_directory(output_path) as tmp:
        env = lmdb.open(str(tmp), subdir=True, map_size=64 << 20, max_dbs=0)
        try:
            report.count = _write(env, _encoded(sources, size, fmt, report))
            if (report.missing or report.unreadable) and not skip_bad:
                bad = len(report.missing) + len(report.unreadable)
                raise DataError(
                    f"{source_name}: {bad} of {bad + report.count} items have no usable image "
                    f"({report.problems()}); fix them, or pass --skip-bad-images "
                    "(skip_bad=True) to build the store without them"
                )
            if report.count == 0:
                raise DataError(f"{source_name}: none of the images could be stored "
                                f"({report.problems()})")
            meta = {"size": size, "format": fmt, "count": report.count, "resize": RESIZE,
                    "created_with": f"peftrec {_peftrec_version()}"}
            _write(env, [(META_KEY, json.dumps(meta).encode())])
        finally:
            env.close()


_FIX = "build one with scripts/build_image_store.py"
_open_envs: dict[tuple[int, int], lmdb.Environment] = {}  # by (st_dev, st_ino) of data.mdb
_open_envs_pid = os.getpid()
_open_envs_lock = threading.Lock()


def _environment(path: Path) -> lmdb.Environment:
    """The read-only environment of a store's files in this process, opened on first use.

    py-lmdb refuses to open the same files twice in one process (whatever the path), so
    all readers of a store share one environment. One inherited through fork must not be
    used: the first call in a new process closes the inherited ones (read-only and
    lock-free, so that only unmaps the child's copy) and opens afresh. A store rebuilt at
    the same path has new files, so readers switch to it and the replaced one is closed.
    """
    global _open_envs_pid
    try:
        stat = (path / "data.mdb").stat()
    except FileNotFoundError:
        raise DataError(f"{path}: no data.mdb, so not an image store; {_FIX}") from None
    files = (stat.st_dev, stat.st_ino)
    with _open_envs_lock:
        if _open_envs_pid != os.getpid():
            for inherited in _open_envs.values():
                inherited.close()
            _open_envs.clear()
            _open_envs_pid = os.getpid()
        if files in _open_envs:
            return _open_envs[files]
        for key, replaced in list(_open_envs.items()):
            if replaced.path() == str(path):
                replaced.close()
                del _open_envs[key]
        try:
            env = lmdb.open(str(path), subdir=True, readonly=True, lock=False,
                            readahead=False, meminit=False)
        except lmdb.Error as e:
            raise DataError(f"{path}: cannot open the image store ({e}); {_FIX}") from e
        _open_envs[files] = env
        return env


class ImageStore:
    """Read-only access to a store, safe in DataLoader workers and after pickling.

    The object holds only the path and the metadata; every read goes through the current
    process's environment (see ``_environment``), opened on first use in that process,
    so the store can be pickled for spawn workers and used in fork workers.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).absolute()
        raw = self._lookup(META_KEY)
        try:
            meta = json.loads(raw) if raw is not None else None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{self.path}: unreadable {META_KEY.decode()} record ({e})") from e
        if not isinstance(meta, dict) or "count" not in meta:
            raise DataError(f"{self.path}: an LMDB folder without image store metadata; {_FIX}")
        self.meta: dict[str, Any] = meta

    def _lookup(self, key: bytes) -> bytes | None:
        with _environment(self.path).begin() as txn:
            return txn.get(key)

    def get_bytes(self, item_id: str) -> bytes:
        """The stored encoded image (JPEG/PNG bytes) of ``item_id``."""
        key = item_id.encode()
        data = self._lookup(key) if key != META_KEY else None
        if data is None:
            raise KeyError(f"item {item_id!r} has no image in the store {self.path}")
        return data

    def __getitem__(self, item_id: str) -> Image.Image:
        with Image.open(io.BytesIO(self.get_bytes(item_id))) as image:
            return image.convert("RGB")

    def __contains__(self, item_id: object) -> bool:
        if not isinstance(item_id, str) or item_id.encode() == META_KEY:
            return False
        return self._lookup(item_id.encode()) is not None

    def __len__(self) -> int:
        return int(self.meta["count"])

    def __repr__(self) -> str:
        return f"ImageStore({str(self.path)!r}, {len(self)} images)"
