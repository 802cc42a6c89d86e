"""Read, clean, split and store interaction data as peftrec dataset folders."""

from .atomic import atomic_directory, atomic_write, clean_interrupted_writes
from .builtin import (
    BUILTIN_DATASETS,
    BUILTIN_SPLITS,
    locate_movielens,
    prepare_builtin,
    resolve_dataset,
)
from .cleaning import (
    deduplicate,
    filter_by_rating,
    k_core_filter,
    leave_one_out_split,
    reindex,
    sort_chronologically,
)
from .domains import SplitRule, compute_domains, describe_split, split_domains
from .errors import DataError
from .folder import PrepareConfig, SequenceData, load_dataset_folder, prepare_dataset
from .images import ImageStore, ImageStoreReport, build_image_store
from .item_text import (
    ItemTextTemplate,
    default_template,
    read_amazon_metadata,
    read_amazon_reviews,
    read_mind_behaviors,
    read_mind_news,
)
from .readers import read_interactions, read_items
from .subset import user_subset, write_user_subset
from .synthetic import SyntheticConfig, generate_sequences, write_synthetic_log

__all__ = [
    "BUILTIN_DATASETS",
    "BUILTIN_SPLITS",
    "DataError",
    "ImageStore",
    "ImageStoreReport",
    "ItemTextTemplate",
    "PrepareConfig",
    "SequenceData",
    "SplitRule",
    "SyntheticConfig",
    "atomic_directory",
    "atomic_write",
    "clean_interrupted_writes",
    "build_image_store",
    "compute_domains",
    "deduplicate",
    "default_template",
    "describe_split",
    "filter_by_rating",
    "generate_sequences",
    "k_core_filter",
    "leave_one_out_split",
    "load_dataset_folder",
    "locate_movielens",
    "prepare_builtin",
    "prepare_dataset",
    "read_amazon_metadata",
    "read_amazon_reviews",
    "read_interactions",
    "read_items",
    "read_mind_behaviors",
    "read_mind_news",
    "reindex",
    "resolve_dataset",
    "sort_chronologically",
    "split_domains",
    "user_subset",
    "write_synthetic_log",
    "write_user_subset",
]
