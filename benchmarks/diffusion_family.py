"""The diffusion family next to SASRec on one dataset, each with the recipe it ships with.

Every row pretrains an ID model on `--dataset` for each seed, each run in its own process
by scripts/pretrain_id.py, the best checkpoint on validation NDCG@10 tested:
- `sasrec`: `--backbone sasrec` (its flags' defaults);
- `diffrec default`, `adrec`, `diffurec`, `dreamrec` (and `dimerec` where that backbone is
  registered): `--backbone NAME` alone, i.e. its default preset (pretraining/presets.py);
- `adrec pcgrad`: ADRec with `--pcgrad`;
- `diffrec paper`: `--preset diffrec-paper`;
- `diffrec plus`: `--preset diffrec-plus`, its item table from the row `sasrec d256` of the
  same seed (a SASRec of the preset's width, trained first); `dreamrec`'s from the row
  `sasrec` (its default preset needs one).
Full ranking over the catalog, all users. The first table has the history unmasked (the
runs' own metrics.json), with the training seconds (the epochs' sum, evaluation excluded)
and the inference seconds per 1,000 test users (a timed full-ranking evaluation of a seeded
sample of `--timing-users`, after a warm-up); the second has the same checkpoints
evaluated with each user's history masked (scripts/evaluate.py --mask-history). Each cell
is the mean ± sample sd over seeds. Finished runs are summarised without training again,
interrupted ones resume, and the masked evaluation and the timing are kept in the run
folder (`evaluation-masked.json`, `inference-timing.json`).

    python benchmarks/diffusion_family.py --dataset ml-100k --seeds 0 1 2 --epochs 50 \\
        --output-dir runs/bench-diffusion-family --results diffusion-family/ml-100k

Extra flags after `--` go to every run (the SASRec rows' without the diffusion settings).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from diffrec_movielens import timed_test
from results import add_run_arguments, publish_report
from tables import markdown, spread

from peftrec.pretraining.cli import evaluate_parser, parse_args, without_diffusion_flags
from peftrec.pretraining.pipeline import evaluate_run, load_checkpoint, run_dataset
from peftrec.pretraining.recommender import BACKBONES
from peftrec.pretraining.trainer import BEST_DIR

ROOT = Path(__file__).resolve().parents[1]
# name -> (the flags of its runs, the row whose run of the same seed gives --init-items-from)
ROWS: dict[str, tuple[list[str], str | None]] = {
    "sasrec": (["--backbone", "sasrec"], None),
    # The item source of diffrec plus: SASRec at that preset's width and length.
    "sasrec d256": (["--backbone", "sasrec", "--hidden-size", "256", "--ffn-size", "1024",
                     "--max-len", "50"], None),
    "diffrec default": (["--backbone", "diffrec"], None),
    "diffrec paper": (["--preset", "diffrec-paper"], None),
    "diffrec plus": (["--preset", "diffrec-plus"], "sasrec d256"),
    "adrec": (["--backbone", "adrec"], None),
    "adrec pcgrad": (["--backbone", "adrec", "--pcgrad"], None),
    "diffurec": (["--backbone", "diffurec"], None),
    # DreamRec's default preset freezes a SASRec run's item table (it needs one).
    "dreamrec": (["--backbone", "dreamrec"], "sasrec"),
}
if "dimerec" in BACKBONES:  # registered by its own module; the table includes it when it is
    ROWS["dimerec"] = (["--backbone", "dimerec"], None)
METRICS = [f"{metric}@{k}" for k in (5, 10, 20) for metric in ("ndcg", "hr")]
COLUMNS = ("model", "seeds", "valid ndcg@10", *METRICS, "train s", "s/1k users")
MASKED_COLUMNS = ("model", "seeds", *METRICS)
MASKED_FILE = "evaluation-masked.json"
TIMING_FILE = "inference-timing.json"


def train(run_dir: Path, flags: list[str], seed: int, dataset: str, epochs: int,
          extra: list[str]) -> None:
    """Pretrain the run in `run_dir` unless it finished; an interrupted one resumes."""
    if (run_dir / "metrics.json").is_file():
        return
    resume = ["--resume"] if (run_dir / "config.json").is_file() else []
    command = [sys.executable, str(ROOT / "scripts" / "pretrain_id.py"), "--dataset", dataset,
               "--output-dir", str(run_dir), "--seed", str(seed), "--epochs", str(epochs),
               "--report-to", "none", *flags, *extra, *resume]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def masked_metrics(run_dir: Path) -> dict:
    """The best checkpoint's metrics with each user's history masked (computed once)."""
    path = run_dir / MASKED_FILE
    if not path.is_file():
        evaluate_run(parse_args(evaluate_parser(""), [
            "--run", str(run_dir), "--mask-history", "--output", str(path)]))
    return json.loads(path.read_text())


def inference_seconds(run_dir: Path, users: int) -> float:
    """Seconds per 1,000 users of the best checkpoint's full ranking (timed once)."""
    path = run_dir / TIMING_FILE
    if not path.is_file():
        args = parse_args(evaluate_parser(""), ["--run", str(run_dir)])
        data = run_dataset(run_dir)
        model = load_checkpoint(run_dir / BEST_DIR, data)
        _, seconds = timed_test(model, data, args, users)
        path.write_text(json.dumps({"users": users, "seconds_per_1000_users": seconds}))
    return json.loads(path.read_text())["seconds_per_1000_users"]


