"""Write a synthetic interaction log (interactions.tsv, items.tsv) of any size.

    python scripts/generate_synthetic.py --interactions 1000000 --items 100000 --output-dir DIR
    python scripts/prepare_data.py --input DIR/interactions.tsv --items DIR/items.tsv \\
        --format tsv --user-col user_id --item-col item_id --time-col timestamp --output data/syn
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from dataset_tools.synthetic import SyntheticConfig, write_synthetic_log
from pretraining.cli import parse_args, run_main


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", type=Path, help="YAML file of settings; flags override it")
    p.add_argument("--interactions", type=int, required=True, help="total interactions")
    p.add_argument("--items", type=int, required=True, help="catalog size")
    p.add_argument("--users", type=int, help="number of users (default: interactions // 50)")
    p.add_argument("--zipf-exponent", type=float, default=1.1, help="item popularity skew")
    p.add_argument("--topics", type=int, default=50, help="item topics (genres)")
    p.add_argument("--session-gap", type=int, default=3600 * 6,
                   help="seconds, about, between two sessions of a user")
    p.add_argument("--follow-probability", type=float, default=0.7,
                   help="probability that the next item is a successor of the previous one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", type=Path, required=True,
                   help="folder to write (replaced atomically)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return parse_args(p, argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_arguments(argv)
    config = SyntheticConfig(
        num_interactions=args.interactions, num_items=args.items, num_users=args.users,
        zipf_exponent=args.zipf_exponent, num_topics=args.topics, session_gap=args.session_gap,
        follow_probability=args.follow_probability, seed=args.seed,
    )
    started = time.perf_counter()
    stats = write_synthetic_log(config, args.output_dir)
    print(f"synthetic log -> {args.output_dir} ({time.perf_counter() - started:.1f} s)")
    for key in ("interactions", "users", "items_used", "catalog_items", "bytes"):
        print(f"  {key:<13}  {stats[key]:,}")


if __name__ == "__main__":
    run_main(main, main_process_only=True)
