"""A random share of a dataset folder's users as a dataset folder of its own: the
pretraining-data axis of a scaling study (benchmarks/scaling.py).

    write_user_subset("ml-1m", "runs/data/ml-1m-users-0.1", fraction=0.1, seed=0)

Each chosen user keeps its whole sequence (so its leave-one-out split is the parent's); the
catalog keeps the items those users interacted with, in the parent's order, re-indexed from
1, with every item field. The same parent, fraction and seed always choose the same users.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from .atomic import atomic_directory
from .builtin import resolve_dataset
from .domains import _flatten, _statistics
from .errors import DataError
from .folder import (
    SCHEMA_VERSION,
    SPLIT_PROTOCOL,
    SequenceData,
    _fingerprint,
    _peftrec_version,
    _sequence_table,
    _write_folder,
    check_output_folder,
    load_dataset_folder,
)


def user_subset(data: SequenceData, fraction: float, seed: int = 0
                ) -> tuple[pa.Table, pa.Table, dict]:
    """The sequences, items and dataset_info of `fraction` of `data`'s users (at least one),
    chosen uniformly at random by `seed`."""
    if not 0 < fraction <= 1:
        raise DataError(f"the share of users must be in (0, 1], not {fraction!r}")
    count = max(1, round(fraction * data.num_users))
    chosen = np.sort(np.random.default_rng(seed).choice(data.num_users, count, replace=False))
    users, items, times, user_ids = _flatten(data)
    keep = np.isin(users, chosen)
    users, items, times = users[keep], items[keep], times[keep]
    kept_items = np.unique(items)  # parent indices, ascending: the parent's order
    frame = pd.DataFrame({"user_index": np.searchsorted(chosen, users).astype(np.int64),
                          "item_index": (np.searchsorted(kept_items, items) + 1).astype(np.int32),
                          "timestamp": times})
    sequences = _sequence_table(frame, [user_ids[i] for i in chosen])
    item_table = data.items.with_format("arrow")[:].take(pa.array(kept_items - 1))
    dropped = {"other_users": data.num_users - count,
               "other_user_interactions": int((~keep).sum()),
               "items_without_interactions": data.num_items - len(kept_items)}
    fingerprint = _fingerprint(sequences, item_table)
    info = {
        "schema_version": SCHEMA_VERSION,
        "name": f"{data.name}-users-{fraction:g}",
        "sources": data.info.get("sources", []),
        "settings": data.info.get("settings", {}),
        "statistics": _statistics(count, len(kept_items), np.bincount(frame["user_index"]),
                                  dropped),
        "split": SPLIT_PROTOCOL,
        "user_subset": {
            "parent": {"name": data.name, "path": str(Path(data.path).absolute()),
                       "fingerprint": data.fingerprint, "users": data.num_users,
                       "items": data.num_items, "interactions": len(keep)},
            "fraction": fraction,
            "seed": seed,
        },
        "fingerprint": fingerprint,
        "created_with": _peftrec_version(),
    }
    return sequences, item_table, info


def write_user_subset(dataset: str | os.PathLike[str], output_dir: str | os.PathLike[str],
                      fraction: float, seed: int = 0) -> Path:
    """Write `user_subset` of a dataset (a built-in name or a dataset folder) as a dataset
    folder, atomically; returns `output_dir`."""
    parent = resolve_dataset(dataset)
    check_output_folder(output_dir, parent)
    sequences, items, info = user_subset(load_dataset_folder(parent), fraction, seed)
    with atomic_directory(output_dir) as tmp:
        _write_folder(tmp, sequences, items, info)
    return Path(output_dir)
