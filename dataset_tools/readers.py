"""Readers for interaction logs and item tables in the formats peftrec accepts.

Every reader returns string ids, numeric timestamps and a 1-based ``line`` column so that
later checks can point the user at the exact line of the source file.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import DataError

INTERACTION_FORMATS = ("recbole", "movielens", "csv", "tsv", "jsonl")

# Genre flags of the GroupLens ``u.item`` file, in column order.
_UITEM_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
_PANDAS_FIELDS = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")
# Timestamps are stored as int64 seconds; larger magnitudes would wrap around silently.
_MAX_TIMESTAMP = 2.0**63


def _check_file(path: Path, what: str = "interactions") -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DataError(f"{path.name}: the file is empty; pass a file with {what}")


def _read_table_chunks(path: Path, sep: str, header: bool, encoding: str = "utf-8",
                       quoting: int = csv.QUOTE_MINIMAL, text: str | None = None,
                       what: str = "interactions", chunk_rows: int | None = None,
                       ) -> Iterator[pd.DataFrame]:
    """Read a delimited file as strings, ``chunk_rows`` rows at a time (None: all at once).

    Blank lines are kept while counting, so row i of the file is line i+1(+header) in the
    ``line`` column, then dropped.
    """
    source = io.StringIO(text) if text is not None else path
    first_line = 2 if header else 1
    try:
        frames = pd.read_csv(
            source, sep=sep, header=0 if header else None, dtype=str, keep_default_na=False,
            quoting=quoting, skip_blank_lines=False, encoding=encoding, chunksize=chunk_rows,
        )
        for df in [frames] if chunk_rows is None else frames:
            df["line"] = np.arange(len(df), dtype=np.int64) + first_line
            first_line += len(df)
            blank = (df.drop(columns="line") == "").all(axis=1)
            yield df[~blank].reset_index(drop=True)
    except pd.errors.ParserError as e:
        m = _PANDAS_FIELDS.search(str(e))
        if m is None:
            raise DataError(f"{path.name}: cannot parse the file ({str(e).strip()})") from e
        want, line, saw = m.groups()
        raise DataError(
            f"{path.name} line {line}: expected {want} fields, found {saw}; "
            f"fix or remove that line (is the separator {sep!r} used inside a field?)"
        ) from e
    except pd.errors.EmptyDataError as e:
        raise DataError(f"{path.name}: the file is empty; pass a file with {what}") from e
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path.name}: not valid {encoding} text ({e.reason}); save the file as {encoding}"
        ) from e


def _read_table(path: Path, sep: str, header: bool, encoding: str = "utf-8",
                quoting: int = csv.QUOTE_MINIMAL, text: str | None = None,
                what: str = "interactions") -> pd.DataFrame:
    """The whole of ``_read_table_chunks``' file as one frame."""
    (df,) = _read_table_chunks(path, sep, header, encoding, quoting, text, what)
    return df


def _read_jsonl(path: Path, what: str = "interactions") -> pd.DataFrame:
    rows, lines = [], []
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(
            f"{path.name} line {line}: not valid utf-8 text ({e.reason}); save the file as utf-8"
        ) from e
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path.name} line {number}: not valid JSON ({e.msg}); "
                "each line must hold one JSON object"
            ) from e
        if not isinstance(obj, dict):
            raise DataError(
                f"{path.name} line {number}: expected a JSON object, "
                f"found {type(obj).__name__}"
            )
        rows.append({k: "" if v is None else str(v) for k, v in obj.items()})
        lines.append(number)
    if not rows:
        raise DataError(f"{path.name}: the file is empty; pass a file with {what}")
    df = pd.DataFrame(rows, dtype=str).fillna("")
    df["line"] = np.asarray(lines, dtype=np.int64)
    return df


