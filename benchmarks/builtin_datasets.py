"""Statistics of the built-in datasets, as prepared (and, for a domain pair, as split).

Prepares each built-in on first use (into $PEFTREC_CACHE) and reads its
dataset_info.json: users, items, interactions, history lengths, and for the two sides of a
domain split the users present in both and what the split dropped.

    python benchmarks/builtin_datasets.py --results datasets/builtins
"""

from __future__ import annotations

import argparse

from results import write_result
from tables import markdown

from peftrec.dataset_tools import BUILTIN_DATASETS, load_dataset_folder, resolve_dataset

COLUMNS = ("dataset", "users", "items", "interactions", "avg length", "median length",
           "split", "users dropped (interactions)", "users in both domains")


def dataset_row(name: str) -> dict:
    info = load_dataset_folder(resolve_dataset(name)).info
    stats = info["statistics"]
    row = {"dataset": name, "users": stats["users"], "items": stats["items"],
           "interactions": stats["interactions"], "avg length": stats["avg_length"],
           "median length": stats.get("median_length", ""), "split": ""}
    split = info.get("domain_split")
    if split:
        side = split["domains"][split["side"]]
        row.update({"split": f"{split['side']} of {split['parent']['name']}: "
                             f"{split['rule']['description']}",
                    "users dropped (interactions)":
                        f"{side['dropped_users']:,} ({side['dropped_interactions']:,})",
                    "users in both domains": split["users_in_both"]})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=sorted(BUILTIN_DATASETS))
    parser.add_argument("--results", metavar="NAME", help="write benchmarks/results/NAME.*")
    args = parser.parse_args()
    rows = [dataset_row(name) for name in args.datasets]
    table = markdown(rows, COLUMNS)
    print(table)
    if args.results:
        print(f"wrote {write_result(args.results, rows, table)}")


if __name__ == "__main__":
    main()
