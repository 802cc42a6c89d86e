"""The dataset folder: build it from raw files (``prepare_dataset``) and load it back.

Layout: ``sequences/`` and ``items/`` (Hugging Face ``datasets`` saved to disk,
memory-mapped on load) plus ``dataset_info.json`` with sources, settings, statistics,
the split protocol and a content fingerprint, and ``checksums.json`` (see ``integrity``),
verified on load.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from .atomic import atomic_directory
from .cleaning import (
    DEDUPE_POLICIES,
    deduplicate,
    filter_by_rating,
    k_core_rounds,
    keep_last,
    reindex,
    sort_chronologically,
)
from .errors import DataError
from .integrity import damaged_file, write_checksums
from .out_of_core import INSTALL_HINT, MEMORY_LIMIT, duckdb_available, spilled_log
from .readers import read_interaction_chunks, read_interactions, read_items

SCHEMA_VERSION = 1
INFO_FILE = "dataset_info.json"
# "duckdb" cleans out of core (logs larger than memory), "pandas" in memory, "auto" picks
# duckdb where it is installed.
ENGINES = ("auto", "duckdb", "pandas")
CHUNK_ROWS = 1 << 20  # rows read at a time by the duckdb engine
SPLIT_PROTOCOL = (
    "leave-one-out: last item = test target, second to last = validation target, rest = training"
)


@dataclass(frozen=True)
class PrepareConfig:
    """Cleaning settings; all of them are recorded in ``dataset_info.json``."""

    # A field with help text is a flag of scripts/prepare_data.py (pretraining.cli).
    k_core: int = field(default=5, metadata={  # to a fixed point
        "help": "users and items need at least K interactions (0 or 1: off)"})
    min_rating: float | None = field(default=None, metadata={
        "help": "keep interactions rated at least this (needs --rating-col)"})
    dedupe: str = field(default="first", metadata={
        "choices": DEDUPE_POLICIES, "help": "which copy of a repeated user-item pair to keep"})
    max_history: int | None = field(default=None, metadata={  # after the k-core
        "help": "keep each user's last N interactions"})
    min_user_interactions: int = 3  # shorter users cannot be leave-one-out split

    def __post_init__(self) -> None:
        if not isinstance(self.k_core, int) or self.k_core < 0:
            raise DataError(f"k_core must be an integer >= 0, not {self.k_core!r}")
        if self.dedupe not in DEDUPE_POLICIES:
            raise DataError(
                f"dedupe must be one of {', '.join(DEDUPE_POLICIES)}, not {self.dedupe!r}"
            )
        if self.max_history is not None and (
            not isinstance(self.max_history, int) or self.max_history < 3
        ):
            raise DataError(
                f"max_history must be an integer >= 3 (leave-one-out needs 3), "
                f"not {self.max_history!r}"
            )
        if not isinstance(self.min_user_interactions, int) or self.min_user_interactions < 3:
            raise DataError(
                "min_user_interactions must be an integer >= 3 (leave-one-out needs a training "
                f"item, a validation and a test target), not {self.min_user_interactions!r}"
            )
        if self.min_rating is not None and not np.isfinite(self.min_rating):
            raise DataError(f"min_rating must be a finite number, not {self.min_rating!r}")


@dataclass
class SequenceData:
    """A loaded dataset folder: memory-mapped tables plus its metadata."""

    path: Path
    info: dict[str, Any]
    sequences: Any  # datasets.Dataset: user_id, item_indices, timestamps
    items: Any  # datasets.Dataset: item_id + text fields, row i = item index i + 1

    @property
    def num_items(self) -> int:
        """Catalog size N, excluding the padding index 0."""
        return len(self.items)

    @property
    def num_users(self) -> int:
        return len(self.sequences)

    @property
    def fingerprint(self) -> str:
        return str(self.info["fingerprint"])

    @property
    def name(self) -> str:
        return str(self.info["name"])


def _file_source(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"path": str(path.resolve()), "sha256": digest.hexdigest(), "bytes": path.stat().st_size}


def _peftrec_version() -> str:
    try:
        return metadata.version("peftrec")
    except metadata.PackageNotFoundError:
        return "dev"


def _fingerprint(sequences: pa.Table, items: pa.Table) -> str:
    """SHA-256 over the content of both tables, independent of Arrow chunking and files."""
    digest = hashlib.sha256()
    for table in (sequences, items):
        for name in table.column_names:
            column = table.column(name).combine_chunks()
            digest.update(f"{name}:{column.type}\n".encode())
            if pa.types.is_list(column.type):
                digest.update(np.asarray(column.offsets).astype(np.int64).tobytes())
                column = column.flatten()
            if pa.types.is_string(column.type):
                digest.update("\x00".join(column.to_pylist()).encode())
            else:
                digest.update(column.to_numpy(zero_copy_only=False).tobytes())
    return digest.hexdigest()


def _sequence_table(df: pd.DataFrame, user_ids: list[str]) -> pa.Table:
    """One row per user; list columns built from offsets, not Python lists (fast)."""
    counts = np.bincount(df["user_index"].to_numpy(), minlength=len(user_ids))
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    timestamps = df["timestamp"].to_numpy()
    return pa.table({
        "user_id": pa.array(user_ids, pa.string()),
        "item_indices": pa.ListArray.from_arrays(offsets, pa.array(df["item_index"].to_numpy())),
        "timestamps": pa.ListArray.from_arrays(offsets, pa.array(timestamps)),
    })


def _item_table(item_ids: list[str], items: pd.DataFrame | None) -> pa.Table:
    columns: dict[str, Any] = {"item_id": pa.array(item_ids, pa.string())}
    if items is not None:
        first = items.drop_duplicates("item", keep="first").set_index("item")
        aligned = first.reindex(item_ids).fillna("")
        for name in aligned.columns:
            columns[name] = pa.array(aligned[name].astype(str).tolist(), pa.string())
    return pa.table(columns)


def _write_folder(target: Path, sequences: pa.Table, items: pa.Table, info: dict) -> None:
    """Write the three parts; kept separate so tests can fail it half-way."""
    from datasets import Dataset
    from datasets import utils as hf_utils

    bars_were_on = not hf_utils.are_progress_bars_disabled()
    hf_utils.disable_progress_bars()  # a bar per tiny table is noise in logs
    # datasets' own cache fingerprints are derived from ours: left to itself, `Dataset`
    # pickles the whole table to hash it, which doubled peak memory on a 100M-row log.
    fingerprint = info["fingerprint"][:32]
    try:
        Dataset(sequences, fingerprint=f"{fingerprint}-sequences").save_to_disk(
            str(target / "sequences"))
        Dataset(items, fingerprint=f"{fingerprint}-items").save_to_disk(str(target / "items"))
    finally:
        if bars_were_on:
            hf_utils.enable_progress_bars()
    (target / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    write_checksums(target)


def _resolve_engine(engine: str) -> str:
    """``auto`` is duckdb where it is installed, else pandas."""
    if engine not in ENGINES:
        raise DataError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == "pandas" or (engine == "auto" and not duckdb_available()):
        return "pandas"
    if not duckdb_available():
        raise DataError(f"engine duckdb needs the duckdb package: {INSTALL_HINT}")
    return "duckdb"


def _read_item_file(path: Path | None, fmt: str, item_col: str | None) -> pd.DataFrame | None:
    return None if path is None else read_items(path, fmt, item_col)


def _clean_in_memory(df: pd.DataFrame, config: PrepareConfig
                     ) -> tuple[pd.DataFrame, list[str], list[str], dict[str, int]]:
    """Filter, de-duplicate, k-core, sort and re-index a log held in memory; returns
    ``reindex``'s frame and ids and what each step dropped."""
    dropped: dict[str, int] = {"input_interactions": len(df)}
    n = len(df)
    df = filter_by_rating(df, config.min_rating)
    dropped["rating"], n = n - len(df), len(df)
    df = deduplicate(df, config.dedupe)
    dropped["duplicates"], n = n - len(df), len(df)
    df, rounds = k_core_rounds(df, config.k_core)
    dropped["k_core_rounds"], dropped["k_core_removed"], n = rounds, n - len(df), len(df)
    df = keep_last(sort_chronologically(df), config.max_history)
    dropped["max_history"], n = n - len(df), len(df)
    lengths = df.groupby("user", sort=False)["user"].transform("size")
    short = lengths < config.min_user_interactions
    dropped["short_users"] = int(df.loc[short.to_numpy(), "user"].nunique())
    df = df[~short.to_numpy()].reset_index(drop=True)
    dropped["short_user_interactions"] = n - len(df)
    return (*reindex(df), dropped)


