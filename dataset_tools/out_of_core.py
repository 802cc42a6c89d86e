"""Clean a log larger than memory with DuckDB: the same steps and result as the pandas
pipeline of ``folder.prepare_dataset``, with memory bounded by the number of distinct users
and items instead of the number of interactions.

The log is read in chunks; each chunk's user and item ids become integer codes (the only
part kept in memory: one dictionary entry per distinct id) and is spilled to Parquet. DuckDB
then de-duplicates, filters to the k-core fixed point and sorts on disk under a memory cap.

Why DuckDB rather than Polars' streaming engine: DuckDB takes a memory cap and spills
sorts, aggregations and joins beyond it to disk. Measured once on this project's 2-core
machine (DuckDB 2.0.1, Polars 2.1.0), de-duplication, 5-core and the final sort of the
same 10M-row integer log: DuckDB 24 s and 0.8 GB peak under a 1 GB cap, Polars (streaming
collect per step) 34 s and 1.8 GB with no cap to set. benchmarks/preparation.py measures
the whole command against the pandas engine.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import DataError

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .folder import PrepareConfig

# DuckDB's own memory cap (default of --memory-limit); sorts and aggregations beyond it
# spill to the temporary folder. With the id dictionaries and the finished arrays this
# keeps a 100M-row log under 6 GB.
MEMORY_LIMIT = "2GB"
INSTALL_HINT = "pip install 'peftrec[streaming]' (or duckdb)"
# The temporary folders under $TMPDIR: WORK_PREFIX + random + "/", each beside its lock file
# (the same name + ".lock").
WORK_PREFIX = "peftrec-prepare-"


def duckdb_available() -> bool:
    try:
        import duckdb  # noqa: F401
    except ImportError:
        return False
    return True


class _Codes:
    """Integer codes for string ids, in order of first sight, kept across chunks."""

    def __init__(self) -> None:
        self.code_of: dict[str, int] = {}

    def encode(self, ids: pd.Series) -> np.ndarray:
        local, uniques = pd.factorize(ids, sort=False)
        code_of = self.code_of
        codes = np.fromiter((code_of.setdefault(i, len(code_of)) for i in uniques),
                            np.int64, len(uniques))
        return codes[local]

    def ids(self) -> pa.Array:
        """The ids, ``ids()[code]`` being the id of ``code``."""
        return pa.array(list(self.code_of), pa.string())


class SpilledLog:
    """An interaction log spilled to Parquet as integer codes, ready for ``clean``."""

    def __init__(self, folder: Path, memory_limit: str = MEMORY_LIMIT) -> None:
        self.folder = folder
        self.memory_limit = memory_limit  # DuckDB's cap, e.g. "2GB"
        self.users, self.items = _Codes(), _Codes()
        self.rows, self.fractional, self.rated = 0, False, False

    def append(self, number: int, df: pd.DataFrame) -> None:
        table = pa.table({
            "u": self.users.encode(df["user"]),
            "i": self.items.encode(df["item"]),
            "t": df["timestamp"].to_numpy(),
            **({"rating": df["rating"].to_numpy()} if "rating" in df.columns else {}),
            "line": df["line"].to_numpy(),
        })
        pq.write_table(table, self.folder / "parts" / f"{number:06d}.parquet")
        self.rows += len(df)
        self.fractional |= df["timestamp"].dtype.kind == "f"
        self.rated = "rating" in df.columns

    def clean(self, config: PrepareConfig
              ) -> tuple[pd.DataFrame, list[str], list[str], dict[str, int]]:
        """``folder.prepare_dataset``'s cleaning, on disk. Returns what the pandas pipeline
        has after ``reindex``: a frame of ``user_index``, ``item_index`` and ``timestamp``
        sorted by user then time, the item ids (``item_ids[i - 1]`` has index ``i``), the
        user ids and the ``dropped`` counts. Running out of memory or of disk space is a
        DataError naming the fix."""
        import duckdb

        if config.min_rating is not None and not self.rated:
            raise DataError(
                "min_rating is set but the interactions have no rating column; "
                "pass --rating-col or drop --min-rating"
            )
        con = duckdb.connect(str(self.folder / "prepare.duckdb"), config={
            "memory_limit": self.memory_limit, "temp_directory": str(self.folder / "spill"),
            "preserve_insertion_order": False,
        })
        try:
            return self._clean(con, config)
        except (duckdb.OutOfMemoryException, duckdb.IOException) as error:
            raise DataError(self._resource_problem(error)) from None
        finally:
            con.close()

    def _resource_problem(self, error: Exception) -> str:
        """One line for DuckDB running out of disk (spilling, or writing its database)
        or of memory: what ran out and what to change. Re-raises any other I/O error."""
        import duckdb

        text = str(error)
        # DuckDB reports a full spill folder as out of memory, naming its temp-size setting.
        if "max_temp_directory_size" in text or "No space left" in text:
            return (f"the duckdb engine ran out of disk space in its temporary folder "
                    f"{self.folder} ({_first_line(error)}); free space there, or set TMPDIR "
                    "to a folder on a disk with room for about twice the log, and rerun")
        if isinstance(error, duckdb.OutOfMemoryException):
            return (f"the duckdb engine ran out of memory under its cap of {self.memory_limit} "
                    f"({_first_line(error)}); rerun with a larger --memory-limit if the "
                    "machine has that much free, or on a machine with more memory")
        raise error

    def _clean(self, con, config: PrepareConfig
               ) -> tuple[pd.DataFrame, list[str], list[str], dict[str, int]]:
        def count(table: str = "log") -> int:
            return int(con.sql(f"SELECT count(*) FROM {table}").fetchall()[0][0])

        def keep(query: str) -> None:
            con.sql(f"CREATE TABLE kept AS {query}")
            con.sql("DROP TABLE log; ALTER TABLE kept RENAME TO log")

        # Chunks whose timestamps were all whole are int64; one fractional chunk makes the
        # whole column float64 (union_by_name widens), as when the file is read at once.
        rated = ("" if config.min_rating is None
                 else f"WHERE rating >= {float(config.min_rating)!r}")  # e.g. 4.0, 1e-05
        parts = str(self.folder / "parts" / "*.parquet").replace("'", "''")  # a SQL string
        con.sql("CREATE TABLE log AS SELECT u, i, t, line FROM "
                f"read_parquet('{parts}', union_by_name = true) {rated}")
        dropped = {"input_interactions": self.rows}
        dropped["rating"], n = self.rows - count(), count()

        if config.dedupe != "all":  # the earliest (first) or latest (last) copy by time, line
            pick = "min" if config.dedupe == "first" else "max"
            keep(f"SELECT u, i, c.t AS t, c.line AS line FROM (SELECT u, i, "
                 f"{pick}({{'t': t, 'line': line}}) AS c FROM log GROUP BY u, i)")
        dropped["duplicates"], n = n - count(), count()

        rounds, k = 0, config.k_core
        while k > 1:  # to a fixed point, round by round as cleaning.k_core_rounds
            con.sql("CREATE OR REPLACE TEMP TABLE rare_u AS "
                        f"SELECT u FROM log GROUP BY u HAVING count(*) < {k}")
            con.sql("CREATE OR REPLACE TEMP TABLE rare_i AS "
                        f"SELECT i FROM log GROUP BY i HAVING count(*) < {k}")
            if count("rare_u") + count("rare_i") == 0:
                break
            keep("SELECT * FROM log ANTI JOIN rare_u USING (u) ANTI JOIN rare_i USING (i)")
            rounds += 1
        dropped["k_core_rounds"], dropped["k_core_removed"], n = rounds, n - count(), count()

        if config.max_history is not None:  # each user's latest max_history
            keep("SELECT * FROM log QUALIFY row_number() OVER (PARTITION BY u "
                 f"ORDER BY t DESC, line DESC) <= {config.max_history}")
        dropped["max_history"] = n - count()

        lengths = con.sql("SELECT u, count(*) AS n FROM log GROUP BY u").to_arrow_table()
        lengths = lengths.combine_chunks()
        short = pc.less(lengths["n"], config.min_user_interactions).combine_chunks()
        dropped["short_users"] = int(pc.sum(short).as_py() or 0)
        dropped["short_user_interactions"] = int(
            pc.sum(pc.filter(lengths["n"], short)).as_py() or 0)

        # Users are numbered in the order of their ids (the pandas pipeline sorts by id),
        # items by first appearance in that user-then-time order.
        user_ids, item_ids = self.users.ids(), self.items.ids()
        kept = pc.filter(lengths["u"], pc.invert(short)).combine_chunks()
        users = pa.table({"u": kept.take(pc.sort_indices(user_ids.take(kept))),
                          "user_index": np.arange(len(kept), dtype=np.int32)})
        con.register("users", users)
        con.sql("CREATE TABLE kept AS SELECT user_index, i, t, line "
                    "FROM log JOIN users USING (u)")
        item_codes = con.sql("SELECT i FROM kept GROUP BY i ORDER BY "
                             "min({'user': user_index, 't': t, 'line': line})"
                             ).to_arrow_table()["i"].combine_chunks()
        con.register("items", pa.table({
            "i": item_codes, "item_index": np.arange(1, len(item_codes) + 1, dtype=np.int32)}))

        rows = count("kept")
        columns = {"user_index": np.empty(rows, np.int32), "item_index": np.empty(rows, np.int32),
                   "timestamp": np.empty(rows, np.float64 if self.fractional else np.int64)}
        ordered = con.sql("SELECT user_index, item_index, t FROM kept JOIN items USING (i) "
                          "ORDER BY user_index, t, line")
        start = 0
        for batch in ordered.to_arrow_reader(1 << 20):
            end = start + batch.num_rows
            for position, column in enumerate(columns.values()):
                column[start:end] = batch.column(position).to_numpy()
            start = end
        frame = pd.DataFrame(columns, copy=False)  # no second copy of a 100M-row log
        return (frame, item_ids.take(item_codes).to_pylist(),
                user_ids.take(users["u"]).to_pylist(), dropped)


def _first_line(error: Exception) -> str:
    """DuckDB's message without the advice lines it appends (SQL settings, links)."""
    return str(error).strip().splitlines()[0]


