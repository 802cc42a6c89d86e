"""Build a peftrec dataset folder from raw interaction logs or a built-in MovieLens set.

    python scripts/prepare_data.py --input ratings.csv --format csv --k-core 5
        --user-col user --item-col item --time-col ts --output data/mydata
    python scripts/prepare_data.py --dataset ml-1m --output data/ml-1m
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from peftrec.dataset_tools import PrepareConfig, prepare_builtin, prepare_dataset
from peftrec.dataset_tools.builtin import PREPARE_SOURCES, PrepareDataSettings
from peftrec.pretraining.cli import add_settings, cli_parser, parse_args, run_main, settings


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli_parser(__doc__)
    add_settings(parser.add_mutually_exclusive_group(required=True), PrepareDataSettings,
                 PREPARE_SOURCES)
    add_settings(parser, PrepareDataSettings, exclude=PREPARE_SOURCES)
    add_settings(parser.add_argument_group("cleaning (--input)"), PrepareConfig)
    args = parse_args(parser, argv)
    if args.input is not None and args.format is None:
        parser.error("--input needs --format")
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
