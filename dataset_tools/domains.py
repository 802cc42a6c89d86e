"""Split one dataset folder into two item-disjoint domains (source and target).

Every item goes to exactly one domain by a rule on one field of the item table:

- values (``SplitRule.values("genre", ["Comedy", "Drama"])``): an item goes to the source
  when its field value, or the FIRST value of a multi-valued field (split on whitespace,
  ``|`` or ``,``: ML-1M's genre "Comedy Romance" counts as "Comedy"), is one of the
  listed values; every other item goes to the target. Matching is exact (case-sensitive).
- numeric range (``SplitRule.range("release_year", None, 1990)``): an item goes to the
  source when its value lies in the half-open range [lo, hi) (a missing bound is open);
  every other item goes to the target. Every value must be a number.

A user may appear in both domains. Each domain keeps only the interactions with its own
items, in the same order and with the same timestamps, re-indexes its items from 1 by
first appearance (0 is padding) and is an ordinary dataset folder; its
``dataset_info.json`` records the split (parent fingerprint, field, rule, side). Users
left with fewer interactions than leave-one-out needs (3) are dropped from that domain
only; k-core is NOT re-run (that would move items across domains). An item whose only
interactions came from dropped users leaves that domain's catalog and is counted as
``items_without_interactions``. Exactly: source interactions + target interactions +
dropped interactions = interactions of the input folder.

Everything is computed and checked before anything is written; both folders are then
written atomically.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from .atomic import atomic_directory
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

SIDES = ("source", "target")
MULTI_VALUE_SEPARATORS = re.compile(r"[\s|,]+")


@dataclass(kw_only=True)
class SplitSettings:
    """The settings of scripts/split_domains.py (a flag each, pretraining.cli)."""

    dataset: str = field(metadata={
        "help": "built-in name (ml-100k, ml-1m, ...) or a dataset folder"})
    # The flag is --field: below this line `field` in the class body is this setting,
    # so the fields after it call dataclasses.field.
    field: str = field(metadata={
        "help": "item table column that decides the domain (e.g. genre)"})
    # One of these two: the group is exclusive and required.
    source_values: str | None = dataclasses.field(default=None, metadata={
        "help": "comma-separated values: an item whose value (or first value of a "
        "multi-valued field) is listed goes to the source"})
    source_range: str | None = dataclasses.field(default=None, metadata={
        "help": "LO,HI: items with LO <= value < HI go to the source (',1990': < 1990; "
        "'1990,': >= 1990)"})
    source_output: Path = dataclasses.field(metadata={"help": "source dataset folder to write"})
    target_output: Path = dataclasses.field(metadata={"help": "target dataset folder to write"})
    source_name: str | None = dataclasses.field(default=None, metadata={
        "help": "source dataset name (default: its folder's name)"})
    target_name: str | None = dataclasses.field(default=None, metadata={
        "help": "target dataset name (default: its folder's name)"})


RULE_SETTINGS = ("source_values", "source_range")


@dataclass(frozen=True)
class SplitRule:
    """Which items go to the source domain; all others go to the target."""

    field: str
    source_values: tuple[str, ...] | None = None
    lower: float | None = None  # range split: source = [lower, upper)
    upper: float | None = None

    @classmethod
    def values(cls, field_name: str, values: Sequence[str]) -> SplitRule:
        cleaned = tuple(dict.fromkeys(str(v).strip() for v in values if str(v).strip()))
        if not cleaned:
            raise DataError(f"--source-values for field {field_name!r} lists no value")
        return cls(field=field_name, source_values=cleaned)

    @classmethod
    def range(cls, field_name: str, lower: float | None, upper: float | None) -> SplitRule:
        if lower is None and upper is None:
            raise DataError(
                f"--source-range for field {field_name!r} needs a lower or an upper bound "
                "(LO,HI means LO <= value < HI; either side may be empty)"
            )
        for bound in (lower, upper):
            if bound is not None and not math.isfinite(bound):
                raise DataError(f"--source-range bounds must be finite numbers, not {bound!r}")
        if lower is not None and upper is not None and lower >= upper:
            raise DataError(
                f"--source-range [{lower:g}, {upper:g}) for field {field_name!r} is empty; "
                "the lower bound must be below the upper bound"
            )
        return cls(field=field_name, lower=lower, upper=upper)

    @classmethod
    def parse_range(cls, field_name: str, text: str) -> SplitRule:
        """``"LO,HI"``, ``",HI"`` (value < HI) or ``"LO,"`` (value >= LO)."""
        parts = text.split(",")
        if len(parts) != 2:
            raise DataError(
                f"--source-range {text!r}: expected LO,HI (e.g. ',1990' for < 1990, "
                "'1990,' for >= 1990, '1980,1990' for 1980 <= value < 1990)"
            )
        bounds: list[float | None] = []
        for part in parts:
            part = part.strip()
            try:
                bounds.append(float(part) if part else None)
            except ValueError:
                raise DataError(f"--source-range {text!r}: {part!r} is not a number") from None
        return cls.range(field_name, bounds[0], bounds[1])

    @property
    def kind(self) -> str:
        return "values" if self.source_values is not None else "range"

    def describe(self) -> str:
        if self.source_values is not None:
            return (f"{self.field} (or its first value) in {{{', '.join(self.source_values)}}}"
                    " -> source; the rest -> target")
        if self.lower is None:
            test = f"{self.field} < {self.upper:g}"
        elif self.upper is None:
            test = f"{self.field} >= {self.lower:g}"
        else:
            test = f"{self.lower:g} <= {self.field} < {self.upper:g}"
        return f"{test} -> source; the rest -> target"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"field": self.field, "kind": self.kind,
                               "description": self.describe()}
        if self.source_values is not None:
            out["source_values"] = list(self.source_values)
        else:
            out["source_range"] = [self.lower, self.upper]
        return out

    def assign(self, items: pd.DataFrame, where: str = "the item table") -> np.ndarray:
        """A boolean per item row: True = source. Raises DataError on a bad field/value."""
        if self.field not in items.columns:
            raise DataError(
                f"--field {self.field!r} is not a column of {where}; "
                f"it has: {', '.join(map(str, items.columns))}"
            )
        raw = items[self.field].astype(object).where(items[self.field].notna(), "")
        text = raw.astype(str).str.strip()
        if self.source_values is not None:
            first = text.map(lambda v: MULTI_VALUE_SEPARATORS.split(v, maxsplit=1)[0])
            wanted = set(self.source_values)
            return (text.isin(wanted) | first.isin(wanted)).to_numpy()
        numbers = pd.to_numeric(text, errors="coerce").to_numpy(dtype=float)
        bad = ~np.isfinite(numbers)
        if bad.any():
            ids = _item_ids(items)
            shown = ", ".join(f"{text.iloc[i]!r} (item {ids[i]!r})"
                              for i in np.flatnonzero(bad)[:3])
            more = ", ..." if bad.sum() > 3 else ""
            raise DataError(
                f"--field {self.field!r}: {int(bad.sum())} of {len(items)} items have a "
                f"non-numeric value ({shown}{more}); a range split needs numbers: fix them "
                "in the item table or split by --source-values"
            )
        source = np.ones(len(numbers), dtype=bool)
        if self.lower is not None:
            source &= numbers >= self.lower
        if self.upper is not None:
            source &= numbers < self.upper
        return source


def _item_ids(items: pd.DataFrame) -> list[str]:
    column = "item_id" if "item_id" in items.columns else None
    if column is None:
        return [str(i + 1) for i in range(len(items))]
    return items[column].astype(str).tolist()


@dataclass
class Domain:
    """One side of a split, computed in memory and not yet written."""

    side: str
    name: str
    sequences: pa.Table
    items: pa.Table
    statistics: dict[str, Any]
    fingerprint: str
    info: dict[str, Any] = field(default_factory=dict)


def _flatten(data: SequenceData) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(user row per interaction, item index, timestamp, user ids) of a dataset folder."""
    table = data.sequences.with_format("arrow")[:]
    items = table.column("item_indices").combine_chunks()
    times = table.column("timestamps").combine_chunks()
    lengths = np.diff(np.asarray(items.offsets))
    users = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    return (users, items.flatten().to_numpy(), times.flatten().to_numpy(),
            [str(u) for u in table.column("user_id").to_pylist()])