def check_memory_limit(memory_limit: str) -> None:
    """Refuse a memory cap DuckDB cannot read, before any of the log is read."""
    import duckdb

    try:
        duckdb.connect(":memory:", config={"memory_limit": memory_limit}).close()
    except (duckdb.ParserException, duckdb.InvalidInputException) as error:
        raise DataError(f"--memory-limit {memory_limit!r} is not a size DuckDB reads "
                        f"({_first_line(error)}); give one such as 4GB") from None


@contextmanager
def spilled_log(chunks: Iterable[pd.DataFrame],
                memory_limit: str = MEMORY_LIMIT) -> Iterator[SpilledLog]:
    """Read ``chunks`` (from ``read_interaction_chunks``) into a ``SpilledLog`` in a
    temporary folder (under $TMPDIR: about the log's size on disk), deleted on exit;
    DuckDB's memory cap is `memory_limit` (e.g. "2GB")."""
    check_memory_limit(memory_limit)
    with work_folder() as work:
        log = SpilledLog(work, memory_limit)
        (log.folder / "parts").mkdir()
        for number, df in enumerate(chunks):
            log.append(number, df)
        yield log


@contextmanager
def work_folder() -> Iterator[Path]:
    """A new folder under $TMPDIR, deleted on exit; first deletes those of killed runs.

    A killed run cannot delete its own folder (the log's size on disk, spilled as Parquet,
    and DuckDB's database and spill files), so each run holds a lock on a file beside its
    folder while it works, which the operating system drops when the process ends however
    it ends (SIGKILL too); a folder whose lock no one holds belongs to a run that is gone.
    The lock file is made and locked before the folder exists, so a run starting beside
    another never sees that one's folder unlocked.
    """
    from filelock import FileLock

    root = Path(tempfile.gettempdir())
    remove_abandoned_work_folders(root)
    handle, name = tempfile.mkstemp(prefix=WORK_PREFIX, suffix=".lock", dir=root)
    os.close(handle)
    lock_path = Path(name)
    folder = lock_path.with_suffix("")
    with FileLock(lock_path):
        try:
            folder.mkdir()
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            lock_path.unlink(missing_ok=True)


def remove_abandoned_work_folders(root: Path) -> list[Path]:
    """Delete the `work_folder`s under `root` that no live run holds (those of killed runs)
    with their lock files, and return them."""
    from filelock import FileLock, Timeout

    removed = []
    for lock_path in sorted(root.glob(f"{WORK_PREFIX}*.lock")):
        try:
            with FileLock(lock_path, timeout=0):
                folder = lock_path.with_suffix("")
                shutil.rmtree(folder, ignore_errors=True)
                lock_path.unlink(missing_ok=True)
        except (Timeout, OSError):  # a live run's, or another user's
            continue
        removed.append(folder)
    if removed:
        logger.warning("removed the temporary folders of %d killed prepare_data runs: %s",
                       len(removed), ", ".join(map(str, removed)))
    return removed
