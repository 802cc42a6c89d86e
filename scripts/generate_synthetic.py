"""Write a synthetic interaction log (interactions.tsv, items.tsv) of any size.

    python scripts/generate_synthetic.py --interactions 1000000 --items 100000 --output-dir DIR
    python scripts/prepare_data.py --input DIR/interactions.tsv --items DIR/items.tsv \\
        --format tsv --user-col user_id --item-col item_id --time-col timestamp --output data/syn
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from peftrec.dataset_tools.synthetic import (
    SyntheticConfig,
    SyntheticLogFolder,
    write_synthetic_log,
)
from peftrec.pretraining.cli import add_settings, cli_parser, parse_args, run_main, settings


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = cli_parser(__doc__)
    add_settings(parser, SyntheticConfig)
    add_settings(parser, SyntheticLogFolder)
    return parse_args(parser, argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_arguments(argv)
    config = SyntheticConfig(**settings(args, SyntheticConfig))
    started = time.perf_counter()
    stats = write_synthetic_log(config, args.output_dir)
    print(f"synthetic log -> {args.output_dir} ({time.perf_counter() - started:.1f} s)")
    for key in ("interactions", "users", "items_used", "catalog_items", "bytes"):
        print(f"  {key:<13}  {stats[key]:,}")


if __name__ == "__main__":
    run_main(main, main_process_only=True)
