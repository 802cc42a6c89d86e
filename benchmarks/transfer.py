"""Transfer ML-1M -> ML-100k: adapters against full fine-tuning, from scratch and zero-shot.

For each pretrained source (an ID SASRec, a text SASRec with the shipped MiniLM and an ID
DiffRec, all pretraining run folders on ML-1M), every row of the grid is fine-tuned on the target
with each seed, each run in its own process (so peak memory is the run's own), by the
repository's scripts. The table reports the mean and spread (sample standard deviation)
over seeds of test NDCG@10 and HR@10 (full ranking, no history mask), the trainable
parameters (as a share of the model as built, and of every parameter it uses: a frozen
encoder whose outputs are cached is outside the model as built, so only the second
counts it), the size of the saved checkpoint (adapter-only for adapters), the
fine-tuning time and the peak memory, then checks the targets:
- the best adapter reaches >= 95% of full fine-tuning's NDCG@10 with <= 10% of parameters,
- pretraining + adapters beats training from scratch on the target.
Finished runs are summarised without training again; interrupted ones resume.

    python benchmarks/transfer.py --source id=runs/bench-sasrec/ml-1m \\
        --source text=runs/bench-text/ml-1m --output-dir runs/bench-transfer -- --lr 2e-3

Extra flags after `--` go to every fine-tuning run; a row's own settings (e.g. the
learning rate and batch size its method was tuned with) come after them and win.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

from tables import markdown

ROOT = Path(__file__).resolve().parents[1]
# (name, script, flags, which sources it applies to)
GRID = [
    ("scratch", "finetune_full", ["--from-scratch"], ("id", "text", "diffrec")),
    ("zero-shot", "finetune_full", ["--zero-shot"], ("text",)),
    ("full fine-tuning", "finetune_full", [], ("id", "text", "diffrec")),
    ("full fine-tuning b32", "finetune_full", ["--batch-size", "32"], ("text",)),
    ("houlsby backbone all", "adapter_houlsby", ["--adapt", "backbone", "--layers", "all"],
     ("id", "text", "diffrec")),
    ("houlsby backbone top:1", "adapter_houlsby", ["--adapt", "backbone", "--layers", "top:1"],
     ("id", "text")),
    ("houlsby backbone all + projection", "adapter_houlsby",
     ["--adapt", "backbone", "--layers", "all", "--tune", "projection"], ("text",)),
    # Probes (one seed): a higher learning rate for the adapters, and the layer norms
    # (so also the output norm before the dot product) trained too.
    ("houlsby backbone all + projection lr 3e-3", "adapter_houlsby",
     ["--adapt", "backbone", "--layers", "all", "--tune", "projection", "--lr", "3e-3"],
     ("text",)),
    ("houlsby backbone all + projection + layernorm lr 3e-3", "adapter_houlsby",
     ["--adapt", "backbone", "--layers", "all", "--tune", "projection,layernorm", "--lr",
      "3e-3"], ("text",)),
    ("houlsby item_encoder head b32", "adapter_houlsby",
     ["--adapt", "item_encoder", "--sites", "projection", "--reduction-factor", "1", "--lr",
      "5e-3", "--batch-size", "32"], ("text",)),
    ("houlsby item_encoder top:1", "adapter_houlsby",
     ["--adapt", "item_encoder", "--layers", "top:1"], ("text",)),
    ("houlsby both top:1", "adapter_houlsby", ["--adapt", "both", "--layers", "top:1"],
     ("text",)),
    ("lora backbone all", "adapter_lora", ["--adapt", "backbone", "--layers", "all"],
     ("id", "text", "diffrec")),
    ("lora item_encoder top:1", "adapter_lora",
     ["--adapt", "item_encoder", "--layers", "top:1"], ("text",)),
    # LoRA on the text encoder's output head only (the cache stays): rank 32, tuned on
    # validation with batch 32 and lr 5e-3.
    ("lora item_encoder head b32", "adapter_lora",
     ["--adapt", "item_encoder", "--target-modules", "projection", "--rank", "32", "--alpha",
      "64", "--lr", "5e-3", "--batch-size", "32"], ("text",)),
    # LoRA in every backbone Linear and on the text encoder's output head together.
    ("lora both all + head", "adapter_lora",
     ["--adapt", "both", "--target-modules", "q_proj,k_proj,v_proj,o_proj,fc1,fc2,projection",
      "--rank", "4", "--alpha", "8"], ("text",)),
    ("prefix backbone all", "adapter_prefix",
     ["--method", "prefix", "--adapt", "backbone", "--layers", "all"], ("id", "text")),
    ("diffusion_step backbone all", "adapter_diffusion_step",
     ["--adapt", "backbone", "--layers", "all"], ("diffrec",)),
    ("diffusion_step step MLP only", "adapter_diffusion_step", ["--step-mlp-only"],
     ("diffrec",)),
]
COLUMNS = ("source", "method", "seeds", "test ndcg@10", "test hr@10", "trainable",
           "trainable %", "% incl. encoder", "checkpoint MB", "fine-tune s", "peak MB")


def source_kind(source: Path) -> str:
    """Which grid rows fit a pretraining run: 'diffrec', 'text', 'image' or 'id'."""
    config = source / "config.json"
    if not config.is_file():
        sys.exit(f"{source} is not a pretraining run folder (no config.json); pass "
                 "--source LABEL=RUN_DIR with the output directory of a pretraining script")
    model = json.loads(config.read_text())["model"]
    return "diffrec" if model["backbone"] == "diffrec" else model["item_encoder"]


def run_one(script: str, flags: list[str], source: Path, run_dir: Path, seed: int,
            target: str, extra: list[str]) -> dict:
    if not (run_dir / "metrics.json").is_file():
        resume = ["--resume"] if (run_dir / "config.json").is_file() else []
        command = [sys.executable, str(ROOT / "scripts" / f"{script}.py"), "--pretrained",
                   str(source), "--dataset", target, "--output-dir", str(run_dir), "--seed",
                   str(seed), "--report-to", "none", *extra, *flags, *resume]
        print("+", " ".join(command), flush=True)
        subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads((run_dir / "metrics.json").read_text())


def frozen_encoder_parameters(run_dir: Path) -> int:
    """Parameters of a content encoder kept frozen outside the model (its outputs cached):
    the model as built, and so metrics.json's count, leaves them out."""
    model = json.loads((run_dir / "config.json").read_text())["model"]
    settings = model.get("item_encoder_config") or {}
    if model["item_encoder"] == "id" or not settings.get("freeze", True):
        return 0
    from safetensors import safe_open

    from modality_encoders.transformer import resolve_encoder_path

    weights = resolve_encoder_path(settings["encoder"]) / "model.safetensors"
    with safe_open(str(weights), "pt") as tensors:
        names = tensors.keys()  # a safe_open handle is not iterable itself
        return sum(math.prod(tensors.get_slice(name).get_shape()) for name in names)


