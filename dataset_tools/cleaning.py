"""Pure cleaning steps on interaction frames (columns user, item, timestamp[, rating], line).

Each step returns a new frame and never mutates its input, so the pipeline in
``folder.prepare_dataset`` can count what every step removed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .errors import DataError

DEDUPE_POLICIES = ("first", "last", "all")


def _time_order_keys(df: pd.DataFrame) -> list[str]:
    return ["timestamp", "line"] if "line" in df.columns else ["timestamp"]


def deduplicate(df: pd.DataFrame, policy: str) -> pd.DataFrame:
    """Keep the earliest ("first") or latest ("last") copy of each user-item pair, or all.

    Repeats come from re-ratings and from ids that merge (ML-100k titles); which copy
    survives decides the position of the item in the user's sequence.
    """
    if policy not in DEDUPE_POLICIES:
        raise DataError(f"dedupe must be one of {', '.join(DEDUPE_POLICIES)}, not {policy!r}")
    if policy == "all":
        return df
    ordered = df.sort_values(_time_order_keys(df), kind="stable")
    keep = ordered.drop_duplicates(["user", "item"], keep=policy).index
    return df[df.index.isin(keep)]


def filter_by_rating(df: pd.DataFrame, min_rating: float | None) -> pd.DataFrame:
    """Keep interactions rated at least ``min_rating`` (treat low ratings as non-positive)."""
    if min_rating is None:
        return df
    if "rating" not in df.columns:
        raise DataError(
            "min_rating is set but the interactions have no rating column; "
            "pass --rating-col or drop --min-rating"
        )
    return df[df["rating"] >= min_rating]


def k_core_rounds(df: pd.DataFrame, k: int) -> tuple[pd.DataFrame, int]:
    """``k_core_filter`` that also returns how many removal rounds were needed."""
    rounds = 0
    if k <= 1 or df.empty:
        return df, rounds
    k = min(k, len(df) + 1)  # any larger k removes everything too; keeps counts comparable
    while True:
        user_counts = df["user"].map(df["user"].value_counts())
        item_counts = df["item"].map(df["item"].value_counts())
        keep = (user_counts >= k) & (item_counts >= k)
        if bool(keep.all()):
            return df, rounds
        df = df[keep.to_numpy()]
        rounds += 1


def k_core_filter(df: pd.DataFrame, k: int) -> pd.DataFrame:
    """Drop users and items with fewer than ``k`` interactions until none is left.

    One pass is not enough: removing a rare item can push a user below ``k`` and so on,
    hence the loop to a fixed point. ``k`` of 0 or 1 leaves the frame unchanged.
    """
    return k_core_rounds(df, k)[0]


def sort_chronologically(df: pd.DataFrame) -> pd.DataFrame:
    """Sort by user, then time; equal timestamps keep their order in the source file."""
    return df.sort_values(["user", *_time_order_keys(df)], kind="stable").reset_index(drop=True)


def keep_last(df: pd.DataFrame, max_history: int | None) -> pd.DataFrame:
    """Keep each user's ``max_history`` most recent interactions (input must be sorted)."""
    if max_history is None or max_history >= len(df):
        return df
    from_end = df.groupby("user", sort=False).cumcount(ascending=False)
    return df[(from_end < max_history).to_numpy()].reset_index(drop=True)


def reindex(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Number items 1..N (0 is padding) and users 0..U-1 by first appearance.

    The input must already be sorted chronologically, which makes the numbering
    deterministic. Returns the frame with ``item_index`` (int32) and ``user_index``
    (int64) columns, the original item ids (``item_ids[i - 1]`` has index ``i``) and
    the original user ids (``user_ids[u]`` has index ``u``).
    """
    item_codes, item_ids = pd.factorize(df["item"], sort=False)
    user_codes, user_ids = pd.factorize(df["user"], sort=False)
    out = df.assign(item_index=(item_codes + 1).astype(np.int32),
                    user_index=user_codes.astype(np.int64))
    return out, [str(i) for i in item_ids], [str(u) for u in user_ids]


def leave_one_out_split(item_indices: list[int]) -> tuple[list[int], int, int]:
    """Split one chronological sequence into (train part, validation target, test target).

    Validation input is the train part; test input is the train part plus the
    validation target. Training never sees the last two items.
    """
    if len(item_indices) < 3:
        raise ValueError(
            f"leave-one-out needs at least 3 interactions, got {len(item_indices)}"
        )
    items = list(item_indices)
    return items[:-2], items[-2], items[-1]
