"""Build a peftrec dataset folder from raw interaction logs or a built-in MovieLens set.

    python scripts/prepare_data.py --input ratings.csv --format csv --k-core 5
        --user-col user --item-col item --time-col ts --output data/mydata
    python scripts/prepare_data.py --dataset ml-1m --output data/ml-1m
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from peftrec.dataset_tools import BUILTIN_DATASETS, PrepareConfig, prepare_builtin, prepare_dataset
from peftrec.dataset_tools.folder import ENGINES
from peftrec.dataset_tools.out_of_core import MEMORY_LIMIT
from peftrec.pretraining.cli import add_settings, cli_parser, parse_args, run_main, settings


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli_parser(__doc__)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", type=Path, help="interaction file")
    source.add_argument("--dataset", choices=sorted(BUILTIN_DATASETS),
                        help="a built-in dataset (5-core, first copy of duplicates kept)")
    p.add_argument("--items", type=Path, help="optional item file (titles, genres, ...)")
    p.add_argument("--format", choices=["recbole", "movielens", "csv", "tsv", "jsonl"],
                   help="format of --input (and --items)")
    p.add_argument("--user-col", help="user id column (csv/tsv/jsonl; recbole: user_id)")
    p.add_argument("--item-col", help="item id column (csv/tsv/jsonl; recbole: item_id)")
    p.add_argument("--items-item-col", help="item id column of --items (default: --item-col)")
    p.add_argument("--time-col", help="Unix-seconds timestamp column (recbole: timestamp)")
    p.add_argument("--rating-col", help="rating column (needed for --min-rating)")
    add_settings(p.add_argument_group("cleaning (--input)"), PrepareConfig)
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="how --input is cleaned. duckdb: out of core, for logs larger than memory; "
                   "pandas: in memory; "
                   "auto: duckdb where installed (pip install 'peftrec[streaming]'). "
                   "Both write the same folder")
    p.add_argument("--memory-limit", default=MEMORY_LIMIT,
                   help="--engine duckdb: DuckDB's memory cap (e.g. 4GB); sorts and "
                   "aggregations beyond it spill to a temporary folder under $TMPDIR")
    p.add_argument("--output", "--output-dir", type=Path, required=True,
                   help="dataset folder to write: new, empty or an earlier dataset "
                   "folder (replaced atomically)")
    args = parse_args(p, argv)
    if args.input is not None and args.format is None:
        p.error("--input needs --format")
    return args


def print_statistics(folder: Path) -> None:
    info = json.loads((folder / "dataset_info.json").read_text(encoding="utf-8"))
    stats = dict(info["statistics"])
    dropped = stats.pop("dropped")
    rows = [(k, stats[k]) for k in stats] + [(f"dropped: {k}", v) for k, v in dropped.items()]
    width = max(len(k) for k, _ in rows)
    print(f"dataset {info['name']} -> {folder}")
    for key, value in rows:
        print(f"  {key:<{width}}  {value:,}" if isinstance(value, int) else
              f"  {key:<{width}}  {value}")
    print(f"  {'fingerprint':<{width}}  {info['fingerprint'][:16]}")


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    if args.dataset is not None:
        folder = prepare_builtin(args.dataset, args.output)
    else:
        folder = prepare_dataset(
            args.input, args.format, args.output, PrepareConfig(**settings(args, PrepareConfig)),
            items_path=args.items,
            user_col=args.user_col, item_col=args.item_col, time_col=args.time_col,
            rating_col=args.rating_col, items_item_col=args.items_item_col, engine=args.engine,
            memory_limit=args.memory_limit,
        )
    print_statistics(folder)


if __name__ == "__main__":
    run_main(main, main_process_only=True)
