"""How fast a run folder recommends on CPU: batch throughput and single-user latency.

Each run is loaded as scripts/recommend.py loads it (`downstream.load_run`), and each user's
history is everything the dataset knows about them (`--users`). Timed calls are
`recommend(histories, k)`, the whole path: original ids in, the model's query, the catalog
scored in chunks with a running top-k, original ids, scores and titles out.

- batch: every user (or the first `--max-users`), in batches of each of `--batch-sizes`;
  users/s is the user count over the median of `--repeats` passes, after one pass of
  warm-up;
- single user: `--latency-users` users one call each (after a few warm-up calls); the
  median and the 90th percentile of the call's milliseconds.

Loading the run is not timed. Torch runs on `--threads` threads (default 1: a figure per
core, steadier on a shared machine).

    python benchmarks/recommend_speed.py --runs runs/rec-bench-id runs/rec-bench-diffrec \\
        --exclude-history --results recommend/ml-100k-cpu
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from results import write_result
from tables import markdown

from peftrec.downstream import load_run

COLUMNS = ("run", "dataset", "backbone", "item encoder", "items", "users", "k")
LATENCY_COLUMNS = ("latency ms (median)", "latency ms (p90)")


def throughput_column(batch_size: int) -> str:
    return f"users/s (batch {batch_size})"


def measure(run: Path, args: argparse.Namespace) -> dict:
    runner = load_run(run, item_chunk_size=args.item_chunk_size, device="cpu")
    users = list(runner.data.sequences["user_id"])[: args.max_users]
    histories = runner.histories_of(users)

    def batch_pass() -> float:
        started = time.perf_counter()
        runner.recommend(histories, args.k, args.exclude_history)
        return time.perf_counter() - started

    throughput = {}
    for batch_size in args.batch_sizes:
        runner.batch_size = batch_size
        batch_pass()  # warm-up
        seconds = statistics.median(batch_pass() for _ in range(args.repeats))
        throughput[throughput_column(batch_size)] = len(histories) / seconds
    single = histories[: args.latency_users]
    for history in single[:5]:  # warm-up
        runner.recommend([history], args.k, args.exclude_history)
    latencies = []
    for history in single:
        started = time.perf_counter()
        runner.recommend([history], args.k, args.exclude_history)
        latencies.append((time.perf_counter() - started) * 1000)
    config = runner.model.config
    return {
        "run": run.name,
        "dataset": runner.data.name,
        "backbone": config.backbone,
        "item encoder": config.item_encoder,
        "items": config.num_items,
        "users": len(histories),
        "k": args.k,
        **throughput,
        "latency ms (median)": statistics.median(latencies),
        "latency ms (p90)": float(np.percentile(latencies, 90)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, nargs="+", required=True,
                        help="run folders of any training script")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--exclude-history", action="store_true",
                        help="never recommend a history item (as scripts/recommend.py)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 256],
                        help="users scored at once: one throughput column each")
    parser.add_argument("--item-chunk-size", type=int, default=100_000)
    parser.add_argument("--max-users", type=int, help="batch: the first N users (default all)")
    parser.add_argument("--repeats", type=int, default=3, help="timed batch passes")
    parser.add_argument("--latency-users", type=int, default=200,
                        help="users timed one call each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--results", metavar="NAME",
                        help="also write benchmarks/results/NAME.{json,md}")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(run, args) for run in args.runs]
    table = markdown(rows, [*COLUMNS, *map(throughput_column, args.batch_sizes),
                            *LATENCY_COLUMNS])
    print(table)
    if args.results:
        settings = {key: getattr(args, key) for key in (
            "k", "exclude_history", "batch_sizes", "item_chunk_size", "repeats",
            "latency_users", "threads")}
        excluded = ", history items excluded" if args.exclude_history else ""
        note = (f"CPU, {args.threads} torch thread(s); every user's whole known sequence as "
                f"history{excluded}; users/s over the median of {args.repeats} passes; "
                f"latency: one user per call, {args.latency_users} users.")
        path = write_result(args.results, rows, f"{table}\n\n{note}\n", settings)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
