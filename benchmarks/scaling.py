"""Scaling study (SRT's): test NDCG@10 on a target (ML-100k) against the size of the
pretraining data and of the model, fine-tuned from scratch, by progressive unfreezing and
with the best ID adapter; a power law fitted to each curve.

Every point of the grid is an ID SASRec pretrained on some data at some width and depth,
then fine-tuned on `--target` with each strategy of STRATEGIES and each seed:
- the data axis: every `--data` at the base model (`--base-width`, `--base-depth`);
- the model axis: every `--widths` x `--depths` at the base data (`--base-data`), or with
  `--model-grid cross` each width at the base depth and each depth at the base width.
A `--data` is `ml-1m:SHARE` (that share of ML-1M's users, `dataset_tools.write_user_subset`,
seeded; `ml-1m:1` is ML-1M) or `synthetic:N` (a synthetic log of N interactions,
`dataset_tools.write_synthetic_log`). The x axes are the pretraining interactions and the
non-embedding parameters (`pretraining.model_stats.parameter_split`: the item table and the
positions grow with the catalog and the sequence length, not with the network). Each curve
(a strategy along one axis) gets NDCG@10 = a * x^b by least squares in log-log space; its
exponent b and R^2 (log space) are reported. From scratch does not depend on the
pretraining data: it runs once per model size and has no data-axis curve.

    python benchmarks/scaling.py --data ml-1m:0.1 ml-1m:0.3 ml-1m:1 synthetic:1000000 \\
        --widths 64 128 256 512 --depths 1 2 4 8 --results scaling/gpu
    python benchmarks/scaling.py ... --dry-run     # the commands, nothing run

Runs go to OUTPUT_DIR/{data,pretrain,finetune}/; finished ones are skipped (metrics.json),
interrupted ones resumed, so running it again continues the study. `--jobs N` runs N
pretraining (then N fine-tuning) runs at once: on a GPU, small models leave it mostly idle.
Flags after `--` go to every run; `--pretrain-flags` to the pretraining runs alone (model
settings such as `--max-len`, which fine-tuning takes from the pretrained model).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from results import add_run_arguments, write_result
from tables import markdown, number, spread

ROOT = Path(__file__).resolve().parents[1]
# (name, script, flags). The adapter is the transfer table's best ID adapter that needs no
# items shared with the source (houlsby backbone all, 0.0612 against lora backbone all's
# 0.0589 on ML-1M -> ML-100k, docs/results-history.md): synthetic logs share none.
STRATEGIES = [
    ("scratch", "finetune_full", ["--from-scratch"]),
    ("progressive", "finetune_full", ["--unfreeze-every", "1"]),
    ("adapter", "adapter_houlsby", ["--adapt", "backbone", "--layers", "all"]),
]
SYNTHETIC_ITEMS = 10_000  # catalog of a synthetic log, whatever its length
HEAD_WIDTH = 32  # attention heads: width / HEAD_WIDTH (at least one)
COLUMNS = ("data", "pretrain interactions", "width", "depth", "non-embedding params",
           "embedding params", "pretrain ndcg@10", "strategy", "seeds", "test ndcg@10")


@dataclass(frozen=True)
class Point:
    """One pretrained model: its data (a `--data` spec), width and depth."""

    data: str
    width: int
    depth: int

    @property
    def model(self) -> str:
        return f"w{self.width}-d{self.depth}"


def parse_data(spec: str) -> tuple[str, float]:
    """`ml-1m:SHARE` -> ("ml-1m", share); `synthetic:N` -> ("synthetic", N)."""
    kind, _, amount = spec.partition(":")
    try:
        value = float(amount)
    except ValueError:
        value = math.nan
    if kind == "ml-1m" and 0 < value <= 1:
        return kind, value
    if kind == "synthetic" and value >= 1 and value == int(value):
        return kind, int(value)
    raise ValueError(f"--data {spec!r}: use ml-1m:SHARE (a share of ML-1M's users in (0, 1], "
                     "e.g. ml-1m:0.1) or synthetic:N (a synthetic log of N interactions)")


def data_label(spec: str) -> str:
    """A folder-safe name: ml-1m-10%, synthetic-1M, synthetic-20k."""
    kind, amount = parse_data(spec)
    if kind == "ml-1m":
        return f"ml-1m-{amount:.0%}"
    return f"synthetic-{amount / 1e6:g}M" if amount >= 1e6 else f"synthetic-{amount / 1e3:g}k"


def grid(data: list[str], widths: list[int], depths: list[int], base_data: str,
         base_width: int, base_depth: int, model_grid: str = "product") -> list[Point]:
    """The data axis at the base model, then the model axis at the base data (each point
    once, in that order): every width x depth, or ("cross") the widths at the base depth
    and the depths at the base width."""
    points = [Point(spec, base_width, base_depth) for spec in data]
    if model_grid == "product":
        models = [(width, depth) for width in widths for depth in depths]
    else:
        models = [(width, base_depth) for width in widths]
        models += [(base_width, depth) for depth in depths]
    points += [Point(base_data, width, depth) for width, depth in models]
    return list(dict.fromkeys(points))


class Study:
    """The folders and command lines of a study's runs."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = args.output_dir.resolve()  # the scripts run in the repository root
        self.extra = [a for a in args.extra if a != "--"]

    def dataset(self, spec: str) -> Path:
        return self.out / "data" / data_label(spec)

    def dataset_argument(self, spec: str) -> str:
        """--dataset for a spec: ML-1M itself is the built-in, the rest prepared folders."""
        return "ml-1m" if parse_data(spec) == ("ml-1m", 1) else str(self.dataset(spec))

    def pretrain_dir(self, point: Point, seed: int) -> Path:
        return self.out / "pretrain" / data_label(point.data) / point.model / f"seed{seed}"

    def finetune_dir(self, strategy: str, point: Point, seed: int) -> Path:
        # From scratch ignores the pretraining data: one run per model size.
        data = "any-data" if strategy == "scratch" else data_label(point.data)
        return self.out / "finetune" / strategy / data / point.model / f"seed{seed}"

    def pretrain_command(self, point: Point, seed: int) -> list[str]:
        return [*self._script("pretrain_id", self.pretrain_dir(point, seed), seed),
                "--dataset", self.dataset_argument(point.data),
                "--hidden-size", str(point.width), "--ffn-size", str(4 * point.width),
                "--num-layers", str(point.depth),
                "--num-heads", str(max(1, point.width // HEAD_WIDTH)),
                "--epochs", str(self.args.pretrain_epochs),
                "--preset", "none",  # the flags' recipe, which the recorded study used
                *shlex.split(self.args.pretrain_flags), *self.extra]

    def finetune_command(self, strategy: str, point: Point, seed: int) -> list[str]:
        script, flags = next((s, f) for name, s, f in STRATEGIES if name == strategy)
        return [*self._script(script, self.finetune_dir(strategy, point, seed), seed),
                "--pretrained", str(self.pretrain_dir(point, seed)),
                "--dataset", self.args.target, "--epochs", str(self.args.finetune_epochs),
                *self.extra, *flags]

    def _script(self, script: str, run_dir: Path, seed: int) -> list[str]:
        return [sys.executable, str(ROOT / "scripts" / f"{script}.py"),
                "--output-dir", str(run_dir), "--seed", str(seed), "--report-to", "none"]


def finetune_runs(study: Study, points: list[Point], seeds: list[int]
                  ) -> list[tuple[str, Point, int]]:
    """(strategy, point, seed) of every fine-tuning run: from scratch once per model size
    (on the first point of that size)."""
    runs, scratch_models = [], set()
    for point in points:
        for strategy, _, _ in STRATEGIES:
            if strategy == "scratch":
                if point.model in scratch_models:
                    continue
                scratch_models.add(point.model)
            runs += [(strategy, point, seed) for seed in seeds]
    return runs


def prepare_data(study: Study, spec: str) -> None:
    """Write the dataset folder of a --data spec, unless it is there (or is ML-1M)."""
    from peftrec.dataset_tools import (
        PrepareConfig,
        SyntheticConfig,
        prepare_dataset,
        write_synthetic_log,
        write_user_subset,
    )

    folder = study.dataset(spec)
    kind, amount = parse_data(spec)
    if (kind, amount) == ("ml-1m", 1) or (folder / "dataset_info.json").is_file():
        return
    print(f"+ preparing {data_label(spec)} into {folder}", flush=True)
    if kind == "ml-1m":
        write_user_subset("ml-1m", folder, amount, seed=0)
        return
    raw = study.out / "data" / f"{data_label(spec)}-raw"
    write_synthetic_log(SyntheticConfig(num_interactions=amount, num_items=SYNTHETIC_ITEMS),
                        raw)
    prepare_dataset(raw / "interactions.tsv", "tsv", folder, PrepareConfig(k_core=5),
                    items_path=raw / "items.tsv", user_col="user_id", item_col="item_id",
                    time_col="timestamp")


def run(command: list[str], run_dir: Path) -> None:
    """Run a script into `run_dir` unless it finished there; resume it if it started."""
    if (run_dir / "metrics.json").is_file():
        return
    resume = ["--resume"] if (run_dir / "config.json").is_file() else []
    print("+", shlex.join([*command, *resume]), flush=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{run_dir.name}.log"
    with log.open("a") as output:
        done = subprocess.run([*command, *resume], cwd=ROOT, stdout=output,
                              stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode:
        raise SystemExit(f"{Path(command[1]).name} into {run_dir} failed (exit "
                         f"{done.returncode}): see {log}; rerun to resume the study")


def run_all(commands: list[tuple[list[str], Path]], jobs: int) -> None:
    """Every (command, run folder), `jobs` at a time; the first failure stops the study
    (no run starts after it; those running finish)."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        running: set[Future] = set()
        for command, run_dir in commands:
            if len(running) == jobs:
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    future.result()
            running.add(pool.submit(run, command, run_dir))
        for future in running:
            future.result()


def power_law_fit(x: list[float], y: list[float]) -> dict | None:
    """y = prefactor * x ** exponent by least squares on (log x, log y), with R^2 in log
    space; None for fewer than two points or a non-positive value."""
    if len(x) < 2 or min(*x, *y) <= 0 or len(set(x)) < 2:
        return None
    log_x, log_y = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    exponent, intercept = np.polyfit(log_x, log_y, 1)
    residual = log_y - (exponent * log_x + intercept)
    total = ((log_y - log_y.mean()) ** 2).sum()
    r2 = 1 - (residual ** 2).sum() / total if total > 0 else 1.0
    return {"exponent": float(exponent), "prefactor": float(math.exp(intercept)),
            "r2": float(r2), "points": len(x)}


def parameter_counts(run_dir: Path) -> dict[str, int]:
    """Embedding and non-embedding parameters of a pretraining run's best model."""
    from peftrec.downstream.serving import load_run
    from peftrec.pretraining.model_stats import parameter_split

    return parameter_split(load_run(run_dir, device="cpu").model)


def point_rows(study: Study, point: Point, seeds: list[int]) -> list[dict]:
    """A point's rows, one per strategy whose runs finished (none before its pretraining)."""
    pretrained = [study.pretrain_dir(point, seed) for seed in seeds]
    pretrained = [path for path in pretrained if (path / "metrics.json").is_file()]
    if not pretrained:
        return []
    counts = parameter_counts(pretrained[0])
    info = json.loads((Path(json.loads((pretrained[0] / "config.json").read_text())
                            ["dataset"]["path"]) / "dataset_info.json").read_text())
    in_domain = [json.loads((path / "metrics.json").read_text())["test"]["ndcg@10"]
                 for path in pretrained]
    rows = []
    for strategy, _, _ in STRATEGIES:
        runs = [study.finetune_dir(strategy, point, seed) for seed in seeds]
        scores = [json.loads((path / "metrics.json").read_text())["test"]["ndcg@10"]
                  for path in runs if (path / "metrics.json").is_file()]
        if not scores:
            continue
        rows.append({
            "data": data_label(point.data), "spec": point.data,
            "pretrain interactions": info["statistics"]["interactions"],
            "width": point.width, "depth": point.depth,
            "non-embedding params": counts["non_embedding"],
            "embedding params": counts["embedding"],
            "pretrain ndcg@10": spread(in_domain), "strategy": strategy,
            "seeds": len(scores), "test ndcg@10": spread(scores), "ndcg": scores,
        })
    return rows


def fits(rows: list[dict], args: argparse.Namespace) -> list[dict]:
    """A power law per strategy along each axis: the data axis at the base model (x: the
    pretraining interactions), the model axis at the base data (x: non-embedding params)."""
    curves = []
    for strategy, _, _ in STRATEGIES:
        mine = [row for row in rows if row["strategy"] == strategy]
        axes = [("model", "non-embedding params",
                 [row for row in mine if row["spec"] == args.base_data])]
        if strategy != "scratch":
            axes.insert(0, ("data", "pretrain interactions",
                            [row for row in mine if (row["width"], row["depth"])
                             == (args.base_width, args.base_depth)]))
        for axis, column, points in axes:
            points = sorted(points, key=lambda row: row[column])
            fit = power_law_fit([row[column] for row in points],
                                [statistics.mean(row["ndcg"]) for row in points])
            if fit:
                curves.append({"strategy": strategy, "axis": axis, "x": column, **fit,
                               "xs": [row[column] for row in points],
                               "ys": [statistics.mean(row["ndcg"]) for row in points]})
    return curves


def fit_lines(curves: list[dict]) -> list[str]:
    return [f"{c['strategy']}, {c['axis']} axis: NDCG@10 = {c['prefactor']:.4g} x "
            f"({c['x']})^{c['exponent']:.3f}, R^2 {c['r2']:.3f} (log-log, {c['points']} "
            f"points{': exact, no test of the law' if c['points'] == 2 else ''})"
            for c in curves]


def plot(curves: list[dict], path: Path) -> None:
    """Two log-log panels (data axis, model axis): the mean test NDCG@10 of each strategy
    and its fitted power law."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    colours = dict(zip((name for name, _, _ in STRATEGIES),
                       plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for axis, (name, label) in zip(axes, [("data", "pretraining interactions"),
                                          ("model", "non-embedding parameters")], strict=True):
        for curve in (c for c in curves if c["axis"] == name):
            colour = colours[curve["strategy"]]
            axis.plot(curve["xs"], curve["ys"], "o", color=colour)
            xs = np.geomspace(min(curve["xs"]), max(curve["xs"]), 50)
            axis.plot(xs, curve["prefactor"] * xs ** curve["exponent"], "--", color=colour,
                      label=f"{curve['strategy']}: b = {curve['exponent']:.3f}, "
                            f"R² {curve['r2']:.2f}")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel(f"{label} (log)")
        axis.set_ylabel("target test NDCG@10 (log)")
        axis.set_title(f"{name} axis")
        axis.grid(alpha=0.3, which="both")
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=["ml-1m:0.1", "ml-1m:0.3", "ml-1m:1",
                                                      "synthetic:1000000",
                                                      "synthetic:10000000"])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--base-data", default="ml-1m:1",
                        help="the model axis's pretraining data")
    parser.add_argument("--base-width", type=int, default=64)
    parser.add_argument("--base-depth", type=int, default=2)
    parser.add_argument("--model-grid", choices=("product", "cross"), default="product",
                        help="the model axis: every width x depth, or each width at the base "
                        "depth and each depth at the base width")
    parser.add_argument("--target", default="ml-100k")
    parser.add_argument("--pretrain-epochs", type=int, default=20)
    parser.add_argument("--finetune-epochs", type=int, default=20)
    parser.add_argument("--pretrain-flags", default="",
                        help="flags for the pretraining runs alone, one quoted string")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the commands; prepare and train nothing")
    parser.add_argument("--note", default="",
                        help="a line for the results file (e.g. what budget the runs had)")
    add_run_arguments(parser, "runs/scaling")
    args = parser.parse_args(argv)
    try:
        for spec in {*args.data, args.base_data}:
            parse_data(spec)
    except ValueError as error:
        parser.error(str(error))
    if min(*args.widths, *args.depths, args.base_width, args.base_depth, args.jobs) < 1:
        parser.error("--widths, --depths, --base-width, --base-depth and --jobs must be >= 1")
    study = Study(args)
    points = grid(args.data, args.widths, args.depths, args.base_data, args.base_width,
                  args.base_depth, args.model_grid)
    pretraining = [(study.pretrain_command(point, seed), study.pretrain_dir(point, seed))
                   for point in points for seed in args.seeds]
    finetuning = [(study.finetune_command(strategy, point, seed),
                   study.finetune_dir(strategy, point, seed))
                  for strategy, point, seed in finetune_runs(study, points, args.seeds)]
    if args.dry_run:
        for spec in dict.fromkeys(point.data for point in points):
            print(f"# data {spec}: --dataset {study.dataset_argument(spec)}")
        for command, _ in [*pretraining, *finetuning]:
            print(shlex.join(command))
        return
    if not args.summary_only:
        for spec in dict.fromkeys(point.data for point in points):
            prepare_data(study, spec)
        run_all(pretraining, args.jobs)
        run_all(finetuning, args.jobs)
    rows = [row for point in points for row in point_rows(study, point, args.seeds)]
    curves = fits(rows, args)
    budget = (f"Budget: pretraining {args.pretrain_epochs} epochs"
              f"{' (' + args.pretrain_flags + ')' if args.pretrain_flags else ''}, fine-tuning "
              f"on {args.target} {args.finetune_epochs} epochs, seeds "
              f"{' '.join(map(str, args.seeds))}"
              f"{', every run: ' + shlex.join(study.extra) if study.extra else ''}.")
    report = "\n".join([markdown(rows, COLUMNS, lambda column, value: number(value)),
                        "", *(f"- {line}" for line in fit_lines(curves)), "", budget,
                        *([args.note] if args.note else [])]) + "\n"
    print(report)
    if args.results and rows:
        settings = {"target": args.target, "data": args.data, "widths": args.widths,
                    "depths": args.depths, "model_grid": args.model_grid,
                    "base_data": args.base_data,
                    "base_width": args.base_width, "base_depth": args.base_depth,
                    "pretrain_epochs": args.pretrain_epochs,
                    "finetune_epochs": args.finetune_epochs,
                    "pretrain_flags": args.pretrain_flags, "extra_flags": study.extra,
                    "seeds": args.seeds, "strategies": STRATEGIES, "fits": curves,
                    "note": args.note}
        path = write_result(args.results, rows, report, settings)
        plot(curves, path.with_suffix(".png"))
        print(f"wrote {path} (+ .json, .png); docs blocks: python benchmarks/results.py")


if __name__ == "__main__":
    main()
