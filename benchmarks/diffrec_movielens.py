"""DiffRec on MovieLens next to SASRec: quality, training and inference cost, trade-offs.

Foundation protocol: 5-core, chronological leave-one-out, full ranking over the catalog,
no history mask. Per dataset it trains (or resumes, or summarises) SASRec, DiffRec with
the default bidirectional denoiser, DiffRec with `--causal-denoiser` (the history never
attends to the noised target, so it is encoded once per user and reused for every seed
and reverse step) and that causal DiffRec trained on every position's next item
(`--every-position`). An existing SASRec run folder can be reused.

Table 1, per dataset and model: test NDCG@10, HR@10, MRR (all users, from metrics.json),
epochs, the median seconds per training epoch (log.jsonl, validation excluded) and the
inference seconds per 1,000 users: a timed full-ranking evaluation of a seeded sample of
test users (`--timing-users`) with the best checkpoint, after a warm-up on a few users.
Table 2, per DiffRec run: the same weights under other inference settings -- one step
with 1, 5, 10, 20 seeds, and strided reverse processes of 10 and 50 steps and the full
one (every diffusion step), each with one seed (strided processes longer than the
diffusion process are left out) -- on the same user sample (the full reverse process on a
smaller one, `--reverse-users`): test NDCG@10, HR@10 and seconds per 1,000 users.
Then the targets are checked: DiffRec reaches the paper's ML-1M figures (HR@10 0.2900,
NDCG@10 0.1657) and SASRec's, and one-step inference with 10 seeds costs at most 3x
SASRec's. Both tables and the checks go to results.json and results.md.

    python benchmarks/diffrec_movielens.py --datasets ml-100k ml-1m \\
        --sasrec-runs ml-100k=runs/bench-sasrec/ml-100k ml-1m=runs/bench-sasrec/ml-1m \\
        --output-dir runs/bench-diffrec -- --report-to none

    python benchmarks/diffrec_movielens.py --quick --datasets DATASET_DIR \\
        --output-dir /tmp/bench-diffrec                                   # a smoke run

`--models "diffrec causal"` runs one DiffRec variant (SASRec, the reference, always runs).
Extra flags after `--` go to every training run (e.g. `-- --hidden-size 256 --max-len 50`);
SASRec's run leaves out the DiffRec settings among them.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from accelerate import Accelerator
from tables import markdown
from torch.utils.data import DataLoader

from peftrec.dataset_tools import SequenceData
from peftrec.pretraining.cli import (
    parse_args,
    pretrain_parser,
    protocol_config,
    without_diffusion_flags,
)
from peftrec.pretraining.data import collate_left_padded
from peftrec.pretraining.evaluation import EvaluationProtocol, evaluate
from peftrec.pretraining.pipeline import evaluation_dataset, load_checkpoint, load_data, pretrain
from peftrec.pretraining.recommender import SequentialRecommender
from peftrec.pretraining.trainer import BEST_DIR

# name -> the flags that make its pretraining run: each DiffRec the flags' defaults (no
# default preset) plus what its name says.
MODELS = {
    "sasrec": ["--backbone", "sasrec"],
    "diffrec": ["--backbone", "diffrec", "--preset", "none"],
    "diffrec causal": ["--backbone", "diffrec", "--preset", "none", "--causal-denoiser"],
    # The causal denoiser trained on every position's next item, not each window's last.
    "diffrec every position": ["--backbone", "diffrec", "--preset", "none", "--causal-denoiser",
                               "--every-position"],
}
TRADE_OFF = [  # DiffRec inference settings compared on the same weights
    {"inference": "one_step", "num_seeds": 1},
    {"inference": "one_step", "num_seeds": 5},
    {"inference": "one_step", "num_seeds": 10},
    {"inference": "one_step", "num_seeds": 20},
    {"inference": "strided", "inference_steps": 10, "num_seeds": 1},
    {"inference": "strided", "inference_steps": 50, "num_seeds": 1},
    {"inference": "reverse", "num_seeds": 1},
]
TARGET_SETTING = {"inference": "one_step", "num_seeds": 10}  # costs at most 3x SASRec
MAX_COST_RATIO = 3.0
PAPER = {"ml-1m": {"hr@10": 0.2900, "ndcg@10": 0.1657}}  # DiffRec, Du et al. 2023, Table 2
USERS = (1000, 100)  # default --timing-users, --reverse-users
QUICK_USERS = (40, 8)
WARMUP_USERS = 8
QUICK_FLAGS = ["--hidden-size", "16", "--num-heads", "2", "--ffn-size", "32", "--max-len", "20",
               "--epochs", "2", "--diffusion-steps", "100", "--report-to", "none"]
MODEL_COLUMNS = ("dataset", "model", "inference", "test ndcg@10", "test hr@10", "test mrr",
                 "epochs", "s/epoch", "s/1k users", "x sasrec")
TRADE_OFF_COLUMNS = ("dataset", "model", "inference", "denoiser passes", "users",
                     "test ndcg@10", "test hr@10", "s/1k users", "x sasrec")


def run_args(dataset: str, run_dir: Path, model: str, extra: list[str]) -> argparse.Namespace:
    if model == "sasrec":
        extra = without_diffusion_flags(extra)
    return parse_args(pretrain_parser(__doc__), ["--dataset", dataset, "--output-dir",
                                                 str(run_dir), *MODELS[model], *extra])


def train(args: argparse.Namespace) -> None:
    """Train the run in `args.output_dir` unless it finished; an interrupted one resumes."""
    if not (args.output_dir / "metrics.json").is_file():
        args.resume = (args.output_dir / "config.json").is_file()
        pretrain(args)


def reverse_steps(backbone_config: dict) -> int:
    """Denoiser steps per seed of a DiffRec inference setting."""
    if backbone_config["inference"] == "one_step":
        return 1
    if backbone_config["inference"] == "strided":
        return backbone_config["inference_steps"]
    return backbone_config["num_steps"]  # the full reverse process


def describe(backbone_config: dict) -> str:
    """A backbone's inference setting in words (SASRec: one forward pass)."""
    if "inference" not in backbone_config:
        return "one pass"
    steps, seeds = reverse_steps(backbone_config), backbone_config["num_seeds"]
    full = " (full)" if backbone_config["inference"] == "reverse" else ""
    return f"{steps} step{'s' if steps > 1 else ''}{full}, {seeds} seed{'s' if seeds > 1 else ''}"