def run_record(run_dir: Path, timing_users: int) -> dict:
    """What the tables read from one finished run."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return {"valid": metrics["valid"], "test": metrics["test"],
            "masked": masked_metrics(run_dir)["test"],
            "train_seconds": sum(row["seconds"] for row in log if "seconds" in row),
            "inference_seconds": inference_seconds(run_dir, timing_users)}


def summarize(name: str, runs: list[dict]) -> tuple[dict, dict]:
    """The row of each table (unmasked with costs, masked): mean ± sd over the seeds."""
    def cells(split: str) -> dict:
        return {metric: spread([run[split][metric] for run in runs]) for metric in METRICS}

    unmasked = {"model": name, "seeds": len(runs), **cells("test"),
                "valid ndcg@10": spread([run["valid"]["ndcg@10"] for run in runs]),
                "train s": f"{statistics.mean(run['train_seconds'] for run in runs):,.0f}",
                "s/1k users": f"{statistics.mean(run['inference_seconds'] for run in runs):.2f}",
                "runs": runs}
    return unmasked, {"model": name, "seeds": len(runs), **cells("masked")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--epochs", type=int, default=50, help="the most epochs of every run "
                        "(each stops early by its own --patience)")
    parser.add_argument("--timing-users", type=int, default=1000,
                        help="test users of the timed inference")
    add_run_arguments(parser, "runs/bench-diffusion-family")
    args = parser.parse_args(argv)
    extra = [a for a in args.extra if a != "--"]
    unknown = sorted(set(args.only or ()) - set(ROWS))
    if unknown:
        parser.error(f"--only: unknown rows {unknown}; the rows are {list(ROWS)}")
    wanted = [name for name in ROWS if args.only is None or name in args.only]
    # A row's item source trains first, even when --only leaves its own row out.
    order = list(dict.fromkeys([source for name in wanted if (source := ROWS[name][1])]
                               + wanted))
    unmasked_rows, masked_rows = [], []
    for name in order:
        flags, source = ROWS[name]
        run_dirs = {seed: args.output_dir / name.replace(" ", "-") / f"seed{seed}"
                    for seed in args.seeds}
        if args.summary_only:
            run_dirs = {seed: path for seed, path in run_dirs.items()
                        if (path / "metrics.json").is_file()}
        runs = []
        for seed, run_dir in run_dirs.items():
            items = ([] if source is None else
                     ["--init-items-from", str(args.output_dir / source.replace(" ", "-")
                                               / f"seed{seed}")])
            sasrec = flags[:2] == ["--backbone", "sasrec"]
            train(run_dir, [*flags, *items], seed, args.dataset, args.epochs,
                  without_diffusion_flags(extra) if sasrec else extra)
            if name in wanted:  # an item source alone is no row
                runs.append(run_record(run_dir, args.timing_users))
        if runs:
            unmasked, masked = summarize(name, runs)
            unmasked_rows.append(unmasked)
            masked_rows.append(masked)
    report = (f"History unmasked (test, {args.dataset}):\n\n{markdown(unmasked_rows, COLUMNS)}"
              f"\n\nHistory masked (test, the same checkpoints):\n\n"
              f"{markdown(masked_rows, MASKED_COLUMNS)}\n")
    publish_report(args, unmasked_rows, report,
                   {"dataset": args.dataset, "epochs": args.epochs, "seeds": args.seeds,
                    "extra_flags": extra, "masked_rows": masked_rows})


if __name__ == "__main__":
    main()