def _strip_recbole_types(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """RecBole headers are ``name:type``; keep the name (each name once)."""
    names = [c.split(":", 1)[0] for c in df.columns if c != "line"]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(
            f"{path.name}: column {repeated[0]!r} appears more than once in the header; "
            "rename or remove the extra one"
        )
    return df.rename(columns={c: c.split(":", 1)[0] for c in df.columns if c != "line"})


def _require_columns(df: pd.DataFrame, path: Path, wanted: dict[str, str | None]) -> None:
    available = ", ".join(c for c in df.columns if c != "line")
    for flag, name in wanted.items():
        if name == "line":
            raise DataError(
                f"{path.name}: {flag} line: the column name 'line' is reserved for source "
                "line numbers; rename that column in the file"
            )
        if name is None:
            raise DataError(
                f"{path.name}: {flag} is required for this format; "
                f"available columns: {available}"
            )
        if name not in df.columns:
            raise DataError(
                f"{path.name}: no column {name!r} (given by {flag}); "
                f"available columns: {available}"
            )


def _check_nonempty(df: pd.DataFrame, path: Path, column: str, what: str,
                    need: str = "every interaction needs a user, an item and a timestamp",
                    ) -> None:
    empty = (df[column] == "").to_numpy()
    if empty.any():
        line = int(df["line"].to_numpy()[empty.argmax()])
        raise DataError(
            f"{path.name} line {line}: empty {what} field; {need} (fix or remove that line)"
        )


def _to_number(df: pd.DataFrame, path: Path, column: str, what: str, hint: str) -> pd.Series:
    values = pd.to_numeric(df[column], errors="coerce")
    bad = values.isna().to_numpy() | ~np.isfinite(values.to_numpy(dtype=np.float64))
    if bad.any():
        i = int(bad.argmax())
        raw = df[column].iloc[i]
        line = int(df["line"].iloc[i])
        problem = f"empty {what} field" if raw == "" else f"{what} {raw!r} is not a number"
        raise DataError(f"{path.name} line {line}: {problem}; {hint}")
    huge = np.abs(values.to_numpy(dtype=np.float64)) >= _MAX_TIMESTAMP
    if what == "timestamp" and huge.any():
        i = int(huge.argmax())
        raise DataError(
            f"{path.name} line {int(df['line'].iloc[i])}: timestamp {df[column].iloc[i]!r} is "
            f"out of range (|t| < 2**63); {hint}"
        )
    return values


def _finish(df: pd.DataFrame, path: Path, user: str, item: str, time: str,
            rating: str | None) -> pd.DataFrame:
    """Validate required fields and return the canonical interaction frame."""
    for column, what in ((user, "user"), (item, "item"), (time, "timestamp")):
        _check_nonempty(df, path, column, what)
    ts = _to_number(df, path, time, "timestamp",
                    "timestamps must be Unix seconds (convert the column first)")
    if ts.dtype.kind == "f" and bool((ts == np.floor(ts)).all()):
        ts = ts.astype(np.int64)
    out = pd.DataFrame({
        "user": df[user].astype(str).to_numpy(),
        "item": df[item].astype(str).to_numpy(),
        "timestamp": ts.to_numpy(),
    })
    if rating is not None:
        out["rating"] = _to_number(
            df, path, rating, "rating", "ratings must be numbers (or drop --rating-col)"
        ).astype(np.float64).to_numpy()
    out["line"] = df["line"].to_numpy()
    return out


def _is_grouplens_dat(path: Path) -> bool:
    with path.open(encoding="latin-1") as f:
        return "::" in f.readline()


def _checked_source(path: str | Path, fmt: str, what: str = "interactions") -> Path:
    path = Path(path)
    if fmt not in INTERACTION_FORMATS:
        raise DataError(f"unknown format {fmt!r}; choose one of {', '.join(INTERACTION_FORMATS)}")
    _check_file(path, what)
    return path


def _read_recbole_chunks(path: Path, what: str = "interactions",
                         chunk_rows: int | None = None) -> Iterator[pd.DataFrame]:
    # RecBole atomic files are tab-separated with `name:type` headers and no quoting.
    for df in _read_table_chunks(path, "\t", header=True, quoting=csv.QUOTE_NONE, what=what,
                                 chunk_rows=chunk_rows):
        yield _strip_recbole_types(df, path)


def read_interactions(path: str | Path, fmt: str, user_col: str | None = None,
                      item_col: str | None = None, time_col: str | None = None,
                      rating_col: str | None = None) -> pd.DataFrame:
    """Read an interaction log into columns user, item, timestamp[, rating], line.

    ``line`` is the 1-based line of each row in the source file (for error messages);
    drop it before writing anything.
    """
    (df,) = read_interaction_chunks(path, fmt, user_col, item_col, time_col, rating_col)
    return df


def read_interaction_chunks(path: str | Path, fmt: str, user_col: str | None = None,
                            item_col: str | None = None, time_col: str | None = None,
                            rating_col: str | None = None, chunk_rows: int | None = None,
                            ) -> Iterator[pd.DataFrame]:
    """``read_interactions`` in frames of at most ``chunk_rows`` rows (None: one frame), with
    the same checks and messages, so a log larger than memory can be streamed.

    csv, tsv and recbole files are read chunk by chunk; movielens and jsonl files (never
    that large) are read whole. A chunk's timestamps are int64 when all of its values are
    whole numbers, float64 otherwise.
    """
    path = _checked_source(path, fmt)
    if fmt == "recbole":
        frames = _read_recbole_chunks(path, chunk_rows=chunk_rows)
        user_col, item_col = user_col or "user_id", item_col or "item_id"
        time_col = time_col or "timestamp"
    elif fmt == "movielens":
        frames = iter([_read_movielens_ratings(path)])
        user_col, item_col, time_col, rating_col = "user", "item", "timestamp", "rating"
    elif fmt == "jsonl":
        frames = iter([_read_jsonl(path)])
    else:
        frames = _read_table_chunks(path, "," if fmt == "csv" else "\t", header=True,
                                    chunk_rows=chunk_rows)
    read_any = False
    for df in frames:
        if fmt == "recbole" and rating_col is None and "rating" in df.columns:
            rating_col = "rating"
        wanted = {"--user-col": user_col, "--item-col": item_col, "--time-col": time_col}
        if rating_col is not None:
            wanted["--rating-col"] = rating_col
        _require_columns(df, path, wanted)
        assert user_col and item_col and time_col  # checked just above
        if not df.empty:  # a chunk of blank lines only
            read_any = True
            yield _finish(df, path, user_col, item_col, time_col, rating_col)
    if not read_any:
        raise DataError(f"{path.name}: the file has a header but no interactions")


def _read_movielens_ratings(path: Path) -> pd.DataFrame:
    """ratings.dat (UserID::MovieID::Rating::Timestamp) or u.data (tab-separated)."""
    if _is_grouplens_dat(path):
        text = path.read_text(encoding="latin-1").replace("::", "\t")
        df = _read_table(path, "\t", header=False, quoting=csv.QUOTE_NONE, text=text)
    else:
        df = _read_table(path, "\t", header=False, quoting=csv.QUOTE_NONE)
    if df.shape[1] != 5:
        raise DataError(
            f"{path.name}: expected 4 fields per line (user, item, rating, timestamp), "
            f"found {df.shape[1] - 1}; is this a MovieLens ratings.dat or u.data file?"
        )
    df.columns = ["user", "item", "rating", "timestamp", "line"]
    return df


def read_items(path: str | Path, fmt: str, item_col: str | None = None) -> pd.DataFrame:
    """Read an item table into a column ``item`` (same id space as interactions) + text fields."""
    path = _checked_source(path, fmt, "items")
    if fmt == "recbole":
        (df,) = _read_recbole_chunks(path, "items")
        item_col = item_col or "item_id"
    elif fmt == "movielens":
        df = _read_movielens_items(path)
        item_col = "item"
    elif fmt == "jsonl":
        df = _read_jsonl(path, "items")
    else:
        df = _read_table(path, "," if fmt == "csv" else "\t", header=True, what="items")
    _require_columns(df, path, {"--item-col": item_col})
    assert item_col is not None
    _check_nonempty(df, path, item_col, "item", "every row of an item file needs an item id")
    df = df.rename(columns={item_col: "item"})
    fields = [c for c in df.columns if c not in ("item", "line")]
    return df[["item", *fields]].astype(str).reset_index(drop=True)


def _read_movielens_items(path: Path) -> pd.DataFrame:
    """movies.dat (MovieID::Title::Genres) or u.item (pipe-separated, genre flags)."""
    text = path.read_text(encoding="latin-1")
    first = text.split("\n", 1)[0]
    if "::" in first:
        df = _read_table(path, "\t", header=False, quoting=csv.QUOTE_NONE,
                         text=text.replace("::", "\t"), what="items")
        if df.shape[1] != 4:
            raise DataError(f"{path.name}: expected MovieID::Title::Genres on every line")
        df.columns = ["item", "title", "genres", "line"]
        df["genres"] = df["genres"].str.replace("|", ", ", regex=False)
        return df
    df = _read_table(path, "|", header=False, quoting=csv.QUOTE_NONE, text=text, what="items")
    if df.shape[1] != 5 + len(_UITEM_GENRES) + 1:
        raise DataError(
            f"{path.name}: expected {5 + len(_UITEM_GENRES)} '|'-separated fields per line "
            "(a GroupLens u.item file) or MovieID::Title::Genres (movies.dat)"
        )
    flags = df.iloc[:, 5:5 + len(_UITEM_GENRES)].to_numpy() == "1"
    genres = [", ".join(g for g, on in zip(_UITEM_GENRES, row, strict=True) if on) for row in flags]
    return pd.DataFrame({"item": df[0], "title": df[1], "release_date": df[2],
                         "genres": genres, "line": df["line"]})