def timed_test(model: SequentialRecommender, data: SequenceData, args: argparse.Namespace,
               users: int) -> tuple[dict, float]:
    """Test metrics on a seeded sample of `users` users and the seconds per 1,000 of them.

    A full-ranking evaluation of a few users comes first as a warm-up (lazy allocations,
    first-call overheads); then the evaluation of the sample alone is timed.
    """
    accelerator = Accelerator(cpu=args.cpu)
    model.to(accelerator.device)
    max_len = model.config.backbone_settings().max_len

    def test_split(sample: int) -> tuple[DataLoader, EvaluationProtocol]:
        protocol = replace(protocol_config(args), max_users=sample)
        loader = DataLoader(evaluation_dataset(data, "test", max_len, protocol),
                            batch_size=args.eval_batch_size, collate_fn=collate_left_padded)
        return accelerator.prepare(loader), protocol

    warmup_loader, warmup_protocol = test_split(WARMUP_USERS)
    evaluate(model, warmup_loader, accelerator, warmup_protocol, "warm-up")
    loader, protocol = test_split(users)
    started = time.perf_counter()
    metrics = evaluate(model, loader, accelerator, protocol, "test")
    seconds = time.perf_counter() - started
    return metrics, 1000 * seconds / metrics["protocol"]["num_users"]


