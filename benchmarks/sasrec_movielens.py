"""SASRec on MovieLens: quality and speed under the foundation protocol.

5-core, chronological leave-one-out, full ranking over the catalog, no history mask.
Prints a table (test HR@10, NDCG@10, MRR, epochs, s/epoch, target positions/s,
data-wait share, evaluation seconds, peak memory) and writes it as JSON + Markdown.
Per-epoch figures are medians over the epochs in log.jsonl (robust to a machine that
was briefly busy with something else); evaluation time is measured afresh on the best
checkpoint. A finished run folder is summarised without training again.

    LD_PRELOAD=libtcmalloc_minimal.so.4 python benchmarks/sasrec_movielens.py \
        --datasets ml-100k ml-1m --output-dir runs/bench-sasrec

Extra flags after `--` go to every pretraining run (e.g. `-- --hidden-size 128`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from accelerate import Accelerator
from tables import markdown

from peftrec.pretraining.cli import parse_args, pretrain_parser, protocol_config
from peftrec.pretraining.pipeline import evaluate_checkpoint, load_data, pretrain
from peftrec.pretraining.trainer import BEST_DIR

COLUMNS = ("dataset", "test hr@10", "test ndcg@10", "test mrr", "epochs", "best epoch",
           "s/epoch", "positions/s", "data wait", "eval s", "peak MB")


def run(dataset: str, output_dir: Path, extra: list[str]) -> dict:
    run_dir = output_dir / Path(dataset).name  # a dataset folder: its name, not its path
    args = parse_args(pretrain_parser(__doc__),
                      ["--dataset", dataset, "--output-dir", str(run_dir), *extra])
    if not (run_dir / "metrics.json").is_file():
        # An interrupted benchmark continues where it stopped.
        args.resume = (run_dir / "config.json").is_file()
        pretrain(args)
    return summarize(run_dir, args)


def summarize(run_dir: Path, args) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    seconds = statistics.median(row["seconds"] for row in log)
    data = load_data(args.dataset, args.cache_dir)
    max_len = metrics_config(run_dir)["model"]["backbone_config"]["max_len"]
    train_lengths = np.asarray([len(s) for s in data.sequences["item_indices"]]) - 2
    positions = np.minimum(train_lengths[train_lengths >= 2] - 1, max_len).sum()
    accelerator = Accelerator(cpu=args.cpu)
    started = time.perf_counter()
    evaluate_checkpoint(run_dir / BEST_DIR, data, protocol_config(args), args.eval_batch_size,
                        accelerator)
    return {
        "dataset": data.name,
        "test hr@10": metrics["test"]["hr@10"],
        "test ndcg@10": metrics["test"]["ndcg@10"],
        "test mrr": metrics["test"]["mrr"],
        "epochs": len(log),
        "best epoch": metrics["training"]["best_epoch"],
        "s/epoch": seconds,
        "positions/s": float(positions) / seconds,
        "data wait": statistics.median(row["data_wait_share"] for row in log),
        # Full ranking of every user once (valid and test each took half of this).
        "eval s": (time.perf_counter() - started) / 2,
        "peak MB": metrics["training"]["peak_memory_mb"],
    }


def metrics_config(run_dir: Path) -> dict:
    return json.loads((run_dir / "config.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["ml-100k", "ml-1m"])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/bench-sasrec"))
    parser.add_argument("extra", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    extra = [a for a in args.extra if a != "--"]
    rows = [run(name, args.output_dir, extra) for name in args.datasets]
    table = markdown(rows, COLUMNS)
    print(table)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "results.json").write_text(json.dumps(rows, indent=2))
    (args.output_dir / "results.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