def check_output_folder(output_dir: str | os.PathLike[str],
                        *inputs: str | os.PathLike[str] | None) -> None:
    """Refuse an output folder whose atomic replacement would delete something else: one of
    the ``inputs``, or an existing file or folder that is not a dataset folder (an empty
    folder is fine)."""
    out = Path(os.path.abspath(output_dir))
    for source in inputs:
        if source is not None and out in (Path(os.path.abspath(source)), *Path(
                os.path.abspath(source)).parents):
            raise DataError(
                f"{output_dir}: the output folder holds the input {source}, which replacing "
                "it would delete; write the dataset elsewhere"
            )
    if out.exists() and not (out.is_dir() and ((out / INFO_FILE).is_file()
                                               or not any(out.iterdir()))):
        raise DataError(
            f"{output_dir}: exists and is not a peftrec dataset folder (no {INFO_FILE}), and "
            "writing would replace it; pick a new folder or remove it first"
        )


def prepare_dataset(
    interactions_path: str | os.PathLike[str],
    fmt: str,
    output_dir: str | os.PathLike[str],
    config: PrepareConfig = PrepareConfig(),
    items_path: str | os.PathLike[str] | None = None,
    user_col: str | None = None,
    item_col: str | None = None,
    time_col: str | None = None,
    rating_col: str | None = None,
    items_fmt: str | None = None,
    items_item_col: str | None = None,
    name: str | None = None,
    engine: str = "auto",
    memory_limit: str = MEMORY_LIMIT,
) -> Path:
    """Read, clean, re-index and split raw logs into a dataset folder, written atomically.

    ``items_fmt`` / ``items_item_col`` default to ``fmt`` / ``item_col``; ``name``
    defaults to the output folder's name. ``engine`` (see ``ENGINES``) picks how the log
    is cleaned; both give the same folder. ``memory_limit``: DuckDB's cap (duckdb engine).
    """
    interactions_path, output_dir = Path(interactions_path), Path(output_dir)
    items_path = None if items_path is None else Path(items_path)
    check_output_folder(output_dir, interactions_path, items_path)
    columns = {"user_col": user_col, "item_col": item_col, "time_col": time_col,
               "rating_col": rating_col}
    if _resolve_engine(engine) == "duckdb":
        chunks = read_interaction_chunks(interactions_path, fmt, **columns,
                                         chunk_rows=CHUNK_ROWS)
        with spilled_log(chunks, memory_limit) as log:
            items_df = _read_item_file(items_path, items_fmt or fmt, items_item_col or item_col)
            df, item_ids, user_ids, dropped = log.clean(config)
    else:
        df = read_interactions(interactions_path, fmt, **columns)
        items_df = _read_item_file(items_path, items_fmt or fmt, items_item_col or item_col)
        df, item_ids, user_ids, dropped = _clean_in_memory(df, config)
    if df.empty:
        raise DataError(
            f"no interactions left after {config.k_core}-core filtering of "
            f"{interactions_path.name} (rating >= {config.min_rating}, dedupe "
            f"{config.dedupe}, at least {config.min_user_interactions} per user); "
            "lower --k-core or --min-rating"
        )

    sequences = _sequence_table(df, user_ids)
    items = _item_table(item_ids, items_df)
    lengths = np.bincount(df["user_index"].to_numpy())
    info = {
        "schema_version": SCHEMA_VERSION,
        "name": name or output_dir.name,
        "sources": [_file_source(p) for p in (interactions_path, items_path) if p is not None],
        "settings": {
            **asdict(config),
            "format": fmt,
            "items_format": (items_fmt or fmt) if items_path is not None else None,
            "user_col": user_col,
            "item_col": item_col,
            "time_col": time_col,
            "rating_col": rating_col,
        },
        "statistics": {
            "users": len(user_ids),
            "items": len(item_ids),
            "interactions": len(df),
            "avg_length": round(float(lengths.mean()), 3),
            "median_length": float(np.median(lengths)),
            "sparsity": round(1.0 - len(df) / (len(user_ids) * len(item_ids)), 6),
            "dropped": dropped,
        },
        "split": SPLIT_PROTOCOL,
        "fingerprint": _fingerprint(sequences, items),
        "created_with": _peftrec_version(),
    }
    with atomic_directory(output_dir) as tmp:
        _write_folder(tmp, sequences, items, info)
    return output_dir