def model_row(name: str, run_dir: Path, model: SequentialRecommender, data: SequenceData,
              args: argparse.Namespace, users: int) -> dict:
    """Table 1: test metrics (all users), training cost, inference cost on `users` users."""
    metrics = json.loads((run_dir / "metrics.json").read_text())["test"]
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    _, seconds = timed_test(model, data, args, users)
    return {
        "dataset": data.name, "model": name,
        "inference": describe(model.config.backbone_config),
        "test ndcg@10": metrics["ndcg@10"], "test hr@10": metrics["hr@10"],
        "test mrr": metrics["mrr"], "epochs": len(log),
        "s/epoch": statistics.median(row["seconds"] for row in log),
        "s/1k users": seconds,
    }


def trade_off_row(name: str, model: SequentialRecommender, settings: dict, data: SequenceData,
                  args: argparse.Namespace, users: int) -> dict:
    """Table 2: one inference setting of a trained DiffRec on a sample of `users` users."""
    variant = copy.deepcopy(model)
    variant.set_inference(**settings)
    config = variant.config.backbone_config
    metrics, seconds = timed_test(variant, data, args, users)
    return {
        "dataset": data.name, "model": name, "inference": describe(config),
        "denoiser passes": reverse_steps(config) * config["num_seeds"],
        "users": metrics["protocol"]["num_users"],
        "test ndcg@10": metrics["ndcg@10"], "test hr@10": metrics["hr@10"],
        "s/1k users": seconds,
    }


def benchmark(dataset: str, options: argparse.Namespace,
              extra: list[str]) -> tuple[list[dict], list[dict]]:
    """Both tables' rows for one dataset: SASRec first (the reference time), then DiffRec."""
    folder = options.output_dir / Path(dataset).name
    rows, trade_off = [], []
    for name in ["sasrec", *options.models]:
        reused = options.sasrec_runs.get(Path(dataset).name) if name == "sasrec" else None
        run_dir = reused or folder / name.replace(" ", "-")
        args = run_args(dataset, run_dir, name, extra)
        if reused is None:
            train(args)
        elif not (reused / "metrics.json").is_file():
            raise ValueError(f"--sasrec-runs {reused} is not a finished run (no metrics.json)")
        data = load_data(args.dataset, args.cache_dir)
        model = load_checkpoint(run_dir / BEST_DIR, data)
        rows.append(model_row(name, run_dir, model, data, args, options.timing_users))
        if name == "sasrec":
            continue
        num_steps = model.config.backbone_config["num_steps"]
        for settings in TRADE_OFF:
            if settings.get("inference_steps", 0) > num_steps:
                continue  # a strided process longer than the diffusion process
            users = (options.reverse_users if settings["inference"] == "reverse"
                     else options.timing_users)
            trade_off.append(trade_off_row(name, model, settings, data, args, users))
    reference = rows[0]["s/1k users"]
    for row in [*rows, *trade_off]:
        row["x sasrec"] = row["s/1k users"] / reference
    return rows, trade_off


def check_targets(rows: list[dict], trade_off: list[dict]) -> list[str]:
    """Each target of the benchmark, in words, as met or NOT met."""
    def verdict(met: bool, text: str) -> str:
        return f"{'met' if met else 'NOT met'}: {text}"

    def quality(row: dict) -> str:
        return f"HR@10 {row['hr@10']:.4f}, NDCG@10 {row['ndcg@10']:.4f}"

    sasrec = {row["dataset"]: row for row in rows if row["model"] == "sasrec"}
    lines = []
    for row in rows:
        if row["model"] == "sasrec":
            continue
        label = f"{row['dataset']} {row['model']}"
        ours = {"hr@10": row["test hr@10"], "ndcg@10": row["test ndcg@10"]}
        reference = sasrec[row["dataset"]]
        baseline = {"hr@10": reference["test hr@10"], "ndcg@10": reference["test ndcg@10"]}
        for source, target in (("the paper", PAPER.get(row["dataset"])), ("SASRec", baseline)):
            if target is not None:
                met = all(ours[metric] >= target[metric] for metric in target)
                lines.append(verdict(met, f"{label} {quality(ours)} >= {source}'s "
                                          f"{quality(target)}"))
    target_setting = describe(TARGET_SETTING)
    for row in trade_off:
        if row["inference"] == target_setting:
            lines.append(verdict(row["x sasrec"] <= MAX_COST_RATIO,
                                 f"{row['dataset']} {row['model']} inference with "
                                 f"{target_setting} costs {row['x sasrec']:.2f}x SASRec's "
                                 f"(at most {MAX_COST_RATIO:g}x)"))
    return lines