def _statistics(num_users: int, num_items: int, lengths: np.ndarray,
                dropped: dict[str, int]) -> dict[str, Any]:
    interactions = int(lengths.sum())
    return {
        "users": num_users,
        "items": num_items,
        "interactions": interactions,
        "avg_length": round(float(lengths.mean()), 3),
        "median_length": float(np.median(lengths)),
        "sparsity": round(1.0 - interactions / (num_users * num_items), 6),
        "dropped": dropped,
    }


def compute_domains(
    data: SequenceData,
    rule: SplitRule,
    names: tuple[str, str] = ("source", "target"),
) -> dict[str, Domain]:
    """Split a loaded dataset folder into its two domains, in memory, with every check.

    Raises DataError (nothing is written by this function) when the field is missing, a
    range split meets a non-numeric value, or a domain ends up with no items or no user
    with enough interactions for leave-one-out.
    """
    min_len = int(data.info.get("settings", {}).get("min_user_interactions", 3))
    items_arrow = data.items.with_format("arrow")[:]
    items_df = items_arrow.to_pandas()
    is_source = rule.assign(items_df, f"the item table of {data.path}")
    users, flat_items, times, user_ids = _flatten(data)
    total = len(flat_items)
    counts_by_side = {"source": int(is_source.sum()), "target": int((~is_source).sum())}
    for side, count in counts_by_side.items():
        if count == 0:
            other = "target" if side == "source" else "source"
            raise DataError(
                f"the {side} domain would have no items (0 of {len(is_source)}): "
                f"{rule.describe()} sends every item of {data.name} to the {other}; "
                "change the split" + _seen_values_hint(rule, items_df)
            )

    domains: dict[str, Domain] = {}
    kept_users: dict[str, set[int]] = {}
    for side, name in zip(SIDES, names, strict=True):
        mine = is_source if side == "source" else ~is_source
        keep = mine[flat_items - 1]
        u, it, ts = users[keep], flat_items[keep], times[keep]
        per_user = np.bincount(u, minlength=len(user_ids))
        long_enough = per_user >= min_len
        short_users = int(((per_user > 0) & ~long_enough).sum())
        kept = long_enough[u]
        if not kept.any():
            raise DataError(
                f"the {side} domain ({rule.describe()}) keeps no user with >= {min_len} "
                f"interactions: its {counts_by_side[side]} items have {len(it)} interactions "
                f"from {int((per_user > 0).sum())} users, each with fewer than {min_len}"
            )
        u, it, ts = u[kept], it[kept], ts[kept]
        item_codes, parent_items = pd.factorize(it, sort=False)  # first appearance
        user_codes, parent_users = pd.factorize(u, sort=False)  # parent order (sorted ids)
        frame = pd.DataFrame({"user_index": user_codes.astype(np.int64),
                              "item_index": (item_codes + 1).astype(np.int32),
                              "timestamp": ts})
        sequences = _sequence_table(frame, [user_ids[i] for i in parent_users])
        items = items_arrow.take(pa.array(np.asarray(parent_items, dtype=np.int64) - 1))
        dropped = {
            "input_interactions": total,
            "other_domain_interactions": int(total - keep.sum()),
            "short_users": short_users,
            "short_user_interactions": int((~kept).sum()),
            "items_without_interactions": counts_by_side[side] - len(parent_items),
        }
        lengths = np.bincount(user_codes)
        domains[side] = Domain(
            side=side, name=name, sequences=sequences, items=items,
            statistics=_statistics(len(parent_users), len(parent_items), lengths, dropped),
            fingerprint=_fingerprint(sequences, items),
        )
        kept_users[side] = set(parent_users.tolist())

    dropped_total = sum(d.statistics["dropped"]["short_user_interactions"]
                        for d in domains.values())
    kept_total = sum(d.statistics["interactions"] for d in domains.values())
    assert kept_total + dropped_total == total, (kept_total, dropped_total, total)
    summary = {
        side: {
            "name": d.name,
            "fingerprint": d.fingerprint,
            "assigned_items": counts_by_side[side],
            **{k: d.statistics[k] for k in ("users", "items", "interactions")},
            "dropped_users": d.statistics["dropped"]["short_users"],
            "dropped_interactions": d.statistics["dropped"]["short_user_interactions"],
            "items_without_interactions": d.statistics["dropped"]["items_without_interactions"],
        }
        for side, d in domains.items()
    }
    for side, d in domains.items():
        d.info = {
            "schema_version": SCHEMA_VERSION,
            "name": d.name,
            "sources": data.info.get("sources", []),
            "settings": data.info.get("settings", {}),
            "statistics": d.statistics,
            "split": SPLIT_PROTOCOL,
            "domain_split": {
                "side": side,
                "parent": {"name": data.name, "path": str(Path(data.path).absolute()),
                           "fingerprint": data.fingerprint, "interactions": total,
                           "users": len(user_ids), "items": len(is_source)},
                "field": rule.field,
                "rule": rule.to_dict(),
                "min_user_interactions": min_len,
                "domains": summary,
                "dropped_interactions": dropped_total,
                "users_in_both": len(kept_users["source"] & kept_users["target"]),
            },
            "fingerprint": d.fingerprint,
            "created_with": _peftrec_version(),
        }
    return domains


