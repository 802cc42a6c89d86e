"""The quick-start transfer demo: pretrain a text SASRec on the source, then fine-tune it
on the target with Houlsby adapters, next to full fine-tuning and training from scratch.

Every step is an ordinary run folder under `output_dir`; running the demo again reuses
finished runs and resumes interrupted ones, then prints the table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from peftrec.dataset_tools.checkpoints import METRICS, RUN_CONFIG
from peftrec.downstream.cli import finetune_parser, run_finetune
from peftrec.pretraining.cli import parse_args, pretrain_parser
from peftrec.pretraining.pipeline import format_metrics_table, pretrain


@dataclass
class DemoSettings:
    """The settings of scripts/transfer_demo.py (a flag each, pretraining.cli)."""

    source: str = field(default="ml-1m", metadata={
        "help": "dataset the text SASRec is pretrained on (built-in name or folder)"})
    target: str = field(default="ml-100k", metadata={
        "help": "dataset it is fine-tuned on (built-in name or folder)"})
    output_dir: Path = field(default=Path("runs/demo"), metadata={
        "help": "folder of the demo's run folders (finished runs are reused)"})
    encoder: str = field(default="minilm", metadata={"help": "text encoder (folder or minilm)"})
    pretrain_epochs: int = field(default=5, metadata={"help": "epochs of pretraining"})
    finetune_epochs: int = field(default=10, metadata={"help": "epochs of each fine-tuning run"})


# name -> (adapter methods of the script, its flags)
FINETUNING = {
    # The item side matters most when the items are new: adapters in the text encoder's
    # top layer (only that layer runs in the step, the rest is cached) and the backbone's.
    "houlsby adapters": (("houlsby",), ["--adapt", "both", "--layers", "top:1"]),
    "full fine-tuning": ((), []),
    "from scratch": ((), ["--from-scratch"]),
}


def transfer_demo(
    source: str,
    target: str,
    output_dir: Path,
    encoder: str,
    pretrain_epochs: int,
    finetune_epochs: int,
    common: tuple[str, ...] = (),
    pretrain_flags: tuple[str, ...] = (),
) -> str:
    """Run (or reuse) the demo's runs (the settings of `DemoSettings`, which holds their
    defaults); returns the printed table. `common`: extra flags for every run (e.g.
    `--cpu`); `pretrain_flags`: for pretraining only (e.g. model sizes)."""
    # Run folders are named by the datasets' names (a folder's last part): a dataset folder's
    # whole path would place them beside it, outside output_dir.
    base = output_dir / f"{Path(source).name}-text"
    _run_once(base, lambda resume: pretrain(parse_args(pretrain_parser("demo", "text"), [
        "--dataset", source, "--encoder", encoder, "--output-dir", str(base),
        "--epochs", str(pretrain_epochs), "--lr", "2e-3", *pretrain_flags, *common, *resume])))
    results = {}
    for name, (methods, flags) in FINETUNING.items():
        run = output_dir / f"{Path(target).name}-{name.replace(' ', '-')}"
        results[f"{target} {name}"] = _run_once(
            run, lambda resume, methods=methods, flags=flags, run=run: run_finetune(parse_args(
                finetune_parser("demo", methods),
                ["--pretrained", str(base), "--dataset", target, "--output-dir", str(run),
                 "--epochs", str(finetune_epochs), "--lr", "2e-3", *flags, *common, *resume])))
    rows = {f"{name} ({metrics['parameters']['trainable_percent']:.1f}% trained)": metrics
            for name, metrics in results.items()}
    table = format_metrics_table(rows)
    print(f"\nTransfer {source} -> {target} (text items, shipped MiniLM), full ranking:\n{table}")
    return table


def _run_once(run_dir: Path, job) -> dict:
    """`job(resume_flags)` unless `run_dir` already finished; its metrics either way."""
    if (run_dir / METRICS).is_file():
        return json.loads((run_dir / METRICS).read_text())
    return job(["--resume"] if (run_dir / RUN_CONFIG).is_file() else [])