def cell(column: str, value) -> str:
    if column.startswith("test "):
        return f"{value:.4f}"
    if column == "x sasrec":
        return f"{value:.2f}x"
    return f"{value:,.2f}" if isinstance(value, float) else str(value)


def report(rows: list[dict], trade_off: list[dict], targets: list[str],
           options: argparse.Namespace) -> str:
    return "\n".join([
        "## DiffRec next to SASRec",
        "",
        "Test metrics over all users; s/epoch: median training epoch; s/1k users: full-ranking "
        f"inference on a seeded sample of {options.timing_users} test users; x sasrec: "
        "against SASRec's inference time.",
        "",
        markdown(rows, MODEL_COLUMNS, cell),
        "",
        "## DiffRec inference trade-off",
        "",
        f"The same weights under each setting, on the same {options.timing_users} test users; "
        f"the full reverse process on a smaller sample of {options.reverse_users} users "
        "(metrics on a sample are noisier than Table 1's).",
        "",
        markdown(trade_off, TRADE_OFF_COLUMNS, cell),
        "",
        "## Targets",
        "",
        *(f"- {line}" for line in targets),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["ml-100k", "ml-1m"],
                        help="built-in names or dataset folders")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/bench-diffrec"))
    parser.add_argument("--sasrec-runs", nargs="*", default=[], metavar="DATASET=RUN_DIR",
                        help="finished SASRec run folders to reuse instead of training one")
    parser.add_argument("--timing-users", type=int,
                        help="test users whose inference is timed, also Table 2's sample "
                        "(default 1000; --quick: 40)")
    parser.add_argument("--reverse-users", type=int,
                        help="test users of the full reverse process, N denoiser passes each "
                        "(default 100; --quick: 8)")
    parser.add_argument("--models", nargs="+", choices=[m for m in MODELS if m != "sasrec"],
                        default=[m for m in MODELS if m != "sasrec"],
                        help="DiffRec variants to run (SASRec, the reference, always runs)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: a tiny model trained for 2 epochs, few users")
    parser.add_argument("extra", nargs=argparse.REMAINDER)
    options = parser.parse_args()
    if any("=" not in item for item in options.sasrec_runs):
        parser.error("--sasrec-runs takes DATASET=RUN_DIR pairs "
                     "(e.g. ml-1m=runs/bench-sasrec/ml-1m)")
    options.sasrec_runs = {key: Path(value) for key, value in
                           (item.split("=", 1) for item in options.sasrec_runs)}
    extra = [a for a in options.extra if a != "--"]
    if options.quick:
        extra = [*QUICK_FLAGS, *extra]  # flags given after `--` still win
    timing_users, reverse_users = QUICK_USERS if options.quick else USERS
    options.timing_users = options.timing_users or timing_users
    options.reverse_users = options.reverse_users or reverse_users
    rows, trade_off = [], []
    for dataset in options.datasets:
        dataset_rows, dataset_trade_off = benchmark(dataset, options, extra)
        rows += dataset_rows
        trade_off += dataset_trade_off
    targets = check_targets(rows, trade_off)
    text = report(rows, trade_off, targets, options)
    print(text)
    options.output_dir.mkdir(parents=True, exist_ok=True)
    results = {"models": rows, "inference_trade_off": trade_off, "targets": targets,
               "timing_users": options.timing_users, "reverse_users": options.reverse_users}
    (options.output_dir / "results.json").write_text(json.dumps(results, indent=2))
    (options.output_dir / "results.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
