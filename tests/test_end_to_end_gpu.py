"""benchmarks/end_to_end_gpu.sh end to end on the tiny dataset (CPU, a tiny BERT): the
runs train at once, the deadline stops them, each is finished from its best checkpoint, and
benchmarks/transfer.py summarises them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "end_to_end_gpu.sh"
ROWS = "full fine-tuning b32|houlsby both top:1 + projection b32"
# Loaded by every Python the script starts (PYTHONPATH): a training run, once its first
# epoch is saved, waits for the deadline instead of training on. The deadline still finds
# it training, and the test does not spend the deadline's seconds of CPU in every run.
# A run finishing with --resume is never held.
WAIT_AFTER_FIRST_EPOCH = """
import sys, time

if sys.argv[0].startswith("scripts/") and "--resume" not in sys.argv:
    from peftrec.pretraining.trainer import Trainer

    end_epoch = Trainer._end_epoch
    def end_epoch_then_wait(self, *args):
        end_epoch(self, *args)
        time.sleep(3600)
    Trainer._end_epoch = end_epoch_then_wait
"""


def run_script(source: Path, root: Path, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "SEEDS": "0", "ROWS": ROWS,
           "RESULTS": "", **env}
    return subprocess.run(["bash", str(SCRIPT), str(source), str(root)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_runs_are_stopped_at_the_deadline_finished_and_summarised(
        text_base, tiny_dataset_dir, tmp_path):
    source, cache = text_base
    root = tmp_path / "runs"
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(WAIT_AFTER_FIRST_EPOCH)
    python_path = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    done = run_script(source, root, TARGET=str(tiny_dataset_dir), DEADLINE="45",
                      EPOCHS="100000", PATIENCE="100000", COPY_TO=str(tmp_path / "out"),
                      EXTRA=f"--cpu --encoder-cache-dir {cache}", PYTHONPATH=python_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "deadline: stopping the runs still training" in done.stdout
    for folder in ("full-fine-tuning-b32", "houlsby-both-top1-+-projection-b32"):
        run = root / "text" / folder / "seed0"
        stopped = re.search(f"{re.escape(str(run))}: stopped after epoch (\\d+)", done.stdout)
        epochs = int(stopped[1])  # of its saved state (the log may lack the last row)
        assert epochs >= 1
        metrics = json.loads((run / "metrics.json").read_text())  # from the best checkpoint
        assert metrics["training"]["epochs"] == epochs and metrics["test"]["ndcg@10"] >= 0
        assert metrics["training"]["best_epoch"] <= epochs
        config = json.loads((run / "config.json").read_text())
        assert config["training"]["mixed_precision"] == "bf16"
        assert config["training"]["batch_size"] == 32  # the row's own flags win
    top = json.loads((root / "text" / "houlsby-both-top1-+-projection-b32" / "seed0" /
                      "config.json").read_text())["model"]["item_encoder_config"]
    assert (top["freeze"], top["trainable_layers"]) == (False, 1)  # the encoder in the step
    summary = (root / "results.md").read_text()
    assert "| text | full fine-tuning b32 | 1 |" in summary
    assert "| text | houlsby both top:1 + projection b32 | 1 |" in summary
    with tarfile.open(tmp_path / "out" / "runs.tar.gz") as logs:
        names = logs.getnames()
    assert "./text/full-fine-tuning-b32/seed0/metrics.json" in names
    assert not [name for name in names if "best_model" in name or "state" in name]
    assert "== done" in done.stdout


def test_a_row_the_grid_does_not_have_is_refused_before_training(text_base, tmp_path):
    source, _ = text_base
    done = run_script(source, tmp_path / "runs", ROWS="full fine-tuning b32|no such row")
    assert done.returncode == 2 and "ROWS ['no such row']: not rows of" in done.stderr
    assert not (tmp_path / "runs").exists()