def _seen_values_hint(rule: SplitRule, items: pd.DataFrame) -> str:
    if rule.source_values is None:
        return ""
    text = items[rule.field].astype(str).str.strip()
    first = text.map(lambda v: MULTI_VALUE_SEPARATORS.split(v, maxsplit=1)[0])
    seen = first.value_counts().index.tolist()
    shown = ", ".join(map(str, seen[:10])) + (", ..." if len(seen) > 10 else "")
    return f" (first values present: {shown})"


def write_domain(domain: Domain, output_dir: str | os.PathLike[str]) -> Path:
    """Write one computed domain as a dataset folder, atomically."""
    with atomic_directory(output_dir) as tmp:
        _write_folder(tmp, domain.sequences, domain.items, domain.info)
    return Path(output_dir)


def _absolute(path: Path) -> Path:
    """Absolute and normalized ('..' resolved as text, symbolic links kept)."""
    return Path(os.path.abspath(path))


def _nested(a: Path, b: Path) -> bool:
    """Whether one of two paths lies inside the other."""
    a, b = _absolute(a), _absolute(b)
    return a in b.parents or b in a.parents


def split_domains(
    dataset: str | os.PathLike[str] | SequenceData,
    source_output: str | os.PathLike[str],
    target_output: str | os.PathLike[str],
    rule: SplitRule,
    source_name: str | None = None,
    target_name: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[Path, Path]:
    """Split a dataset folder or built-in name into source and target dataset folders.

    Names default to the output folders' names. Nothing is written unless every check
    passes; each folder is then replaced atomically (the target first, the source last).
    """
    source_output, target_output = Path(source_output), Path(target_output)
    if _absolute(source_output) == _absolute(target_output):
        raise DataError(f"the source and target outputs are the same folder ({source_output})")
    if _nested(source_output, target_output):
        raise DataError(
            f"the source output {source_output} and the target output {target_output} lie one "
            "inside the other (writing one would delete the other); pick two separate folders"
        )
    if isinstance(dataset, SequenceData):
        data = dataset
    else:
        from .builtin import resolve_dataset

        data = load_dataset_folder(resolve_dataset(dataset, cache_dir))
    parent = _absolute(Path(data.path))
    for out in (source_output, target_output):
        if _absolute(out) == parent:
            raise DataError(f"{out}: an output folder cannot be the input dataset folder")
        if _nested(out, parent):
            raise DataError(
                f"{out}: an output folder cannot contain or lie inside the input dataset "
                f"folder {data.path}; write the domains elsewhere"
            )
        check_output_folder(out)
    domains = compute_domains(
        data, rule, (source_name or source_output.name, target_name or target_output.name)
    )
    with atomic_directory(source_output) as source_tmp:
        _write_folder(source_tmp, domains["source"].sequences, domains["source"].items,
                      domains["source"].info)
        with atomic_directory(target_output) as target_tmp:
            _write_folder(target_tmp, domains["target"].sequences, domains["target"].items,
                          domains["target"].info)
    return source_output, target_output


def describe_split(*folders: str | os.PathLike[str]) -> str:
    """A few lines per domain folder: statistics and what was dropped."""
    import json

    lines = []
    for folder in folders:
        info = json.loads((Path(folder) / "dataset_info.json").read_text(encoding="utf-8"))
        stats, split = info["statistics"], info["domain_split"]
        lines.append(
            f"{split['side']} {info['name']} -> {folder}: {stats['users']:,} users, "
            f"{stats['items']:,} items, {stats['interactions']:,} interactions, average "
            f"length {stats['avg_length']}; dropped {stats['dropped']['short_users']:,} users "
            f"with < {split['min_user_interactions']} interactions "
            f"({stats['dropped']['short_user_interactions']:,} interactions), "
            f"{stats['dropped']['items_without_interactions']:,} items left without any; "
            f"fingerprint {info['fingerprint'][:16]}"
        )
    if folders:
        split = info["domain_split"]
        lines.append(f"rule: {split['rule']['description']}; users in both domains: "
                     f"{split['users_in_both']:,} of {split['parent']['users']:,}")
    return "\n".join(lines)
