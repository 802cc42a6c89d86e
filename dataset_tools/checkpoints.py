"""Checkpoint folders and run folders: saving, loading, fingerprints, overwrite checks.

It lives in dataset_tools, the package at the bottom of the import flow (scripts ->
downstream -> pretraining -> {modality_encoders, adapters, dataset_tools}), because both
adapters (adapter-only checkpoints) and pretraining (full checkpoints, run folders, the
training state) save and load checkpoints, and dataset_tools already owns the atomic
writes and the content hashes (`integrity`) that checkpoints share with dataset folders.

A checkpoint folder holds JSON files, one safetensors weights file and `checksums.json`,
written atomically; loading verifies the checksums first. A run folder holds `config.json`
(its settings), `metrics.json`, `log.jsonl`, `best_model/` (a checkpoint folder) and
`state/` (the training state, see `pretraining.trainer`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_directory, atomic_write
from .integrity import damaged_file, file_sha256, write_checksums

RUN_CONFIG = "config.json"
METRICS = "metrics.json"
BEST_DIR = "best_model"
STATE_DIR = "state"
RESUMED_SECTIONS = ("dataset", "model", "transfer")  # must be equal for a --resume


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed, damaged, or does not fit the model or data."""


def save_checkpoint(
    directory: str | os.PathLike[str],
    weights_name: str,
    tensors: dict[str, torch.Tensor],
    json_files: dict[str, dict],
    text_files: dict[str, str] | None = None,
    write_more: Callable[[Path], object] | None = None,
) -> None:
    """Write a checkpoint folder atomically (an old one is kept whole if this fails): the
    `json_files` (name -> content), `tensors` as `weights_name`, the `text_files` (name ->
    text), whatever `write_more(folder)` writes into it (e.g. a copy in another library's
    format), and the checksums of them all."""
    with atomic_directory(directory) as tmp:
        for name, content in json_files.items():
            (tmp / name).write_text(json.dumps(content, indent=2))
        contiguous = {name: tensor.detach().contiguous() for name, tensor in tensors.items()}
        save_file(contiguous, str(tmp / weights_name), metadata={"format": "pt"})
        for name, text in (text_files or {}).items():
            (tmp / name).write_text(text)
        if write_more is not None:
            write_more(tmp)
        write_checksums(tmp)


def verify_checkpoint(directory: str | os.PathLike[str]) -> None:
    """Refuse a checkpoint folder whose files differ from when they were written."""
    problem = damaged_file(directory)
    if problem:
        raise CheckpointError(f"{problem}; retrain it or restore {directory} from a copy")


def load_weights(directory: str | os.PathLike[str], weights_name: str) -> dict[str, torch.Tensor]:
    """The verified tensors of a checkpoint folder's weights file."""
    verify_checkpoint(directory)
    return load_file(str(Path(directory) / weights_name))


def read_json(path: Path) -> dict:
    """A checkpoint's or run folder's JSON file; CheckpointError if it is not valid JSON."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None


def weights_fingerprint(directory: str | os.PathLike[str], weights_name: str) -> str:
    """SHA-256 of the weights file: identifies a base model for adapters and resumes."""
    verify_checkpoint(directory)
    return file_sha256(Path(directory) / weights_name)


# ---------------------------------------------------------------------------- run folders
def check_run_folder(
    output_dir: Path,
    run_config: dict,
    resume: bool,
    comparable: Callable[[str, dict], dict],
) -> None:
    """Refuse to overwrite a run, or to resume one with another model or dataset: the
    RESUMED_SECTIONS of `run_config` must equal those saved, both passed through
    `comparable(section, settings)` (which fills in settings added since, and may raise
    ValueError for settings it does not know)."""
    existing = output_dir / RUN_CONFIG
    if not existing.is_file():
        return
    if not resume:
        raise ValueError(f"{output_dir} already holds a run; pass --resume to continue it "
                         "or choose another --output-dir")
    previous = read_json(existing)
    for section in RESUMED_SECTIONS:
        try:
            before = comparable(section, previous.get(section) or {})
        except ValueError as error:
            raise CheckpointError(f"cannot --resume {output_dir}: {existing}: {error}") from None
        now = comparable(section, run_config.get(section) or {})
        if before != now:
            changed = sorted(key for key in set(before) | set(now)
                             if before.get(key) != now.get(key))
            raise CheckpointError(
                f"cannot --resume {output_dir}: its {section} settings differ ({changed}); "
                "use the original settings or another --output-dir"
            )


def write_run_config(output_dir: Path, run_config: dict,
                     extra_files: dict[str, str] | None = None) -> None:
    """Create the run folder and write its config.json and `extra_files` (name -> text),
    each atomically; call `check_run_folder` first."""
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(output_dir / RUN_CONFIG, json.dumps(run_config, indent=2, default=str))
    for name, text in (extra_files or {}).items():
        atomic_write(output_dir / name, text)


def write_metrics(output_dir: Path, metrics: dict) -> None:
    atomic_write(output_dir / METRICS, json.dumps(metrics, indent=2))
