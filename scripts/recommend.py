"""Recommend the top-k items of a run folder for known users or for given histories.

    python scripts/recommend.py --run runs/ml-100k-sasrec --users 100k_1 100k_2 --k 10 \\
        --exclude-history --output recs.jsonl
    python scripts/recommend.py --run runs/ml-100k-text --histories histories.jsonl \\
        --items new_items.csv --output recs.jsonl

--histories FILE: one JSON object per line, {"user": optional, "items": [original item
ids, oldest first]}. Each output line is {"user": ..., "items": [{"item_id", "score",
"title"}, ...]}, best first, in input order; an unknown user or item id is an error that
names it. --items (content models only) ranks the items of another item table.
"""

from peftrec.downstream.serving import recommend_parser, recommend_to_file
from peftrec.pretraining.cli import parse_args, run_main


def main(argv=None):
    return recommend_to_file(parse_args(recommend_parser(__doc__), argv))


if __name__ == "__main__":
    run_main(main)
