"""What one fine-tuning step costs when the text encoder trains inside it (CPU).

For each row (a fine-tuning method with its placement), loss and precision, a fresh process
builds the target model exactly as the fine-tuning scripts do (the pretrained run's model on
the target catalog, adapters injected, the rest frozen), trains `--steps` steps of the
training data (AdamW, gradient clipping, bf16 autocast as Accelerate sets it) and runs one
full-ranking validation. The first step is left out (warm-up); "s/step" is the median of the
others. "items/step" and "tokens/step" count what the text encoder ran on (tokens as padded).
An epoch is steps/epoch x s/step plus the validation.

    python benchmarks/end_to_end_step.py --pretrained runs/e2e-src --target ml-100k \\
        --results end-to-end/step-cpu [--baseline-tree /tmp/before --baseline-label 07910b5]

`--baseline-tree DIR` (a copy of an earlier commit, e.g. `git archive COMMIT | tar -x -C DIR`)
also measures every configuration on that code, right before the current one, in the same
conditions, and adds its s/step next to it. `--loss sampled` is set the way the fine-tuning
scripts set it (`downstream.transfer.target_config`): a replacement of the base's loss, so
the baseline measures it too. Each process runs on `--threads` threads (default 1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

# (name, adapter methods of the script: () = finetune_full, script flags)
ROWS = [
    ("frozen (full fine-tuning)", (), []),
    ("head (lora item_encoder head)", ("lora",),
     ["--adapt", "item_encoder", "--target-modules", "projection", "--rank", "32",
      "--alpha", "64"]),
    ("houlsby both top:1", ("houlsby",), ["--adapt", "both", "--layers", "top:1"]),
    ("houlsby both top:2", ("houlsby",), ["--adapt", "both", "--layers", "top:2"]),
    ("lora both top:1", ("lora",), ["--adapt", "both", "--layers", "top:1"]),
]
COLUMNS = ("method", "loss", "precision", "items/step", "tokens/step", "s/step", "steps/epoch",
           "train s/epoch", "valid s", "epoch s")


def measure(job: dict) -> dict:
    """One configuration, in this process (see the module docstring)."""
    import torch

    from peftrec.downstream.cli import adapter_config, finetune_parser
    from peftrec.downstream.transfer import encoder_overrides, matched_target_model, target_config
    from peftrec.pretraining.cli import parse_args
    from peftrec.pretraining.data import LeaveOneOutDataset, collate_left_padded
    from peftrec.pretraining.evaluation import EvaluationProtocol, evaluate
    from peftrec.pretraining.pipeline import load_data, resolve_checkpoint
    from peftrec.pretraining.recommender import load_recommender_config

    torch.set_num_threads(job["threads"])
    args = parse_args(finetune_parser("benchmark", tuple(job["methods"])),
                      ["--pretrained", job["pretrained"], "--dataset", job["target"],
                       "--batch-size", str(job["batch_size"]), *job["flags"]])
    adapter = adapter_config(args) if job["methods"] else None
    data = load_data(args.dataset, None)
    base_dir = resolve_checkpoint(args.pretrained, "--pretrained")
    config = target_config(load_recommender_config(base_dir), data, adapter,
                           encoder_overrides(args))
    if job["loss"] != "full":  # as `--loss sampled --num-negatives N` sets it
        config = replace(config, loss="sampled", num_negatives=job["num_negatives"])
    torch.manual_seed(0)
    model = matched_target_model(config, base_dir, data, None, adapter)
    encoded = {"items": 0, "tokens": 0}
    stages = getattr(model.item_encoder, "encoder", None)
    if stages is not None:
        def count(module, inputs):
            shape = inputs[0]["input_ids"].shape
            encoded["items"] += shape[0]
            encoded["tokens"] += shape[0] * shape[1]

        stages.register_forward_pre_hook(count)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3)
    loader = torch.utils.data.DataLoader(
        LeaveOneOutDataset(data, "train", config.backbone_settings().max_len),
        batch_size=job["batch_size"], shuffle=True, collate_fn=collate_left_padded,
        generator=torch.Generator().manual_seed(0))
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if job["precision"] == "bf16"
                else contextlib.nullcontext())
    model.train()
    seconds, items, tokens = [], [], []
    batches = iter(loader)
    for _ in range(job["steps"]):
        batch = next(batches, None)
        if batch is None:
            batches = iter(loader)
            batch = next(batches)
        encoded.update(items=0, tokens=0)
        started = time.perf_counter()
        with autocast:
            loss = model.loss(batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 5.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - started)
        items.append(encoded["items"])
        tokens.append(encoded["tokens"])
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    valid = torch.utils.data.DataLoader(LeaveOneOutDataset(data, "valid", config.backbone_settings(
    ).max_len), batch_size=256, collate_fn=collate_left_padded)
    started = time.perf_counter()
    evaluate(model, accelerator.prepare(valid), accelerator, EvaluationProtocol(), "valid")
    valid_seconds = time.perf_counter() - started
    step = statistics.median(seconds[1:])
    return {"step_s": step, "steps_per_epoch": len(loader), "valid_s": valid_seconds,
            "items": statistics.mean(items[1:]), "tokens": statistics.mean(tokens[1:]),
            "all_step_s": seconds, "loss": float(loss)}


def run_job(job: dict, tree: Path) -> dict:
    """`measure(job)` in a fresh process on the code of `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": str(job["threads"])}
    done = subprocess.run([sys.executable, __file__, "--job", json.dumps(job)], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{job['name']} ({tree}) failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--pretrained", help="a text pretraining run folder")
    parser.add_argument("--target", default="ml-100k")
    parser.add_argument("--steps", type=int, default=5, help="steps per configuration "
                        "(the first is left out)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-negatives", type=int, default=256, help="for the sampled loss")
    parser.add_argument("--losses", nargs="+", default=["full", "sampled"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--only", nargs="*", help="rows with these names")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--baseline-tree", type=Path,
                        help="also measure on this copy of an earlier commit")
    parser.add_argument("--baseline-label", default="before",
                        help="the baseline's name in the table (e.g. its commit)")
    parser.add_argument("--results", metavar="NAME",
                        help="also write benchmarks/results/NAME.{json,md}")
    args = parser.parse_args()
    if args.job:
        print(json.dumps(measure(json.loads(args.job))))
        return
    if not args.pretrained:
        parser.error("--pretrained is required")
    rows = []
    before = f"s/step {args.baseline_label}"
    tokens_before = f"tokens/step {args.baseline_label}"
    columns = list(COLUMNS)
    if args.baseline_tree:
        columns[4:6] = [tokens_before, "tokens/step", before, "s/step", "speed-up"]
    for name, methods, flags in ROWS:
        if args.only and name not in args.only:
            continue
        for loss in args.losses:
            for precision in args.precisions:
                job = {"name": name, "methods": methods, "flags": flags, "loss": loss,
                       "precision": precision, "pretrained": str(Path(args.pretrained)),
                       "target": args.target, "steps": args.steps,
                       "batch_size": args.batch_size, "num_negatives": args.num_negatives,
                       "threads": args.threads}
                baseline = run_job(job, args.baseline_tree) if args.baseline_tree else None
                result = run_job(job, ROOT)
                epoch = result["steps_per_epoch"] * result["step_s"]
                row = {"method": name,
                       "loss": "full" if loss == "full" else f"sampled {args.num_negatives}",
                       "precision": precision, "items/step": f"{result['items']:,.0f}",
                       "tokens/step": f"{result['tokens']:,.0f}",
                       "s/step": f"{result['step_s']:.2f}",
                       "steps/epoch": result["steps_per_epoch"],
                       "train s/epoch": f"{epoch:.1f}", "valid s": f"{result['valid_s']:.1f}",
                       "epoch s": f"{epoch + result['valid_s']:.1f}", "measured": result}
                if baseline is not None:
                    row[before] = f"{baseline['step_s']:.2f}"
                    row[tokens_before] = f"{baseline['tokens']:,.0f}"
                    row["speed-up"] = f"{baseline['step_s'] / result['step_s']:.2f}x"
                    row["baseline"] = baseline
                print(" | ".join(str(row[c]) for c in columns), flush=True)
                rows.append(row)
    from tables import markdown

    table = markdown(rows, columns)
    print(table)
    if args.results:
        from results import write_result

        settings = {"pretrained": args.pretrained, "target": args.target, "steps": args.steps,
                    "batch_size": args.batch_size, "num_negatives": args.num_negatives,
                    "threads": args.threads, "baseline": args.baseline_label
                    if args.baseline_tree else None}
        path = write_result(args.results, rows, table, settings)
        print(f"wrote {path} (+ .json)")


if __name__ == "__main__":
    main()
