"""Content item encoders against IDs in-domain, at an equal training budget.

Every row pretrains a SASRec on `--dataset` with the same settings and the same number of
epochs (`--epochs`, the budget; the best checkpoint by validation NDCG@10 is tested), for
each seed, each run in its own process by the repository's scripts:
- `id`: an item table;
- `text <head>`: the shipped MiniLM, frozen and cached, under each item head
  (`--item-head linear|mlp|moe`; `zca`: its outputs whitened first, `--whitening zca`);
- `text+id <fusion>`: the text vector plus an ID vector (`--item-encoder text+id`,
  `--fusion sum|gate`);
- `... item-bias`: with a learned score offset per item (`--item-bias`);
- `... token-vectors`: with learned word-piece vectors added to the text head's output
  (`--token-vectors`).
With `--lrs`, every row runs at each learning rate (`NAME lr LR`), and the choices below
include the rate. The table reports mean ± sample sd over seeds of test NDCG@10 / HR@10
and validation NDCG@10, the parameters and the time per epoch, next to popularity, then checks the
targets, choosing each family's row on validation only:
- the best text-only row (by validation) reaches >= 85% of the ID row's test NDCG@10 (the
  ID row, too, the best by validation),
- the best text+id row (by validation) reaches >= 100% of it.
Finished runs are summarised without training again; interrupted ones resume.

    python benchmarks/content_vs_id.py --dataset ml-1m --epochs 10 --seeds 0 1 2 \\
        --output-dir runs/bench-in-domain --results in-domain/ml-1m -- --repeat-bias --lr 2e-3

Extra flags after `--` go to every run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from results import add_run_arguments, publish_report
from tables import markdown, spread

ROOT = Path(__file__).resolve().parents[1]
TEXT = ["--encoder", "minilm"]
# (name, script, flags); the family is the name's first word.
ROWS = [
    ("id", "pretrain_id", []),
    ("text linear", "pretrain_text", [*TEXT, "--item-head", "linear"]),
    ("text mlp", "pretrain_text", [*TEXT, "--item-head", "mlp"]),
    # A wide hidden layer: room to give each item a vector its text alone does not imply.
    ("text mlp-2048", "pretrain_text",
     [*TEXT, "--item-head", "mlp", "--head-hidden-size", "2048"]),
    ("text moe", "pretrain_text", [*TEXT, "--item-head", "moe"]),
    # The cached MiniLM vectors whitened with the catalog's statistics before the head.
    ("text linear zca", "pretrain_text", [*TEXT, "--item-head", "linear", "--whitening", "zca"]),
    ("text+id sum", "pretrain_text", [*TEXT, "--item-encoder", "text+id", "--fusion", "sum"]),
    ("text+id gate", "pretrain_text", [*TEXT, "--item-encoder", "text+id", "--fusion", "gate"]),
    ("text+id moe sum", "pretrain_text",
     [*TEXT, "--item-encoder", "text+id", "--item-head", "moe", "--fusion", "sum"]),
    ("text+id moe gate", "pretrain_text",
     [*TEXT, "--item-encoder", "text+id", "--item-head", "moe", "--fusion", "gate"]),
    # A learned score offset per item (--item-bias): what a vector made from an item's text
    # cannot hold. The ID row gets one too, so the reference has the same option.
    ("id item-bias", "pretrain_id", ["--item-bias"]),
    ("text moe item-bias", "pretrain_text", [*TEXT, "--item-head", "moe", "--item-bias"]),
    ("text+id moe sum item-bias", "pretrain_text",
     [*TEXT, "--item-encoder", "text+id", "--item-head", "moe", "--fusion", "sum",
      "--item-bias"]),
    # Learned word-piece vectors added to the head's output (--token-vectors): what tells
    # apart items whose frozen text vectors are close, still from the text alone.
    ("text moe item-bias token-vectors", "pretrain_text",
     [*TEXT, "--item-head", "moe", "--item-bias", "--token-vectors"]),
    ("text moe item-bias token-vectors sum", "pretrain_text",
     [*TEXT, "--item-head", "moe", "--item-bias", "--token-vectors", "--token-pooling", "sum"]),
    ("text+id moe sum item-bias token-vectors", "pretrain_text",
     [*TEXT, "--item-encoder", "text+id", "--item-head", "moe", "--fusion", "sum",
      "--item-bias", "--token-vectors"]),
    ("text+id moe sum item-bias token-vectors sum", "pretrain_text",
     [*TEXT, "--item-encoder", "text+id", "--item-head", "moe", "--fusion", "sum",
      "--item-bias", "--token-vectors", "--token-pooling", "sum"]),
    # The ID vector plus a learned per-dimension scale (zero at start) times the content
    # vector: it starts as the ID model and takes in as much content as helps.
    ("text+id moe scaled item-bias", "pretrain_text",
     [*TEXT, "--item-encoder", "text+id", "--item-head", "moe", "--fusion", "scaled",
      "--item-bias"]),
    ("text+id moe scaled item-bias token-vectors sum", "pretrain_text",
     [*TEXT, "--item-encoder", "text+id", "--item-head", "moe", "--fusion", "scaled",
      "--item-bias", "--token-vectors", "--token-pooling", "sum"]),
]
COLUMNS = ("model", "seeds", "test ndcg@10", "test hr@10", "valid ndcg@10", "parameters",
           "epochs", "s/epoch")
TARGETS = {"text": 0.85, "text+id": 1.0}  # share of the ID row's test NDCG@10


def run_one(script: str, flags: list[str], run_dir: Path, seed: int, dataset: str,
            epochs: int, extra: list[str]) -> dict:
    if not (run_dir / "metrics.json").is_file():
        resume = ["--resume"] if (run_dir / "config.json").is_file() else []
        command = [sys.executable, str(ROOT / "scripts" / f"{script}.py"), "--dataset", dataset,
                   "--output-dir", str(run_dir), "--seed", str(seed), "--epochs", str(epochs),
                   "--patience", str(epochs), "--report-to", "none",
                   # Each row's settings are its flags alone (SASRec's default preset would
                   # add its own), as the recorded results were trained.
                   "--preset", "none", *extra, *flags, *resume]
        print("+", " ".join(command), flush=True)
        subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    metrics = json.loads((run_dir / "metrics.json").read_text())
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    epochs_logged = [row for row in log if "seconds" in row]
    metrics["epochs"] = len(epochs_logged)
    metrics["seconds_per_epoch"] = statistics.median(row["seconds"] for row in epochs_logged)
    return metrics


def summarize(name: str, runs: list[dict]) -> dict:
    test = [run["test"]["ndcg@10"] for run in runs]
    valid = [run["valid"]["ndcg@10"] for run in runs]
    parameters = runs[0].get("parameters") or {}
    return {
        "model": name, "seeds": len(runs), "ndcg": test, "valid": valid,
        "test ndcg@10": spread(test),
        "test hr@10": spread([run["test"]["hr@10"] for run in runs]),
        "valid ndcg@10": spread(valid),
        "parameters": f"{parameters.get('total', 0):,}",
        "epochs": max(run["epochs"] for run in runs),
        "s/epoch": f"{statistics.median(run['seconds_per_epoch'] for run in runs):.0f}",
    }


def family(name: str) -> str:
    return name.split()[0]


def best_on_validation(rows: list[dict], kind: str) -> dict | None:
    """The row of family `kind` with the best mean validation NDCG@10 (None if none)."""
    candidates = [row for row in rows if family(row["model"]) == kind]
    return max(candidates, key=lambda row: statistics.mean(row["valid"]), default=None)


def check_targets(rows: list[dict]) -> list[str]:
    """Each family's row chosen on validation, against the ID row (likewise chosen) test
    NDCG@10."""
    reference = best_on_validation(rows, "id")
    if reference is None:
        return []
    id_ndcg = statistics.mean(reference["ndcg"])
    lines = []
    for kind, share in TARGETS.items():
        best = best_on_validation(rows, kind)
        if best is None:
            continue
        ratio = statistics.mean(best["ndcg"]) / id_ndcg
        lines.append(f"{kind}: {best['model']} (best on validation) test NDCG@10 "
                     f"{statistics.mean(best['ndcg']):.4f} = {ratio:.1%} of "
                     f"{reference['model']} ({id_ndcg:.4f}) "
                     f"-> {'met' if ratio >= share else 'NOT met'} (target >= {share:.0%})")
    return lines


def popularity(dataset: str) -> dict:
    from modality_movielens import popularity_row

    from peftrec.pretraining.evaluation import EvaluationProtocol
    from peftrec.pretraining.pipeline import load_data

    row = popularity_row(load_data(dataset, None), EvaluationProtocol(), batch_size=1024)
    return {"model": "popularity", "seeds": 1, "test ndcg@10": f"{row['test ndcg@10']:.4f}",
            "test hr@10": f"{row['test hr@10']:.4f}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-1m")
    parser.add_argument("--epochs", type=int, default=10, help="the budget of every run")
    parser.add_argument("--lrs", nargs="+", metavar="LR",
                        help="learning rates every row is trained with (rows named "
                        "'NAME lr LR'); each family's row and rate are chosen on validation")
    add_run_arguments(parser, "runs/bench-in-domain")
    args = parser.parse_args()
    extra = [a for a in args.extra if a != "--"]
    grid = [(f"{name} lr {lr}", script, [*flags, "--lr", lr]) for name, script, flags in ROWS
            for lr in args.lrs] if args.lrs else ROWS
    rows = []
    for name, script, flags in grid:
        if args.only is not None and name not in args.only:
            continue
        run_dirs = {seed: args.output_dir / name.replace(" ", "-") / f"seed{seed}"
                    for seed in args.seeds}
        if args.summary_only:
            run_dirs = {seed: path for seed, path in run_dirs.items()
                        if (path / "metrics.json").is_file()}
            if not run_dirs:
                continue
        runs = [run_one(script, flags, run_dir, seed, args.dataset, args.epochs, extra)
                for seed, run_dir in run_dirs.items()]
        rows.append(summarize(name, runs))
    if rows:
        rows.append(popularity(args.dataset))
    table = markdown(rows, COLUMNS)
    targets = check_targets(rows)
    report = table + "\n\n" + "\n".join(f"- {line}" for line in targets) + "\n"
    publish_report(args, rows, report,
                   {"dataset": args.dataset, "epochs": args.epochs, "seeds": args.seeds,
                    "extra_flags": extra, "targets": targets})


if __name__ == "__main__":
    main()