def load_dataset_folder(path: str | os.PathLike[str]) -> SequenceData:
    """Open a folder written by ``prepare_dataset``; refuse anything else with a clear error."""
    from datasets import load_from_disk

    path = Path(path)
    fix = "write one with scripts/prepare_data.py"
    if not path.is_dir():
        raise DataError(f"{path}: no such dataset folder; {fix}")
    info_file = path / INFO_FILE
    if not info_file.is_file():
        raise DataError(f"{path}: no {INFO_FILE}, so not a peftrec dataset folder; {fix}")
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{info_file}: not valid JSON ({e}); {fix}") from e
    version = info.get("schema_version") if isinstance(info, dict) else None
    if version != SCHEMA_VERSION:
        raise DataError(
            f"{info_file}: schema_version {version!r}, expected {SCHEMA_VERSION}; "
            "rebuild the folder with scripts/prepare_data.py"
        )
    for part in ("sequences", "items"):
        if not (path / part).is_dir():
            raise DataError(f"{path}: missing {part}/ folder; {fix}")
    problem = damaged_file(path)
    if problem:
        raise DataError(f"{problem}; rebuild the folder with scripts/prepare_data.py")
    return SequenceData(path=path, info=info, sequences=load_from_disk(str(path / "sequences")),
                        items=load_from_disk(str(path / "items")))
