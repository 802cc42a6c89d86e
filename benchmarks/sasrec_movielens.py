"""SASRec on MovieLens: quality and speed under the foundation protocol.

5-core, chronological leave-one-out, full ranking over the catalog, no history mask.
Prints a table (test HR@10, NDCG@10, MRR, epochs, s/epoch, target positions/s,
data-wait share, evaluation seconds, peak memory) and writes it as JSON + Markdown.

    LD_PRELOAD=libtcmalloc_minimal.so.4 python benchmarks/sasrec_movielens.py \
        --datasets ml-100k ml-1m --output-dir runs/bench-sasrec

Extra flags after `--` go to every pretraining run (e.g. `-- --hidden-size 128`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pretraining.cli import parse_args, pretrain_parser
from pretraining.pipeline import pretrain

COLUMNS = ("dataset", "test hr@10", "test ndcg@10", "test mrr", "epochs", "best epoch",
           "s/epoch", "positions/s", "data wait", "eval s", "peak MB")


def run(dataset: str, output_dir: Path, extra: list[str]) -> dict:
    argv = ["--dataset", dataset, "--output-dir", str(output_dir / dataset), *extra]
    if (output_dir / dataset / "config.json").is_file():
        argv.append("--resume")  # an interrupted benchmark continues where it stopped
    started = time.perf_counter()
    metrics = pretrain(parse_args(pretrain_parser(__doc__), argv))
    total = time.perf_counter() - started
    training = metrics["training"]
    epochs_seconds = (training["seconds_per_epoch"] or 0) * training["epochs"]
    return {
        "dataset": dataset,
        "test hr@10": metrics["test"]["hr@10"],
        "test ndcg@10": metrics["test"]["ndcg@10"],
        "test mrr": metrics["test"]["mrr"],
        "epochs": training["epochs"],
        "best epoch": training["best_epoch"],
        "s/epoch": training["seconds_per_epoch"],
        "positions/s": training["target_positions_per_second"],
        "data wait": training["data_wait_share"],
        # Whatever is not training: per-epoch validation + final valid/test evaluation.
        "eval s": (total - epochs_seconds) / (training["epochs"] + 2),
        "peak MB": training["peak_memory_mb"],
    }


def markdown(rows: list[dict]) -> str:
    def cell(value):
        return f"{value:.4f}" if isinstance(value, float) and value < 1 else (
            f"{value:,.1f}" if isinstance(value, float) else str(value))

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["ml-100k", "ml-1m"])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/bench-sasrec"))
    parser.add_argument("extra", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    extra = [a for a in args.extra if a != "--"]
    rows = [run(name, args.output_dir, extra) for name in args.datasets]
    table = markdown(rows)
    print(table)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "results.json").write_text(json.dumps(rows, indent=2))
    (args.output_dir / "results.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