def summarize(source: str, name: str, runs: list[dict], run_dirs: list[Path]) -> dict:
    def spread(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.4f} ± {sd:.4f}"

    seconds = []
    for run_dir in run_dirs:
        log = run_dir / "log.jsonl"
        rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        seconds.append(sum(row["seconds"] for row in rows))
    parameters = runs[0].get("parameters")
    training = [run.get("training") or {} for run in runs]
    # The share of every parameter the model uses, a frozen cached encoder included.
    outside = frozen_encoder_parameters(run_dirs[0])
    inclusive = (100 * parameters["trainable"] / (parameters["total"] + outside)
                 if parameters else 0.0)
    return {
        "source": source,
        "method": name,
        "seeds": len(runs),
        "ndcg": [run["test"]["ndcg@10"] for run in runs],
        "test ndcg@10": spread([run["test"]["ndcg@10"] for run in runs]),
        "test hr@10": spread([run["test"]["hr@10"] for run in runs]),
        "trainable": f"{parameters['trainable']:,}" if parameters else "0",
        "trainable %": f"{parameters['trainable_percent']:.2f}" if parameters else "0.00",
        "percent": parameters["trainable_percent"] if parameters else 0.0,
        "% incl. encoder": f"{inclusive:.2f}",
        "checkpoint MB": f"{statistics.mean(r.get('checkpoint_mb', 0.0) for r in runs):.3f}",
        "fine-tune s": f"{statistics.mean(seconds):.0f}",
        "peak MB": f"{max(t.get('peak_memory_mb', 0.0) for t in training):,.0f}",
    }


