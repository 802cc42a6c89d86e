"""Read, clean, split and store interaction data as peftrec dataset folders."""

from .atomic import atomic_directory
from .builtin import BUILTIN_DATASETS, locate_movielens, prepare_builtin, resolve_dataset
from .cleaning import (
    deduplicate,
    filter_by_rating,
    k_core_filter,
    leave_one_out_split,
    reindex,
    sort_chronologically,
)
from .errors import DataError
from .folder import PrepareConfig, SequenceData, load_dataset_folder, prepare_dataset
from .readers import read_interactions, read_items
from .synthetic import SyntheticConfig, generate_sequences, write_synthetic_log

__all__ = [
    "BUILTIN_DATASETS",
    "DataError",
    "PrepareConfig",
    "SequenceData",
    "SyntheticConfig",
    "atomic_directory",
    "deduplicate",
    "filter_by_rating",
    "generate_sequences",
    "k_core_filter",
    "leave_one_out_split",
    "load_dataset_folder",
    "locate_movielens",
    "prepare_builtin",
    "prepare_dataset",
    "read_interactions",
    "read_items",
    "reindex",
    "resolve_dataset",
    "sort_chronologically",
    "write_synthetic_log",
]
