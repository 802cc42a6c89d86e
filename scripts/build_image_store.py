"""Build an LMDB image store (one fixed-size JPEG/PNG per item) for image item encoders.

    python scripts/build_image_store.py --source images/ --output-dir data/images
    python scripts/build_image_store.py --source images.zip --output-dir data/images \\
        --items data/mydata --skip-bad-images

--source: a folder or zip of <item_id>.<ext> files, or a CSV with columns item_id,path.
--items: a dataset folder (its item_id column) or an item table; only those items are
stored, and any without an image is reported.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from peftrec.dataset_tools import load_dataset_folder, read_items
from peftrec.dataset_tools.images import ImageStoreSettings, build_image_store
from peftrec.pretraining.cli import add_settings, cli_parser, parse_args, run_main

_ITEM_TABLE_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".item": "recbole"}  # else tsv


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli_parser(__doc__)
    add_settings(parser, ImageStoreSettings)
    return parse_args(parser, argv)


def read_item_ids(path: Path, item_col: str) -> list[str]:
    if path.is_dir():
        return list(load_dataset_folder(path).items["item_id"])
    fmt = _ITEM_TABLE_FORMATS.get(path.suffix.lower(), "tsv")
    return read_items(path, fmt, item_col)["item"].tolist()


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    item_ids = read_item_ids(args.items, args.item_col) if args.items is not None else None
    report = build_image_store(args.source, args.output_dir, size=args.size, fmt=args.format,
                               item_ids=item_ids, skip_bad=args.skip_bad_images)
    print(f"wrote {report.count:,} images ({args.size}x{args.size} {args.format}) "
          f"to {report.path}")
    if report.ignored:
        print(f"  ignored {report.ignored:,} source images of items not in {args.items}")
    if report.missing or report.unreadable:
        print(f"  skipped {report.problems(limit=20)}")


if __name__ == "__main__":
    run_main(main, main_process_only=True)