def check_targets(rows: list[dict]) -> list[str]:
    """The issue's targets, per source, as lines of text."""
    lines = []
    for source in dict.fromkeys(row["source"] for row in rows):
        by_name = {row["method"]: row for row in rows if row["source"] == source}
        fulls = [row for name, row in by_name.items() if name.startswith("full fine-tuning")]
        adapters = [row for name, row in by_name.items()
                    if name not in ("scratch", "zero-shot") and row not in fulls]
        if not adapters or not fulls:
            continue
        # The reference is the best full fine-tuning run under any of its settings.
        full = max(statistics.mean(row["ndcg"]) for row in fulls)
        small = [row for row in adapters if row["percent"] <= 10.0]
        if not small:
            lines.append(f"{source}: no adapter trains <= 10% of the parameters (a fresh "
                         "per-item table alone is more) -> NOT met (target >= 95% of full "
                         "fine-tuning with <= 10% trained)")
        else:
            best = max(small, key=lambda row: statistics.mean(row["ndcg"]))
            ratio = statistics.mean(best["ndcg"]) / full if full else float("nan")
            lines.append(f"{source}: best adapter with <= 10% trainable: {best['method']} "
                         f"({best['trainable %']}%), NDCG@10 = {ratio:.1%} of full fine-tuning "
                         f"-> {'met' if ratio >= 0.95 else 'NOT met'} (target >= 95%)")
        best_any = max(adapters, key=lambda row: statistics.mean(row["ndcg"]))
        lines.append(f"{source}: best adapter at any share: {best_any['method']} "
                     f"({best_any['trainable %']}%), NDCG@10 = "
                     f"{statistics.mean(best_any['ndcg']) / full:.1%} of full fine-tuning")
        if "scratch" in by_name:
            scratch = statistics.mean(by_name["scratch"]["ndcg"])
            top = max(statistics.mean(row["ndcg"]) for row in adapters)
            lines.append(f"{source}: best adapter {top:.4f} vs from scratch {scratch:.4f} -> "
                         f"{'met' if top > scratch else 'NOT met'} (pretraining + adapters wins)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", action="append", required=True,
                        help="LABEL=RUN_DIR (repeatable): a pretraining run, named LABEL in "
                        "the table; its rows follow its kind (ID, text or DiffRec)")
    parser.add_argument("--target", default="ml-100k")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="*", default=None,
                        help="run only the grid rows with these names")
    parser.add_argument("--single-seed", nargs="*", default=[],
                        help="grid rows run with the first seed only (expensive ones)")
    parser.add_argument("--summary-only", action="store_true",
                        help="train nothing: summarise the finished runs (rows without one "
                        "are left out)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/bench-transfer"))
    parser.add_argument("extra", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    extra = [a for a in args.extra if a != "--"]
    sources = dict(item.split("=", 1) for item in args.source)
    # Every source is checked before the first (hours-long) run starts.
    kinds = {label: source_kind(Path(source)) for label, source in sources.items()}
    rows = []
    for label, source in sources.items():
        kind = kinds[label]
        for name, script, flags, row_kinds in GRID:
            if kind not in row_kinds or (args.only is not None and name not in args.only):
                continue
            # Zero-shot is deterministic: one evaluation.
            single = name == "zero-shot" or name in args.single_seed
            seeds = args.seeds[:1] if single else args.seeds
            run_dirs = {seed: args.output_dir / label / name.replace(" ", "-").replace(":", "")
                        / f"seed{seed}" for seed in seeds}
            if args.summary_only:
                run_dirs = {seed: path for seed, path in run_dirs.items()
                            if (path / "metrics.json").is_file()}
                if not run_dirs:
                    continue
            runs = [run_one(script, flags, Path(source), run_dir, seed, args.target, extra)
                    for seed, run_dir in run_dirs.items()]
            rows.append(summarize(label, name, runs, list(run_dirs.values())))
    table = markdown(rows, COLUMNS)
    targets = check_targets(rows)
    print(table, *targets, sep="\n")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "results.json").write_text(json.dumps(rows, indent=2))
    (args.output_dir / "results.md").write_text(table + "\n\n" + "\n".join(targets) + "\n")


if __name__ == "__main__":
    main()
